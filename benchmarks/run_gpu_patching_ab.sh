#!/usr/bin/env bash
# Issue 19 on the GPU: the class-swap patching (hyclora.models.patching) against the tree before
# it, same machine: the device tests of graphs and models, then bench_cuda_graphs at 4x512 (PEFT
# LoRA, hyclora eager, graphed) from each tree. PART=after (this tree) or PART=before (the tree
# unpacked in $BEFORE; PART=both runs both trees, e.g. `git archive 3809bcf hyclora benchmarks | tar -x -C .gpu_ab/before`).
set -uo pipefail
OUT=${OUT:-out}; PART=${PART:-after}; BEFORE=${BEFORE:-.gpu_ab/before}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; python3 -c "import transformers; print('transformers', transformers.__version__)"; } | tee "$OUT/env.txt"
bench() {  # $1: label, $2: tree
  mkdir -p "$OUT/$1"
  (cd "$2" && export PYTHONPATH=/tmp/site:$PWD && OUT=$OUT/$1 timeout 200 python3 benchmarks/bench_cuda_graphs.py \
    --shapes 4x512 2>&1 | grep -v Warning | tee "$OUT/cuda_graphs_$1.log" | grep "^|")
}
case "$PART" in
after)
  timeout 200 python3 -m pytest -q tests/test_cuda_graphs.py tests/models/test_models_gpu.py tests/models/test_patching.py \
    tests/models/test_nonfinite_deferred.py 2>&1 | tail -6 | tee "$OUT/tests.log"
  bench after "$PWD" ;;
before)
  bench before "$BEFORE" ;;
both)  # one machine, one call: before, after, before again (host-bound eager rows drift between runs)
  (cd "$BEFORE" && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 -m pytest -q -x tests/models/test_models_gpu.py \
    -k "compressed_triton_backend" 2>&1 | tail -3 | tee "$OUT/tests_gpu_before.log")
  timeout 100 python3 -m pytest -q tests/models/test_models_gpu.py tests/models/test_patching.py 2>&1 | tail -4 \
    | tee "$OUT/tests_gpu_after.log"
  bench before "$BEFORE"; bench after "$PWD"; bench before2 "$BEFORE" ;;
esac
