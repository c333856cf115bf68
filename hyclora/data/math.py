"""Arithmetic multitask (LLM-Adapters / pyreft "math"): Math10K-format training, seven test sets.

Records have ``instruction``, ``input``, ``output`` (a rationale ending in "The answer is ...")
and ``answer``. Training uses the Alpaca template with the prompt masked; evaluation generates
greedily and compares the extracted number with ``answer`` within 1e-3 (AQuA: the letter).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .prompts import alpaca_prompt
from .sft import tokenize_supervised
from .sources import check_records, read_records

PAPER_EVAL_SETS = ("gsm8k", "SVAMP", "mawps", "AQuA")
ALL_EVAL_SETS = PAPER_EVAL_SETS + ("AddSub", "MultiArith", "SingleEq")
LETTER_SETS = frozenset({"AQuA"})

_TRAIN_NAMES = ("math_10k.json", "math_data.json", "ft-training_set/math_10k.json",
                "ft-training_set/math_data.json")

Record = Dict[str, str]
logger = logging.getLogger(__name__)


def answer_type(name: str) -> str:
    """``"letter"`` for multiple-choice sets (AQuA), ``"numeric"`` otherwise."""
    return "letter" if name in LETTER_SETS else "numeric"


def _check(records: List[Record], where: str) -> List[Record]:
    return check_records(records, where, ("instruction", "answer"), text=("instruction",),
                         optional_text=("input", "output"),
                         fmt="expected LLM-Adapters fields instruction/input/output/answer")


def resolve_math_train_file(data: str) -> Path:
    if data is None:
        raise ValueError(
            "--data is required for the multitask example: a math_10k.json / math_data.json "
            "file, or an LLM-Adapters folder holding one"
        )
    path = Path(data)
    if path.is_file():
        return path
    if path.is_dir():
        for name in _TRAIN_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no training file in {data!r}: expected one of {_TRAIN_NAMES}")
    raise FileNotFoundError(f"--data {data!r} does not exist (the multitask data is local files)")


def load_math_train_records(data: str) -> List[Record]:
    path = resolve_math_train_file(data)
    return _check(read_records(path), str(path))


def resolve_math_eval_dir(data: Optional[str], eval_data: Optional[str]) -> Path:
    """The LLM-Adapters ``dataset/`` folder (``<name>/test.json``): ``eval_data`` if given, else
    ``dataset/`` next to (or one level above) the training data."""
    candidates: List[Path] = []
    if eval_data is not None:
        candidates.append(Path(eval_data))
    elif data is not None:
        base = Path(data)
        base = base.parent if base.is_file() else base
        candidates += [base / "dataset", base.parent / "dataset", base]
    for folder in candidates:
        if folder.is_dir() and any((folder / n / "test.json").is_file() for n in ALL_EVAL_SETS):
            return folder
    raise FileNotFoundError(
        "no evaluation sets found (looked in "
        + ", ".join(map(str, candidates or ["<nothing: no --data>"]))
        + "); pass --eval_data pointing at LLM-Adapters' dataset/ folder (<name>/test.json)"
    )


def load_math_eval_sets(
    eval_dir: str | os.PathLike, names=ALL_EVAL_SETS, *, max_samples: Optional[int] = None
) -> Dict[str, List[Record]]:
    """``{name: records}`` for each set in ``names`` found in ``eval_dir``; a missing set raises."""
    eval_dir = Path(eval_dir)
    out: Dict[str, List[Record]] = {}
    for name in names:
        path = eval_dir / name / "test.json"
        if not path.is_file():
            raise FileNotFoundError(f"evaluation set {name!r} not found: {path} does not exist")
        records = _check(read_records(path), str(path))
        out[name] = records[:max_samples] if max_samples else records
    return out


def math_prompts_and_targets(records: List[Record]) -> Tuple[List[str], List[str]]:
    """Alpaca prompts and rationale targets. Records without an ``output`` rationale (3 of the
    3,260 in math_data.json) have nothing to learn from and are skipped with a warning."""
    prompts, targets = [], []
    for r in records:
        output = (r.get("output") or "").strip()
        if output:
            prompts.append(alpaca_prompt(r["instruction"], r.get("input", "") or ""))
            targets.append(output)
    if len(targets) < len(records):
        logger.warning("skipped %d of %d records without an 'output'", len(records) - len(targets), len(records))
    if not targets:
        raise ValueError("no record has an 'output' rationale to train on")
    return prompts, targets


def build_math_dataset(tokenizer, records: List[Record], max_length: int = 512):
    prompts, targets = math_prompts_and_targets(records)
    return tokenize_supervised(tokenizer, prompts, targets, max_length)


__all__ = [
    "PAPER_EVAL_SETS",
    "ALL_EVAL_SETS",
    "answer_type",
    "resolve_math_train_file",
    "load_math_train_records",
    "resolve_math_eval_dir",
    "load_math_eval_sets",
    "math_prompts_and_targets",
    "build_math_dataset",
]
