"""WikiText-2 for causal-LM fine-tuning and perplexity: 1024-token blocks by default.

Local folders may hold the raw release (``wiki.{train,valid,test}.raw``), the tokenised one
(``wiki.{split}.tokens``) or plain ``{train,valid,test}.txt``, directly or under ``raw/`` or
``tokens/``. One variant is used for every split (the one with the most splits present, raw
first on ties), so training and evaluation text are formatted alike.

When a folder has no train split (../shared/data/wikitext-2 has only valid and test), training
falls back to the validation split and evaluation uses test: ``wikitext_splits`` says so in its
note, and callers print it. Numbers from such a run are not comparable with the paper's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .sources import load_hub_records
from .sft import tokenize_blocks

logger = logging.getLogger(__name__)

WIKITEXT_HUB = "wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
_SPLIT_ALIASES = {"train": ("train",), "validation": ("valid", "validation"), "test": ("test",)}
_PATTERNS = ["wiki.{split}.raw", "wiki.{split}.tokens", "{split}.txt", "{split}.raw"]


def resolve_wikitext_files(folder: str | os.PathLike) -> Dict[str, Path]:
    """``{"train"|"validation"|"test": path}`` for the best variant found in ``folder``."""
    folder = Path(folder)
    best: Dict[str, Path] = {}
    for variant in (folder, folder / "raw", folder / "tokens"):
        if not variant.is_dir():
            continue
        found: Dict[str, Path] = {}
        for split, aliases in _SPLIT_ALIASES.items():
            for alias in aliases:
                hit = next(
                    (variant / p.format(split=alias) for p in _PATTERNS
                     if (variant / p.format(split=alias)).is_file()),
                    None,
                )
                if hit is not None:
                    found[split] = hit
                    break
        if len(found) > len(best):
            best = found
    if not best:
        raise FileNotFoundError(
            f"no WikiText files in {str(folder)!r}: expected wiki.{{train,valid,test}}.raw, "
            "wiki.{split}.tokens or {train,valid,test}.txt (directly or under raw/ or tokens/)"
        )
    return best


def _read_lines(path: Path) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if not any(line.strip() for line in lines):
        raise ValueError(f"data file {path} has no records (no text)")
    return lines


def wikitext_splits(
    data: Optional[str], eval_data: Optional[str] = None
) -> Tuple[List[str], List[str], str]:
    """(training lines, evaluation lines, a note on which files/splits were used)."""
    data = data or WIKITEXT_HUB
    if os.path.isdir(data):
        files = resolve_wikitext_files(data)
        if eval_data is not None:
            eval_path = Path(eval_data)
        elif "test" in files:
            eval_path = files["test"]
        else:
            raise FileNotFoundError(f"no WikiText test split in {data!r}; pass --eval_data FILE")
        if "train" in files:
            train_path, note = files["train"], f"train on {files['train']}, evaluate on {eval_path}"
        elif "validation" in files:
            train_path = files["validation"]
            note = (
                f"{data} has no train split: fine-tuning on the VALIDATION split "
                f"({train_path}) and evaluating on {eval_path}; not comparable with the paper"
            )
            logger.warning(note)
        else:
            raise FileNotFoundError(f"no WikiText train or validation split in {data!r}")
        return _read_lines(train_path), _read_lines(eval_path), note
    if os.path.isfile(data):
        if eval_data is None:
            raise ValueError(f"--data {data!r} is a single file: pass --eval_data FILE for evaluation")
        return _read_lines(Path(data)), _read_lines(Path(eval_data)), f"train on {data}, evaluate on {eval_data}"
    config = WIKITEXT_CONFIG if data.rstrip("/").endswith("wikitext") else None
    if ":" in data:  # "wikitext:wikitext-103-raw-v1" picks another config
        data, config = data.split(":", 1)
    train = [r["text"] for r in load_hub_records(data, config, "train")]
    evaluation = [r["text"] for r in load_hub_records(data, config, "test")]
    return train, evaluation, f"train on hub {data}/{config} train, evaluate on test"


def load_wikitext_lines(data: Optional[str], split: str = "test") -> List[str]:
    """Lines of one split ("train", "validation" or "test") from a folder, a file (returned
    whatever the split) or the hub."""
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"WikiText split {split!r}: expected one of {sorted(_SPLIT_ALIASES)}")
    data = data or WIKITEXT_HUB
    if os.path.isdir(data):
        files = resolve_wikitext_files(data)
        if split not in files:
            raise FileNotFoundError(f"no WikiText {split} split in {data!r} (found {sorted(files)})")
        return _read_lines(files[split])
    if os.path.isfile(data):
        return _read_lines(Path(data))
    config = WIKITEXT_CONFIG if data.rstrip("/").endswith("wikitext") else None
    if ":" in data:
        data, config = data.split(":", 1)
    return [r["text"] for r in load_hub_records(data, config, split)]


def build_wikitext_dataset(tokenizer, lines: List[str], block_size: int = 1024):
    """``datasets.Dataset`` of ``block_size``-token blocks (``input_ids`` = ``labels``)."""
    return tokenize_blocks(tokenizer, lines, block_size)


__all__ = [
    "WIKITEXT_HUB",
    "resolve_wikitext_files",
    "wikitext_splits",
    "load_wikitext_lines",
    "build_wikitext_dataset",
]
