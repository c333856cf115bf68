#!/usr/bin/env bash
# Issue 21 on the GPU: the restructured tree against the tree before it ($BEFORE, e.g.
# `git archive 5322174 hyclora benchmarks | tar -x -C .gpu_ab/before`), one machine, one call:
# with TESTS=1 the GPU tests of this tree ($AFTER, default the checkout), then bench_cuda_graphs at 4x512 (PEFT LoRA, hyclora eager, graphed)
# and bench_qlora at 4x512 (PEFT QLoRA, hyclora QLoRA, sdpa) from before, after and before again
# (host-bound eager numbers drift between runs).
set -uo pipefail
OUT=${OUT:-out}; BEFORE=${BEFORE:-.gpu_ab/before}; AFTER=${AFTER:-$PWD}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
[ "${TESTS:-0}" = 1 ] && (cd "$AFTER" && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/test_cuda_graphs.py tests/models/test_models_gpu.py tests/ops/test_rope_triton_cuda.py 2>&1 | tail -8 \
  | tee "$OUT/tests_gpu_after.log")
graphs() {  # $1: label, $2: tree: PEFT LoRA, hyclora eager and graphed at 4x512
  mkdir -p "$OUT/$1"
  (cd "$2" && export PYTHONPATH=/tmp/site:$PWD && OUT=$OUT/$1 timeout 110 python3 benchmarks/bench_cuda_graphs.py \
    --shapes 4x512 2>&1 | grep -v Warning | tee "$OUT/cuda_graphs_$1.log" | grep "^|")
}
qlora() {  # $1: label, $2: tree: PEFT QLoRA and hyclora on the NF4 model, sdpa, 4x512
  mkdir -p "$OUT/$1"
  (cd "$2" && export PYTHONPATH=/tmp/site:$PWD && timeout 110 python3 benchmarks/bench_qlora.py --bs 4 --seq 512 \
    --attn sdpa --no_gc --hyclora intra_inter_full_fuse:2 --out "$OUT/$1" 2>&1 | grep -v Warning \
    | tee "$OUT/qlora_$1.log" | grep "^|")
}
graphs before "$BEFORE"; graphs after "$AFTER"; [ "${AGAIN:-1}" = 1 ] && graphs before2 "$BEFORE"
qlora before "$BEFORE"; qlora after "$AFTER"
