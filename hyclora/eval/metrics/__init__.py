"""Metrics shipped as local ``evaluate`` modules (``<name>/<name>.py``), loaded by path.

Loading by path uses evaluate's local factory: the script is copied into the modules cache and
imported, with no hub access (a bare name like "exact_match" would go to the hub).
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE = tuple(sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file()))


def metric_path(name: str) -> Path:
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown hyclora metric {name!r}: expected one of {AVAILABLE}")
    return path


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a hyclora metric by its local path (works offline)."""
    import evaluate

    if not hasattr(evaluate, "load"):
        raise ImportError(
            f"`import evaluate` found {getattr(evaluate, '__file__', evaluate)!r}, not the HF "
            "evaluate library: a local file named evaluate.py shadows it (run scripts from "
            "another folder, or rename that file)"
        )
    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRICS_DIR", "AVAILABLE", "metric_path", "load_metric"]
