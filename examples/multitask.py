"""Arithmetic multitask (LLM-Adapters Math10K recipe): fine-tune on math_10k.json (here the
smaller math_data.json stand-in) with the Alpaca prompt, then score greedy generations on
gsm8k, SVAMP, mawps, AQuA (the paper's four) and AddSub, MultiArith, SingleEq.

Recipe (paper Table 8): lr 3e-4, max length 512, batch 4 x grad-acc 4, 12 epochs (the reference
script ran 3), warmup 10%, max grad norm 1, LoRA r = alpha = 16. Numeric answers count when the
last number is within 1e-3 of the gold answer; AQuA by its letter.

    python examples/multitask.py --model_name_or_path meta-llama/Llama-2-7b-hf --load_in_4bit \\
        --bf16 --data LLM-Adapters/ft-training_set/math_10k.json \\
        --eval_data LLM-Adapters/dataset --use_hyclora --layer_type intra_inter --q_bit 4
    python examples/multitask.py --model_name_or_path ../shared/data/tinyllamas-stories260K/hf \\
        --data ../shared/data/llm-adapters-math/ft-training_set/math_data.json --max_length 512 \\
        --use_hyclora false --max_steps 20 --max_generate_samples 10 --max_new_tokens 64

Evaluate a saved adapter: ``python -m hyclora.eval --task multitask --adapter_path output/multitask
--data LLM-Adapters/dataset``.
"""

import os
import sys

# Run as a script, this folder is sys.path[0] and examples/evaluate.py would shadow the
# `evaluate` library that the metrics need; drop the folder before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from hyclora.training import parse_finetune_args, run_finetune  # noqa: E402


def main(argv=None):
    args = parse_finetune_args("multitask", sys.argv[1:] if argv is None else argv)
    return run_finetune(args)


if __name__ == "__main__":
    main()
