"""Fine-tune a causal LM on WikiText-2 (1024-token blocks) with LoRA (+ hyclora); report
perplexity on the test split.

Recipe (paper Table 8): lr 3e-4, blocks of 1024 tokens, batch 4 x grad-acc 4, 3 epochs, cosine,
warmup 3%, weight decay 0.1, LoRA r = alpha = 16. Perplexity = exp(token-weighted mean NLL) over
non-overlapping blocks (HF run_clm style).

    python examples/wikitext2.py --model_name_or_path meta-llama/Llama-2-7b-hf --load_in_4bit \\
        --bf16 --use_hyclora --layer_type intra_inter --q_bit 2      # hub: wikitext-2-raw-v1
    # local copy in ../shared/data has no train split: this fine-tunes on VALID, evaluates on TEST
    python examples/wikitext2.py --model_name_or_path ../shared/data/tinyllamas-stories260K/hf \\
        --data ../shared/data/wikitext-2 --max_length 512 --use_hyclora false --max_steps 20

Evaluate a saved adapter: ``python -m hyclora.eval --task wikitext2 --adapter_path output/wikitext2``.
"""

import os
import sys

# Run as a script, this folder is sys.path[0] and examples/evaluate.py would shadow the
# `evaluate` library that the metrics need; drop the folder before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from hyclora.training import parse_finetune_args, run_finetune  # noqa: E402


def main(argv=None):
    args = parse_finetune_args("wikitext2", sys.argv[1:] if argv is None else argv)
    return run_finetune(args)


if __name__ == "__main__":
    main()
