#!/usr/bin/env bash
# Issue 23 on the GPU, one call: examples/gsm8k.py on real GSM8K at the Llama-2-7B shape (random bf16
# weights written once with save_pretrained, the Llama-2 tokenizer), bf16, $STEPS optimizer steps of
# 4 examples or 4 packed rows (gradient accumulation 1), one process per run:
#   peft_padded     PEFT LoRA, padded batches          (--use_hyclora false --packing false)
#   hyclora         hyclora with the example's defaults (packing + CUDA graphs where they replay)
#   hyclora_warm    the same again, 5 steps: the first step with warm Triton / tuning caches
#   hyclora_again   the same again, all $STEPS steps: a whole run with warm caches
#   peft_packed     PEFT LoRA with the same packing    (--use_hyclora false --packing true)
#   hyclora_padded  hyclora, padded batches (eager)    (--packing false)
# ARGS: more arguments for every run (e.g. "--attn_implementation sdpa"); HYARGS: for the hyclora runs
# (e.g. "--layer_type intra_inter_full_fuse --q_bit 2", README's speed recipe).
# Needs ../shared/gpu/stage.sh gsm8k llama2-tokenizer-32k and the trl wheel in .whl; carry [".whl", ".data"].
# The table (non-padding tokens/s over the whole run and after the first step, first step, peak above
# the weights: allocated, with the graphs' pool, reserved) goes to $OUT/gsm8k.md; each run's log and results.json beside it.
set -uo pipefail
OUT=$(realpath -m "${OUT:-out}"); STEPS=${STEPS:-200}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; git log -1 --format=%h 2>/dev/null; } | tee "$OUT/env.txt"
MODEL=/tmp/llama7b
[ -d "$MODEL" ] || python3 - "$MODEL" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
PY
run() {  # name, seconds, extra args
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 examples/gsm8k.py --model_name_or_path "$MODEL" \
    --tokenizer_name_or_path .data/llama2-tokenizer-32k --data .data/gsm8k --bf16 true --max_steps "$STEPS" \
    --gradient_accumulation_steps 1 --save_strategy no --max_eval_samples 0 --max_generate_samples 0 \
    --logging_steps 50 --output_dir "/tmp/gsm8k/$name" --results_file "$OUT/$name.json" ${ARGS:-} "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"; grep -A16 "training summary" "$OUT/$name.log" | grep -E "tokens_per_s|first_step|peak_above" \
    | tr -s ' ' | paste -sd' '
}
for name in ${RUNS:-hyclora hyclora_warm peft_padded peft_packed hyclora_padded}; do
  case $name in
    hyclora) run hyclora 200 ${HYARGS:-} ;;
    hyclora_warm) STEPS=5 run hyclora_warm 90 ${HYARGS:-} ;;
    hyclora_again) run hyclora_again 150 ${HYARGS:-} ;;
    peft_padded) run peft_padded 150 --use_hyclora false --packing false ;;
    peft_packed) run peft_packed 150 --use_hyclora false --packing true ;;
    hyclora_padded) run hyclora_padded 200 --packing false ${HYARGS:-} ;;
  esac
done
python3 - "$OUT" <<'PY' | tee "$OUT/gsm8k.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text())["metrics"] for p in sorted(out.glob("*.json")) if p.stem != "env"}
base = {"padded": runs.get("peft_padded", {}), "packed": runs.get("peft_packed", {})}
def ratio(m, ref, key):
    return f"{m[key] / ref[key]:.2f}" if m.get(key) and ref.get(key) else "n/a"
print("| run | steps | non-pad tok/s (run) | after step 1 | x PEFT padded (run) | x PEFT packed (run) | "
      "first step s | peak above weights GiB | x less than PEFT padded | with graph pool GiB | reserved GiB | graphs |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, m in runs.items():
    peak, ref_peak = m.get("cuda_peak_above_static_gb"), base["padded"].get("cuda_peak_above_static_gb")
    print(f"| {name} | {m.get('train_steps')} | {m.get('tokens_per_s') or 0:.0f} | {m.get('tokens_per_s_after_first') or 0:.0f} | "
          f"{ratio(m, base['padded'], 'tokens_per_s')} | {ratio(m, base['packed'], 'tokens_per_s')} | "
          f"{m.get('first_step_seconds', float('nan')):.1f} | {peak if peak is None else round(peak, 2)} | "
          f"{ref_peak / peak if peak and ref_peak else float('nan'):.1f} | "
          f"{m.get('cuda_peak_with_graph_pool_above_static_gb', float('nan')):.2f} | "
          f"{m.get('cuda_peak_reserved_gb', float('nan')) - m.get('cuda_static_gb', 0):.2f} | {m.get('cuda_graphs', '')} |")
PY
exit 0
