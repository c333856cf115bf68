#!/usr/bin/env bash
# Issue 23 on the GPU, one call: whole runs (bench_whole_run: one process per variant, AdamW, $STEPS
# steps) at 4x512 (PEFT, hyclora graphed with the defaults, graphed with recalibrate_mode=reset,
# eager) and 1x4096 (PEFT, graphed), then the real-capture GPU tests of the CUDA graphs (TESTS=1).
# RUN_512=0 / RUN_4096=0 / COLD=0 leave a part out; COLD_SHAPES: the shapes the cold run compiles for
# (COLD_LIMIT seconds, default 150);
# TEST_K: a pytest -k selection of the GPU tests; PROFILE=1: a cProfile of a graphed run's first steps and
# torch.profiler tables of its first and capture steps;
# MEMORY=1: the allocations live at the peak of a graphed run's first 5 steps and of its steady steps 4-6
# ($OUT/memory/, $OUT/memory_steady/).
set -uo pipefail
OUT=$(realpath -m "${OUT:-out}"); STEPS=${STEPS:-200}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
cd "${TREE:-.}" && export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; } | tee "$OUT/env.txt"
# the whole test log comes back (a failure's traceback with it); its summary is printed
[ "${TESTS:-1}" = 1 ] && { timeout "${TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu \
  -k "${TEST_K:-}" tests/test_cuda_graphs.py 2>&1 | grep -v Warning > "$OUT/tests_gpu_cuda_graphs.log"
  tail -6 "$OUT/tests_gpu_cuda_graphs.log"; }
# a short hyclora run first (8 steps: past calibration and the capture, so the frozen path compiles too): its
# first step is the cold one (Triton compiles, hyclora tunes and caches);
# the measured runs after it start with warm caches, as a user's second run does
[ "${COLD:-1}" = 1 ] && timeout "${COLD_LIMIT:-150}" python3 benchmarks/bench_whole_run.py --shapes ${COLD_SHAPES:-4x512} --steps 8 --variants graphed --out /tmp/bench/cold 2>&1 \
  | grep -v Warning | tee "$OUT/cold.log" | grep "^|"
[ "${RUN_512:-1}" = 1 ] && timeout "${LIMIT_512:-330}" python3 benchmarks/bench_whole_run.py --shapes 4x512 --steps "$STEPS" \
  --variants ${VARIANTS_512:-peft graphed graphed_reset eager} --out /tmp/bench/whole_run_4x512 2>&1 | grep -v Warning \
  | tee "$OUT/whole_run_4x512.log" | grep "^|"
[ "${RUN_4096:-1}" = 1 ] && timeout "${LIMIT_4096:-170}" python3 benchmarks/bench_whole_run.py --shapes 1x4096 --steps "$STEPS" \
  --variants ${VARIANTS_4096:-peft graphed} --out /tmp/bench/whole_run_1x4096 2>&1 | grep -v Warning \
  | tee "$OUT/whole_run_1x4096.log" | grep "^|"
# where the first steps' host time goes (cProfile of steps 1-2 of a graphed run, warm caches)
# (printed too: the device tool brings back a limited number of files)
[ "${PROFILE:-0}" = 1 ] && timeout 90 python3 benchmarks/bench_whole_run.py --shapes 4x512 --steps 3 --variants graphed \
  --profile_steps 2 --out "$OUT/profile" 2>&1 | grep -v Warning | grep "^|" \
  && grep -A50 "Ordered by" "$OUT"/profile/profile_*.txt | cut -c1-170
# torch.profiler tables of the first step and the capture step (host time by op: instantiation, syncs, launches)
[ "${PROFILE:-0}" = 1 ] && timeout 90 python3 benchmarks/bench_whole_run.py --shapes 4x512 --steps 3 --variants graphed \
  --torch_profile_steps 0 1 --out "$OUT/timeline" 2>&1 | grep -v Warning | grep "^|" \
  && grep -A36 "^TORCH PROFILE" "$OUT"/timeline/profile_*.txt | cut -c1-170
[ "${MEMORY:-0}" = 1 ] && timeout 120 python3 benchmarks/bench_whole_run.py --shapes 4x512 --steps 6 --variants graphed \
  --memory_trace_steps 5 --out "$OUT/memory" 2>&1 | grep -v Warning | grep "^|" \
  && grep -A26 "^MEMORY" "$OUT"/memory/profile_*.txt | cut -c1-200
[ "${MEMORY:-0}" = 1 ] && timeout 120 python3 benchmarks/bench_whole_run.py --shapes 4x512 --steps 7 --variants graphed \
  --memory_trace_from 4 --memory_trace_steps 7 --out "$OUT/memory_steady" 2>&1 | grep -v Warning | grep "^|" \
  && grep -A26 "^MEMORY" "$OUT"/memory_steady/profile_*.txt | cut -c1-200
exit 0
