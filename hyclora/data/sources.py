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
from typing import Any, Dict, List, Optional, Sequence

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
    ``.parquet`` file. A file without any record is an error naming the file."""
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
    elif suffix == ".json":
        with path.open(encoding="utf-8") as handle:
            text = handle.read()
        if not text.strip():
            raise ValueError(f"data file {path} has no records (it is empty)")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        records = obj
    elif suffix in (".csv", ".parquet"):
        if path.stat().st_size == 0:
            raise ValueError(f"data file {path} has no records (it is empty)")
        import datasets

        kind = "csv" if suffix == ".csv" else "parquet"
        records = list(datasets.load_dataset(kind, data_files=str(path), split="train"))
    else:
        raise ValueError(
            f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .parquet"
        )
    if not records:
        raise ValueError(f"data file {path} has no records")
    return records


def record_location(source: str | os.PathLike, index: int) -> str:
    """Where record ``index`` (0-based, as ``read_records`` returns them) sits in ``source``:
    ``file:line (record n)`` for JSON lines, ``file, record n`` otherwise (n counts from 1)."""
    path = Path(source)
    if path.suffix.lower() == ".jsonl" and path.is_file():
        seen = -1
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    seen += 1
                    if seen == index:
                        return f"{path}:{lineno} (record {index + 1})"
    return f"{source}, record {index + 1}"


def check_records(
    records: List[Record],
    source: str | os.PathLike,
    required: Sequence[str],
    *,
    text: Sequence[str] = (),
    optional_text: Sequence[str] = (),
    fmt: str = "",
) -> List[Record]:
    """Validate every record (not just the first) and name the first bad one: its file, line or
    record number, and the missing or mistyped field. ``required`` fields must be present and not
    null, ``text`` ones must also be strings, ``optional_text`` ones strings when present. ``fmt``
    describes the expected format in the message."""
    hint = f"; {fmt}" if fmt else ""
    if not records:
        what = f"data file {source}" if os.path.exists(str(source)) else str(source)
        raise ValueError(f"{what} has no records{hint}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{record_location(source, i)}: expected an object with fields {list(required)}, "
                             f"found a {type(rec).__name__}{hint}")
        missing = [f for f in required if f not in rec]
        if missing:
            raise ValueError(f"{record_location(source, i)}: missing field {missing[0]!r} (the record has "
                             f"{sorted(rec)}){hint}")
        null = [f for f in required if rec[f] is None]
        if null:
            raise ValueError(f"{record_location(source, i)}: field {null[0]!r} is null{hint}")
        for f in list(text) + [f for f in optional_text if rec.get(f) is not None]:
            if not isinstance(rec[f], str):
                raise ValueError(f"{record_location(source, i)}: field {f!r} is a {type(rec[f]).__name__}, "
                                 f"expected text{hint}")
    return records


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


__all__ = ["is_synthetic", "synthetic_size", "read_records", "record_location", "check_records", "find_split_file",
           "load_hub_records"]
