"""Evaluate a base model or a saved LoRA adapter; same as ``python -m hyclora.eval``.

    python examples/evaluate.py --task gsm8k --adapter_path output/gsm8k --data ../shared/data/gsm8k \\
        --max_samples 200
    python examples/evaluate.py --task multitask --adapter_path output/multitask \\
        --data ../shared/data/llm-adapters-math/dataset --eval_sets gsm8k,SVAMP,mawps,AQuA
    python examples/evaluate.py --task wikitext2 --model_name_or_path meta-llama/Llama-2-7b-hf \\
        --data ../shared/data/wikitext-2 --max_length 1024

Prints a table and writes <adapter_path>/eval_<task>.json (+ .predictions.jsonl).
"""

import os
import sys

# Run as a script, this folder is sys.path[0] and this very file would shadow the `evaluate`
# library that the metrics need; drop the folder before anything imports `evaluate`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from hyclora.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
