"""GSM8K: records from the hub, a local folder/file, or the synthetic generator; tokenised with
the paper's prompt and target format (prompt tokens masked)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from .prompts import gsm8k_gold, gsm8k_prompt, gsm8k_target
from .sft import tokenize_supervised
from .sources import (
    check_records,
    find_split_file,
    is_synthetic,
    load_hub_records,
    read_records,
    synthetic_size,
)
from .synthetic import arithmetic_word_problems

GSM8K_HUB = "openai/gsm8k"
SYNTHETIC_TRAIN = 2000
SYNTHETIC_TEST = 200

# Local layouts: openai/grade-school-math (train.jsonl, test.jsonl) and the hub's parquet files.
_LOCAL_NAMES = [
    "{split}.jsonl",
    "{split}.json",
    "{split}.parquet",
    "main/{split}-00000-of-00001.parquet",
]

Record = Dict[str, str]


def load_gsm8k_records(data: Optional[str], split: str, *, seed: int = 0) -> List[Record]:
    """GSM8K records (``question``, ``answer``) of ``split`` ("train" or "test").

    ``data``: ``None`` or a hub name (default ``openai/gsm8k``, config ``main``); a folder with
    ``train.jsonl``/``test.jsonl`` (or parquet); a single file (used whatever the split); or
    ``synthetic[:N]`` for generated problems.
    """
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split {split!r}: expected 'train' or 'test'")
    data = data or GSM8K_HUB
    if is_synthetic(data):
        n = synthetic_size(data, SYNTHETIC_TRAIN) if split == "train" else SYNTHETIC_TEST
        return arithmetic_word_problems(split, n, seed=seed)
    if os.path.isdir(data):
        path = find_split_file(data, split, _LOCAL_NAMES)
        if path is None:
            raise FileNotFoundError(
                f"no GSM8K {split} file in {data!r}: expected one of "
                + ", ".join(n.format(split=split) for n in _LOCAL_NAMES)
            )
        source = str(path)
        records = read_records(path)
    elif os.path.isfile(data):
        source = data
        records = read_records(data)
    else:
        source = f"hub dataset {data} ({split} split)"
        records = load_hub_records(data, "main" if data.endswith("gsm8k") else None, split)
    check_records(records, source, ("question", "answer"), text=("question", "answer"),
                  fmt="GSM8K records need 'question' and 'answer' ('... #### 72')")
    return [{"question": r["question"], "answer": r["answer"]} for r in records]


def gsm8k_prompts_and_targets(
    records: List[Record], *, strip_calc_annotations: bool = False
) -> Tuple[List[str], List[str], List[str]]:
    """(prompts, targets, gold numbers) in the paper's format."""
    prompts = [gsm8k_prompt(r["question"]) for r in records]
    targets = [gsm8k_target(r["answer"], strip_calc_annotations=strip_calc_annotations) for r in records]
    golds = [gsm8k_gold(r["answer"]) for r in records]
    return prompts, targets, golds


def build_gsm8k_dataset(
    tokenizer, records: List[Record], max_length: int = 512, *, strip_calc_annotations: bool = False
):
    """Tokenised ``datasets.Dataset`` (``input_ids``, ``labels``) for causal-LM fine-tuning."""
    prompts, targets, _ = gsm8k_prompts_and_targets(
        records, strip_calc_annotations=strip_calc_annotations
    )
    return tokenize_supervised(tokenizer, prompts, targets, max_length)


__all__ = [
    "GSM8K_HUB",
    "load_gsm8k_records",
    "gsm8k_prompts_and_targets",
    "build_gsm8k_dataset",
]
