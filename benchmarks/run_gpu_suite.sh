#!/usr/bin/env bash
# All GPU measurements of one session in one call (a machine start costs minutes of the budget).
# Usage on the lent H200 (after staging the wheels, see ../shared/gpu/README.md):
#   bash benchmarks/run_gpu_suite.sh            # writes logs/CSV under $OUT (or ./out)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
cd "$(dirname "$0")/.."
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; } | tee "$OUT/env.txt"
python benchmarks/bench_quant.py --no-sweep 2>&1 | tee "$OUT/bench_quant.log" | grep -E "^\| \(|codes ==" | tail -30
python benchmarks/bench_fused.py --shapes 4x512 --bits 2 --profile 2>&1 | grep -v Warning | tee "$OUT/bench_fused.log" | tail -40
python benchmarks/bench_memory_throughput.py --shapes 4x512,1x4096 --eager_shapes 4x512 \
  --layer_types "${LAYER_TYPES:-baseline,intra,intra_inter,intra_inter_full_fuse}" --bits "${BITS:-2,4}" \
  2>&1 | grep -v Warning | tee "$OUT/bench_mem.log" | tail -45
