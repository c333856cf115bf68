#!/usr/bin/env bash
# The single-GPU measurements of one session in one call (a machine start costs minutes).
# On the GPU machine, after staging the wheels (../shared/gpu/README.md), carry [".whl"]:
#   bash benchmarks/run_gpu_suite.sh            # writes logs/CSV/markdown under $OUT (or ./out)
# SUITE_SKIP_PIP=1 skips the wheel install; LAYER_TYPES / BITS narrow the memory/speed table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
if [ -z "${SUITE_SKIP_PIP:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; git describe --always --dirty 2>/dev/null; } | tee "$OUT/env.txt"
# 1. host vs device time of one step, syncs and launches (PEFT LoRA vs full_fuse 2-bit)
timeout 170 python3 benchmarks/profile_step.py --count_ops 2>&1 | grep -v Warning | tee "$OUT/profile_step.log" | tail -30
# 2. fused kernels against op-by-op, with a per-kernel profile of one full_fuse step
timeout 90 python3 benchmarks/bench_fused.py --shapes 4x512 --bits 2 4 --profile 2>&1 | grep -v Warning \
  | tee "$OUT/bench_fused.log" | tail -40
# 3. memory and tokens/s against PEFT LoRA and gradient checkpointing (same process)
timeout 280 python3 benchmarks/bench_memory_throughput.py --shapes 4x512,1x4096 --eager_shapes 4x512 \
  --layer_types "${LAYER_TYPES:-intra_inter,intra_inter_full_fuse}" --bits "${BITS:-2,4}" --rounds "${ROUNDS:-1}" \
  2>&1 | grep -v Warning | tee "$OUT/bench_mem.log" | tail -45
