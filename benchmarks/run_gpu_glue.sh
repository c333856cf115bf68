#!/usr/bin/env bash
# GLUE parity (benchmarks/bench_glue_parity.py) on the GPU machine, in one call:
#   here:  bash benchmarks/stage_glue_gpu.sh          (MiniLM fp16 + GLUE TSVs -> .data, wheels -> .whl)
#   then:  run, carry [".whl", ".data"], command: bash benchmarks/run_gpu_glue.sh [extra bench flags]
# Writes $OUT/glue_parity.{csv,md,log}. All 48 runs (rte,mrpc,cola,sst2 x lora,ii4,ii2,q2 x seeds
# 42,43,44) in one process, seed-major, fp32 weights with TF32 matmuls; the bench starts no run
# past GLUE_BUDGET_S (default 450 s) and `timeout` stops it at 530 s at the latest (the call's limit
# is 600 s), keeping every finished run in the CSV. Extra flags go to the bench and win.
set -uo pipefail
OUT=${OUT:-/tmp/glue_out}
mkdir -p "$OUT"
if [ -z "${GLUE_SKIP_PIP:-}" ]; then  # GLUE_SKIP_PIP=1: a CPU smoke test in the project venv
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
[ -d .data/minilm ] && [ -d .data/glue ] || { echo "no .data/minilm or .data/glue: run benchmarks/stage_glue_gpu.sh and carry .data" >&2; exit 1; }
export HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the commit: git's when the copy has .git, else the one stage_glue_gpu.sh recorded
export HYCLORA_COMMIT=${HYCLORA_COMMIT:-$(git describe --always --dirty 2>/dev/null || cat .data/COMMIT 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/glue_parity.log"
CONFIGS=${GLUE_CONFIGS:-lora,ii4,ii2,q2}
# GLUE_PARALLEL=1: one process per config, side by side on the GPU (MiniLM uses a sliver of an
# H200; the runs are bound by Python and the data loader), each writing its own CSV, merged below.
run_bench() {  # $1 = configs, $2 = results folder (glue_parity.csv in it)
  timeout --kill-after=15 530 python3 benchmarks/bench_glue_parity.py \
    --model .data/minilm --data .data/glue --tasks rte,mrpc,cola,sst2 --configs "$1" \
    --seeds 42,43,44 --max_train_samples 2000 --epochs 1 --batch_size 16 --lr 5e-4 --max_length 128 \
    --precision fp32 --device cuda --threads 4 --time_budget "${GLUE_BUDGET_S:-450}" \
    --work_dir "/tmp/glue_work_$1" --out "$2" "${EXTRA[@]}" \
    2>&1 | grep --line-buffered -v -e "Warning" -e "warnings.warn" | tee -a "$OUT/glue_parity.log"
  return "${PIPESTATUS[0]}"
}
EXTRA=("$@")
if [ -n "${GLUE_PARALLEL:-}" ]; then
  pids=()
  for c in ${CONFIGS//,/ }; do run_bench "$c" "$OUT/glue-$c" & pids+=($!); done
  status=0
  for p in "${pids[@]}"; do wait "$p" || status=$?; done
  # merge: one header, then every config's rows
  first=1
  for c in ${CONFIGS//,/ }; do
    f="$OUT/glue-$c/glue_parity.csv"; [ -f "$f" ] || continue
    if [ $first -eq 1 ]; then cat "$f"; first=0; else tail -n +2 "$f"; fi
  done > "$OUT/glue_parity.csv"
  [ $first -eq 1 ] && rm -f "$OUT/glue_parity.csv"
else
  run_bench "$CONFIGS" "$OUT"; status=$?
fi
# the table of whatever finished (also after a timeout, when the bench could not write it)
if [ -f "$OUT/glue_parity.csv" ]; then
  python3 benchmarks/bench_glue_parity.py --report --out "$OUT" > "$OUT/glue_parity.md.tmp" \
    && mv "$OUT/glue_parity.md.tmp" "$OUT/glue_parity.md"
  cat "$OUT/glue_parity.md"
fi
echo "bench exit status $status (124: stopped by timeout, partial results kept)"
exit "$status"
