#!/usr/bin/env bash
# Issue 22 on the GPU, one call: per --arch of $ARCHS (7B-class shapes, random bf16 weights) and shape of
# $SHAPES, bench_cuda_graphs (and $EXTRA arguments) with PEFT LoRA, PEFT + GC, hyclora eager and graphed, and Liger last (one
# process per arch and shape: Liger patches transformers process-wide); then bench_lm_loss (4 x 1024,
# vocabularies 32k / 152k / 262k) when LM_LOSS=1, and the GPU tests of the new architectures when TESTS=1.
set -uo pipefail
OUT=$(realpath -m "${OUT:-out}"); ARCHS=${ARCHS:-"qwen2.5-7b qwen3-8b gemma3-4b"}; SHAPES=${SHAPES:-4x512}; LIMIT=${LIMIT:-120}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
cd "${TREE:-.}" && export PYTHONPATH=/tmp/site:$PWD  # TREE: another checkout's tree (e.g. a git archive of HEAD)
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
[ "${LM_LOSS:-1}" = 1 ] && timeout 90 python3 benchmarks/bench_lm_loss.py --out /tmp/bench/lm_loss 2>&1 | grep -v Warning \
  | tee "$OUT/lm_loss.log" | grep "^|"
for arch in $ARCHS; do
  for shape in $SHAPES; do
    # the device returns at most 8 files: the tables go into one log per arch, the CSVs stay there
    OUT=/tmp/bench/$arch-$shape timeout "$LIMIT" python3 benchmarks/bench_cuda_graphs.py --arch "$arch" \
      --shapes "$shape" --liger ${EXTRA:-} 2>&1 | grep -v Warning | tee -a "$OUT/cuda_graphs_$arch.log" | grep "^|"
  done
done
[ "${TESTS:-0}" = 1 ] && timeout "${TEST_LIMIT:-120}" python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/models/test_gemma.py tests/models/test_qwen3.py tests/models/test_architectures.py 2>&1 | tail -8 \
  | tee "$OUT/tests_gpu_architectures.log"
exit 0
