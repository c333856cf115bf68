#!/usr/bin/env bash
# The checks BENCHMARKS.md run 8 left open, in device calls of under 10 minutes each (H200).
# On the lent H200, after staging the wheels (../shared/gpu/README.md), carry [".whl"]:
#   bash benchmarks/run_gpu_followup.sh graphs    # tests + CUDA-graph steps (about 9 minutes)
#   bash benchmarks/run_gpu_followup.sh longseq   # 8k/16k: hyclora + S² graphed / eager / GC vs Liger + GC
# Logs and CSV under $OUT (or ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-graphs}
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
if [ -z "${SUITE_SKIP_PIP:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; } | tee "$OUT/env.txt"
case "$PART" in
graphs)
  # 1. the CUDA-graph tests after graph_layer_chain's restructuring, and the kernel tests on the device
  timeout 150 python3 -m pytest -q tests/test_cuda_graphs.py tests/ops/test_lora_kernels.py 2>&1 | tail -15 \
    | tee "$OUT/tests.log"
  # 2. 4x512: PEFT, GC, eager, the LoRA-ops A/B on shared statistics, graphed
  mkdir -p "$OUT/cg4x512"
  OUT=$OUT/cg4x512 timeout 220 python3 benchmarks/bench_cuda_graphs.py --shapes 4x512 --lora_ops_ab 2>&1 \
    | grep -v Warning | tee "$OUT/cuda_graphs_4x512.log" | grep "^|"
  # 3. 1x4096 with Liger's kernels in the same process (issue 4's stretch)
  mkdir -p "$OUT/cg1x4096"
  OUT=$OUT/cg1x4096 timeout 150 python3 benchmarks/bench_cuda_graphs.py --shapes 1x4096 --liger 2>&1 \
    | grep -v Warning | tee "$OUT/cuda_graphs_1x4096.log" | grep "^|"
  # 4. the remaining device tests (autotuned quant kernels, fused SwiGLU)
  timeout 60 python3 -m pytest -q -x tests/quant/test_quant_triton.py tests/ops/test_fused_swiglu.py 2>&1 | tail -8 \
    | tee "$OUT/tests_quant_swiglu.log"
  ;;
longseq)
  # issue 7 at 8k/16k: S²-Attn without checkpointing, graphed and eager, and with checkpointing,
  # against Liger + checkpointing (last: it patches transformers process-wide), same process
  mkdir -p "$OUT/ls"
  OUT=$OUT/ls timeout 540 python3 benchmarks/bench_longseq.py --methods hyclora_s2_graphed,hyclora_s2,hyclora_s2_gc,liger_gc \
    --layer_type intra_inter_full_fuse --gc_boundary_bits 8 --contexts 8192,16384 --search false --warmup 2 \
    --steps 2 --time_budget 420 2>&1 | grep -v Warning | tee "$OUT/longseq.log" | grep "^|\|dispatch"
  ;;
*)
  echo "usage: $0 [graphs|longseq]" >&2; exit 2 ;;
esac
