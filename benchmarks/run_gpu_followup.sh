#!/usr/bin/env bash
# CUDA-graph, long-context and launcher checks, one part per device call of under 10 minutes.
# On the GPU machine, after staging the wheels (../shared/gpu/README.md), carry [".whl"]:
#   bash benchmarks/run_gpu_followup.sh graphs    # tests + CUDA-graph steps
#   bash benchmarks/run_gpu_followup.sh longseq   # 8k/16k: hyclora + S² graphed / eager / GC vs Liger + GC
#   bash benchmarks/run_gpu_followup.sh launcher  # launch/longseq.py with/without --cuda_graphs at 7B 8k, + device tests
#     (carry [".whl", ".data"] after ../shared/gpu/stage.sh long-docs llama2-tokenizer-32k)
#   bash benchmarks/run_gpu_followup.sh eager_kernels  # 8k/16k eager S²: LoRA kernels vs the default (peak, tok/s)
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
  # 3. 1x4096 with Liger's kernels in the same process
  mkdir -p "$OUT/cg1x4096"
  OUT=$OUT/cg1x4096 timeout 150 python3 benchmarks/bench_cuda_graphs.py --shapes 1x4096 --liger 2>&1 \
    | grep -v Warning | tee "$OUT/cuda_graphs_1x4096.log" | grep "^|"
  # 4. the remaining device tests (autotuned quant kernels, fused SwiGLU)
  timeout 60 python3 -m pytest -q -x tests/quant/test_quant_triton.py tests/ops/test_fused_swiglu.py 2>&1 | tail -8 \
    | tee "$OUT/tests_quant_swiglu.log"
  ;;
longseq)
  # 8k/16k: S²-Attn without checkpointing, graphed and eager, and with checkpointing,
  # against Liger + checkpointing (last: it patches transformers process-wide), same process
  mkdir -p "$OUT/ls"
  OUT=$OUT/ls timeout 540 python3 benchmarks/bench_longseq.py --methods hyclora_s2_graphed,hyclora_s2,hyclora_s2_gc,liger_gc \
    --layer_type intra_inter_full_fuse --gc_boundary_bits 8 --contexts 8192,16384 --search false --warmup 2 \
    --steps 2 --time_budget 420 2>&1 | grep -v Warning | tee "$OUT/longseq.log" | grep "^|\|dispatch"
  ;;
launcher)
  # the user's way to the 8k rows above: launch/longseq.py (accelerate loop, bf16 autocast, LongLoRA
  # recipe) with and without --cuda_graphs on the 7B shape, 6 steps each; summary.json has tok/s and peak
  [ -d .data/long-docs ] && [ -d .data/llama2-tokenizer-32k ] || { echo "stage long-docs and llama2-tokenizer-32k"; exit 1; }
  python3 - "$OUT/llama7b" <<'PY'
import sys
from transformers import LlamaConfig
LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096).save_pretrained(sys.argv[1])
PY
  for ctx in ${CONTEXTS:-8192}; do  # the 7B model is built on the host first: ~2 runs fit in one call
    for graphs in true false; do
      dir="$OUT/launcher-$ctx-graphs-$graphs"
      timeout 200 python3 launch/longseq.py --config_name "$OUT/llama7b" --tokenizer_name .data/llama2-tokenizer-32k \
        --dataset .data/long-docs --seq_len "$ctx" --max_steps 6 --gradient_accumulation_steps 1 --lora_r 16 \
        --lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --use_hyclora true \
        --layer_type intra_inter_full_fuse --q_bit 2 --iteration_threshold 2 --cuda_graphs "$graphs" \
        --save_adapter false --output_dir "$dir" > "$dir.log" 2>&1
      echo "ctx $ctx graphs $graphs: exit $?"; grep -A4 "== summary ==" "$dir.log"
    done
  done
  # the autotuned kernels' device tests (autotuning needs more than a minute)
  timeout 240 python3 -m pytest -q tests/quant/test_quant_triton.py tests/ops/test_fused_swiglu.py 2>&1 | tail -8 \
    | tee "$OUT/tests_quant_swiglu.log"
  ;;
eager_kernels)
  # the eager S²-Attn step with the Triton LoRA kernels launched at any length (the graphed step's
  # LoRA path) against the default: speed and peak at long lengths. Two processes, same method.
  for ops in kernels fused; do
    flags=(); [ "$ops" = kernels ] && flags=(--lora_kernels_min_tokens 0)
    mkdir -p "$OUT/ek-$ops"
    OUT=$OUT/ek-$ops timeout 250 python3 benchmarks/bench_longseq.py --methods hyclora_s2 "${flags[@]}" \
      --layer_type intra_inter_full_fuse --contexts 8192,16384 --search false --warmup 2 --steps 2 --time_budget 200 \
      2>&1 | grep -v Warning | tee "$OUT/eager_kernels_$ops.log" | grep "^|"
  done
  ;;
*)
  echo "usage: $0 [graphs|longseq|launcher|eager_kernels]" >&2; exit 2 ;;
esac
