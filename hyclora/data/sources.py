"""Where records come from: a local file or folder, the embedded generator, or the HF hub.

``--data`` takes one string; this module decides what it means, in this order:

1. ``synthetic`` / ``synthetic:N``: the seeded arithmetic word-problem generator (GSM8K format).
2. an existing local path (file or folder): read from disk, never touching the network.
3. anything else: a hub dataset name, loaded with ``datasets.load_dataset`` (online only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

Record = Dict[str, Any]


def is_synthetic(data: Optional[str]) -> bool:
    return data is not None and (data == "synthetic" or data.startswith("synthetic:"))


def synthetic_size(data: str, default: int) -> int:
    if data == "synthetic":
        return default
    text = data.split(":", 1)[1]
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--data {data!r}: expected 'synthetic' or 'synthetic:<number of training problems>'") from None
    if n <= 0:
        raise ValueError(f"--data {data!r}: the number of problems must be positive")
    return n


def read_records(path: str | os.PathLike) -> List[Record]:
    """Records from a ``.jsonl``, ``.json`` (a list, or ``{"data": [...]}``), ``.csv`` or
    ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
        return records
    if suffix == ".json":
        with path.open(encoding="utf-8") as handle:
            obj = json.load(handle)
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        return obj
    if suffix in (".csv", ".parquet"):
        import datasets

        kind = "csv" if suffix == ".csv" else "parquet"
        return list(datasets.load_dataset(kind, data_files=str(path), split="train"))
    raise ValueError(
        f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .parquet"
    )


def find_split_file(folder: str | os.PathLike, split: str, names: List[str]) -> Optional[Path]:
    """The first of ``names`` (formatted with ``split``) that exists in ``folder``."""
    folder = Path(folder)
    for name in names:
        candidate = folder / name.format(split=split)
        if candidate.is_file():
            return candidate
    return None


def load_hub_records(name: str, config: Optional[str], split: str) -> List[Record]:
    """Load a split from the HF hub, turning offline failures into an error that names the fix."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, missing split: all need the same advice
        raise RuntimeError(
            f"could not load hub dataset {name!r} (config {config!r}, split {split!r}): {err}. "
            "If this machine is offline or the name is wrong, pass --data a local file or "
            "folder (see hyclora.data for the accepted layouts) or --data synthetic."
        ) from err
    return list(dataset)


__all__ = ["is_synthetic", "synthetic_size", "read_records", "find_split_file", "load_hub_records"]
