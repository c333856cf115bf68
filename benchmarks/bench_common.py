"""Small helpers shared by the benchmark scripts (importable from benchmarks/ when run as scripts)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List


def write_csv(path: Path, rows: List[Dict]) -> Path:
    """Rows (dicts with the same keys, in order) to ``path`` as CSV with a header; prints where."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path
