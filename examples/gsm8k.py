"""Fine-tune a causal LM on GSM8K with LoRA (+ hyclora), then score zero-shot exact match.

Recipe (paper Table 8): lr 3e-4, max length 512, batch 4 x grad-acc 4, 6 epochs, cosine, warmup
3%, weight decay 0.1, LoRA r = alpha = 16 on all seven linears. The prompt is the question plus
"Answer the above question. First think step by step and then answer the final number."; the
target is the solution ending "The final answer is: <n>"; prompt tokens carry no loss.

    # the paper's setting: NF4 base (QLoRA), bf16, hyclora intra_inter at 2 bits
    python examples/gsm8k.py --model_name_or_path meta-llama/Llama-2-7b-hf --load_in_4bit --bf16 \\
        --use_hyclora --layer_type intra_inter --q_bit 2 --output_dir output/gsm8k
    # several GPUs with DeepSpeed ZeRO-2
    deepspeed --num_gpus 4 examples/gsm8k.py --deepspeed ds_configs/zero2.json --bf16 \\
        --model_name_or_path meta-llama/Llama-2-7b-hf --output_dir output/gsm8k
    # offline, local files, plain LoRA, a quick look
    python examples/gsm8k.py --model_name_or_path ../shared/data/tinyllamas-stories260K/hf \\
        --data ../shared/data/gsm8k --use_hyclora false --max_steps 20 --max_generate_samples 20
    # no model or data at all: random tiny Llama on generated word problems
    python examples/gsm8k.py --model_name_or_path tiny-random-llama --data synthetic \\
        --use_hyclora false --max_steps 10 --max_generate_samples 8 --max_new_tokens 32

Evaluate a saved adapter later:
``python -m hyclora.eval --task gsm8k --adapter_path output/gsm8k --data openai/gsm8k``.
"""

import os
import sys

# Run as a script, this folder is sys.path[0] and examples/evaluate.py would shadow the
# `evaluate` library that the metrics need; drop the folder before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from hyclora.training import parse_finetune_args, run_finetune  # noqa: E402


def main(argv=None):
    args = parse_finetune_args("gsm8k", sys.argv[1:] if argv is None else argv)
    return run_finetune(args)


if __name__ == "__main__":
    main()
