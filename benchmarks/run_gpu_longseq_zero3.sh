#!/usr/bin/env bash
# Issue 7's multi-GPU part in one device call: launch/longseq.py under accelerate + DeepSpeed ZeRO-3
# on 2 H200s (kind nvidia-h200-x2), Llama-2-7B shape with random weights, LongLoRA recipe, 3 steps
# per point, PEFT LoRA + checkpointing against hyclora full_fuse 2-bit + S²-Attn + checkpointing with
# 8-bit boundaries; per-rank peak memory and tokens/s come from each run's summary.json.
#   ../shared/gpu/stage.sh long-docs llama2-tokenizer-32k        # once, on the dev machine
#   bash benchmarks/run_gpu_longseq_zero3.sh                      # on the device, carry [".whl", ".data"]
# CONTEXTS (default "32768 65536") and NPROC (2) override; results under $OUT/zero3-<variant>-<context>/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
[ -d .data/long-docs ] && [ -d .data/llama2-tokenizer-32k ] || { echo "stage long-docs and llama2-tokenizer-32k first"; exit 1; }
python3 - "$OUT/llama7b" <<'PY'
import sys
from transformers import LlamaConfig
LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096).save_pretrained(sys.argv[1])
PY
NPROC=${NPROC:-2}
for ctx in ${CONTEXTS:-32768 65536}; do
  for variant in peft hyclora; do
    extra=()
    [ "$variant" = hyclora ] && extra=(--use_hyclora true --layer_type intra_inter_full_fuse --q_bit 2 --checkpoint_boundary_bits 8)
    dir="$OUT/zero3-$variant-$ctx"
    timeout 280 accelerate launch --config_file "launch/zero3_${NPROC}gpu.yaml" launch/longseq.py \
      --config_name "$OUT/llama7b" --tokenizer_name .data/llama2-tokenizer-32k --dataset .data/long-docs \
      --seq_len "$ctx" --max_steps 3 --gradient_checkpointing true --save_adapter false --output_dir "$dir" \
      "${extra[@]}" > "$dir.log" 2>&1
    echo "$variant $ctx: exit $?"; grep -A12 "== summary ==" "$dir.log" | head -14
  done
done
