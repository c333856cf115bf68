"""Command line: evaluate a base model, or a base model plus a saved LoRA adapter.

    python -m hyclora.eval --task gsm8k --adapter_path output/gsm8k --data openai/gsm8k
    python -m hyclora.eval --task wikitext2 --model_name_or_path meta-llama/Llama-2-7b-hf \\
        --data ../shared/data/wikitext-2
    python -m hyclora.eval --task multitask --adapter_path output/multitask \\
        --data ../shared/data/llm-adapters-math/dataset --max_samples 100

Writes a results JSON (and the predictions as JSON lines beside it) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)
TASKS = ("gsm8k", "wikitext2", "multitask")


def build_parser() -> argparse.ArgumentParser:
    from hyclora.config import str2bool

    p = argparse.ArgumentParser(prog="python -m hyclora.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--adapter_path", default=None,
                   help="PEFT adapter folder (e.g. an example's output_dir or a checkpoint-*)")
    p.add_argument("--model_name_or_path", default=None,
                   help="base model (default: base_model_name_or_path of the adapter)")
    p.add_argument("--tokenizer_name_or_path", default=None,
                   help="default: the adapter folder when it holds a tokenizer, else the model")
    p.add_argument("--gguf_file", default=None)
    p.add_argument("--load_in_4bit", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--torch_dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--data", default=None,
                   help="gsm8k: hub name/folder/file/synthetic; wikitext2: folder/file/hub; "
                        "multitask: LLM-Adapters dataset/ folder or the training file beside it")
    p.add_argument("--eval_data", default=None, help="explicit evaluation file or folder")
    p.add_argument("--eval_sets", default="gsm8k,SVAMP,mawps,AQuA,AddSub,MultiArith,SingleEq")
    p.add_argument("--max_samples", type=int, default=None, help="first N problems per set")
    p.add_argument("--max_length", type=int, default=1024, help="wikitext2 block size")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 256 (gsm8k), 512 (multitask)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--output", default=None, help="results JSON (default: <adapter or .>/eval_<task>.json)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--progress", type=str2bool, nargs="?", const=True, default=True)
    return p


def _base_from_adapter(adapter_path: str) -> Optional[str]:
    config = os.path.join(adapter_path, "adapter_config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--adapter_path {adapter_path!r} has no adapter_config.json")
    with open(config, encoding="utf-8") as handle:
        return json.load(handle).get("base_model_name_or_path")


def _has_tokenizer(folder: Optional[str]) -> bool:
    return bool(folder) and any(
        os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


def load_model_for_eval(ns):
    """(model, tokenizer) for evaluation: base model, plus the adapter when given."""
    import torch

    from hyclora.training.args import ModelArguments
    from hyclora.training.model import check_model_path, load_base_model, load_tokenizer

    if ns.adapter_path and not os.path.isdir(ns.adapter_path):
        raise FileNotFoundError(f"--adapter_path: folder not found: {ns.adapter_path}")
    base = ns.model_name_or_path or (_base_from_adapter(ns.adapter_path) if ns.adapter_path else None)
    if base is None:
        raise ValueError("pass --model_name_or_path (the adapter does not name its base model)")
    if not ns.model_name_or_path:
        # adapters saved before hyclora stored absolute paths may name a base relative to another folder
        check_model_path(base, f"base_model_name_or_path in {os.path.join(ns.adapter_path, 'adapter_config.json')} "
                               "(pass --model_name_or_path BASE_FOLDER)")
    tok_name = ns.tokenizer_name_or_path or (ns.adapter_path if _has_tokenizer(ns.adapter_path) else None)
    dtype = ns.torch_dtype
    if dtype is None:  # bf16 halves memory on GPUs; CPUs are fastest and exact in fp32
        dtype = "bfloat16" if (ns.device or "").startswith("cuda") or (ns.device is None and torch.cuda.is_available()) else "float32"
    margs = ModelArguments(
        model_name_or_path=base, tokenizer_name_or_path=tok_name, gguf_file=ns.gguf_file,
        load_in_4bit=ns.load_in_4bit, torch_dtype=dtype,
        attn_implementation=ns.attn_implementation,
    )
    tokenizer = load_tokenizer(margs)
    model = load_base_model(margs, SimpleNamespace(bf16=False, fp16=False, gradient_checkpointing=False), tokenizer)
    if ns.adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ns.adapter_path)
    if not ns.load_in_4bit:
        device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
    model.eval()
    return model, tokenizer, base


def run_eval(ns) -> Dict[str, Any]:
    from hyclora.data import (
        build_wikitext_dataset,
        load_gsm8k_records,
        load_math_eval_sets,
        load_wikitext_lines,
        resolve_math_eval_dir,
    )

    from .harness import evaluate_gsm8k, evaluate_math_sets, evaluate_perplexity, format_table, write_results

    model, tokenizer, base = load_model_for_eval(ns)
    predictions: List[Dict[str, Any]] = []
    if ns.task == "gsm8k":
        records = load_gsm8k_records(ns.eval_data or ns.data, "test")
        records = records[: ns.max_samples] if ns.max_samples else records
        results, predictions = evaluate_gsm8k(
            model, tokenizer, records, max_new_tokens=ns.max_new_tokens or 256,
            batch_size=ns.batch_size, progress=ns.progress)
    elif ns.task == "multitask":
        names = [n.strip() for n in ns.eval_sets.split(",") if n.strip()]
        sets = load_math_eval_sets(resolve_math_eval_dir(ns.data, ns.eval_data), names, max_samples=ns.max_samples)
        results, predictions = evaluate_math_sets(
            model, tokenizer, sets, max_new_tokens=ns.max_new_tokens or 512,
            batch_size=ns.batch_size, progress=ns.progress)
    else:
        lines = load_wikitext_lines(ns.eval_data or ns.data, "test")
        dataset = build_wikitext_dataset(tokenizer, lines, ns.max_length)
        if ns.max_samples:
            dataset = dataset.select(range(min(ns.max_samples, len(dataset))))
        results = evaluate_perplexity(model, tokenizer, dataset, batch_size=ns.batch_size, progress=ns.progress)
    title = f"{ns.task}: {base}" + (f" + adapter {ns.adapter_path}" if ns.adapter_path else "")
    print(format_table(results, title=title), flush=True)
    output = ns.output or os.path.join(ns.adapter_path or ".", f"eval_{ns.task}.json")
    write_results(output, {"task": ns.task, "model": base, "adapter": ns.adapter_path,
                           "results": results, "args": vars(ns)}, predictions or None)
    return {"results": results, "output": output}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if ns.batch_size < 1:
        raise SystemExit("--batch_size must be >= 1")
    return run_eval(ns)


__all__ = ["build_parser", "load_model_for_eval", "run_eval", "main"]
