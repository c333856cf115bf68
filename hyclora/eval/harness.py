"""Task-level evaluation: generate, extract, score with the local metrics; tables and JSON.

Results are ``{dataset: {metric: value, ..., "n": examples}}``; accuracies are fractions in
[0, 1] (printed as percentages), losses and perplexities as they are.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hyclora.data.math import answer_type
from hyclora.data.prompts import alpaca_prompt, gsm8k_gold, gsm8k_prompt

from .generation import generate_greedy, perplexity
from .metrics import load_metric

Results = Dict[str, Dict[str, Any]]

# Generation stops: the next question of a self-continuing model, or a new Alpaca block.
GSM8K_STOPS = ("\n\nQuestion:", "Question:", "</s>", "<|im_end|>")
MATH_STOPS = ("### Instruction:", "</s>", "<|im_end|>")


def evaluate_gsm8k(
    model,
    tokenizer,
    records: List[Dict[str, str]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    name: str = "gsm8k",
) -> Tuple[Results, List[Dict[str, Any]]]:
    """Zero-shot GSM8K with the fine-tuning prompt (the paper's protocol; lm-eval's default is
    5-shot with another prompt). Returns (results, per-example predictions)."""
    if not records:
        raise ValueError("evaluate_gsm8k: no records")
    prompts = [gsm8k_prompt(r["question"]) for r in records]
    golds = [gsm8k_gold(r["answer"]) for r in records]
    outputs = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        stop_strings=GSM8K_STOPS, progress=progress, desc=f"generate {name}",
    )
    scores = load_metric("gsm8k_exact_match").compute(predictions=outputs, references=golds)
    scores["n"] = len(records)
    preds = [
        {"question": r["question"], "gold": g, "prediction": o}
        for r, g, o in zip(records, golds, outputs)
    ]
    return {name: scores}, preds


def evaluate_math_sets(
    model,
    tokenizer,
    sets: Dict[str, List[Dict[str, str]]],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = True,
    tolerance: float = 1e-3,
) -> Tuple[Results, List[Dict[str, Any]]]:
    """Greedy generation on each LLM-Adapters set with the Alpaca prompt; numeric answers
    within ``tolerance``, AQuA by letter. Adds an ``average`` row over the sets evaluated."""
    metric = load_metric("math_accuracy")
    results: Results = {}
    preds: List[Dict[str, Any]] = []
    for name, records in sets.items():
        if not records:
            raise ValueError(f"evaluation set {name!r} is empty")
        prompts = [alpaca_prompt(r["instruction"], r.get("input", "") or "") for r in records]
        golds = [str(r["answer"]) for r in records]
        outputs = generate_greedy(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            stop_strings=MATH_STOPS, progress=progress, desc=f"generate {name}",
        )
        scores = metric.compute(
            predictions=outputs, references=golds, answer_type=answer_type(name), tolerance=tolerance
        )
        scores["n"] = len(records)
        results[name] = scores
        preds += [
            {"dataset": name, "instruction": r["instruction"], "gold": g, "prediction": o}
            for r, g, o in zip(records, golds, outputs)
        ]
    if len(results) > 1:
        results["average"] = {
            "accuracy": sum(v["accuracy"] for v in results.values()) / len(results),
            "n": sum(v["n"] for v in results.values()),
        }
    return results, preds


def evaluate_perplexity(model, tokenizer, dataset, *, batch_size: int = 4, progress: bool = True,
                        name: str = "wikitext2") -> Results:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = perplexity(model, dataset, batch_size=batch_size, pad_token_id=pad, progress=progress)
    return {name: {"loss": out["loss"], "perplexity": out["perplexity"], "tokens": out["tokens"],
                   "n": len(dataset)}}


_PERCENT = ("exact_match_strict", "exact_match_flexible", "accuracy")


def format_table(results: Results, title: Optional[str] = None) -> str:
    """A plain-text table: one row per dataset, one column per metric (accuracies in %)."""
    columns: List[str] = []
    for metrics in results.values():
        for key in metrics:
            if key not in columns:
                columns.append(key)
    columns.sort(key=lambda c: (c == "n", c))

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key in _PERCENT:
            return f"{100 * value:.2f}"
        if isinstance(value, float):
            return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.4g}"
        return str(value)

    header = ["dataset"] + [c + (" %" if c in _PERCENT else "") for c in columns]
    rows = [[name] + [cell(c, m.get(c)) for c in columns] for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [title] if title else []
    out += [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


def write_results(path: str, payload: Dict[str, Any], predictions: Optional[Sequence[Dict]] = None) -> None:
    """Write ``payload`` as JSON to ``path`` and, when given, the predictions as JSON lines
    next to it (``<path stem>.predictions.jsonl``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    if predictions is not None:
        stem = path[:-5] if path.endswith(".json") else path
        with open(stem + ".predictions.jsonl", "w", encoding="utf-8") as handle:
            for row in predictions:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


__all__ = [
    "evaluate_gsm8k",
    "evaluate_math_sets",
    "evaluate_perplexity",
    "format_table",
    "write_results",
    "GSM8K_STOPS",
    "MATH_STOPS",
]
