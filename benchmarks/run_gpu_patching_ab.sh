#!/usr/bin/env bash
# Issue 19 on the GPU: the class-swap patching (hyclora.models.patching) against the tree before
# it, same machine: the device tests of graphs and models, then bench_cuda_graphs at 4x512 (PEFT
# LoRA, hyclora eager, graphed) from each tree. PART=after (this tree) or PART=before (the tree
# unpacked in $BEFORE, e.g. `git archive 3809bcf hyclora benchmarks | tar -x -C .gpu_ab/before`).
set -uo pipefail
OUT=${OUT:-out}; PART=${PART:-after}; BEFORE=${BEFORE:-.gpu_ab/before}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; python3 -c "import transformers; print('transformers', transformers.__version__)"; } | tee "$OUT/env.txt"
if [ "$PART" = after ]; then
  timeout 200 python3 -m pytest -q tests/test_cuda_graphs.py tests/models/test_models_gpu.py tests/models/test_patching.py \
    tests/models/test_nonfinite_after_layers_and_hooks.py 2>&1 | tail -6 | tee "$OUT/tests.log"
  mkdir -p "$OUT/after"
  OUT=$OUT/after timeout 300 python3 benchmarks/bench_cuda_graphs.py --shapes 4x512 2>&1 | grep -v Warning \
    | tee "$OUT/cuda_graphs_after.log" | grep "^|"
else
  mkdir -p "$OUT/before"
  (cd "$BEFORE" && export PYTHONPATH=/tmp/site:$PWD && OUT=$OUT/before timeout 300 python3 benchmarks/bench_cuda_graphs.py \
    --shapes 4x512 2>&1 | grep -v Warning | tee "$OUT/cuda_graphs_before.log" | grep "^|")
fi
