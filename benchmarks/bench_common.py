"""Small helpers shared by the benchmark scripts (importable from benchmarks/ when run as scripts)."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Callable, Dict, List

# full_fuse's LoRA terms, for A/B runs: the library default, op by op (the other layer types'
# path), or the Triton LoRA kernels launched eagerly at any length (by default only under CUDA
# graph capture)
LORA_OPS = {"fused": None, "op_by_op": ("hyclora.ops.lora", "FUSED_LORA_OPS", False),
            "kernels": ("hyclora.ops.lora_kernels", "EAGER_MIN_TOKENS", 0)}


@contextlib.contextmanager
def lora_ops(setting: str):
    """Inside, ``intra_inter_full_fuse`` computes its LoRA terms the :data:`LORA_OPS` way named."""
    if LORA_OPS[setting] is None:
        yield
        return
    import importlib

    module_name, attr, value = LORA_OPS[setting]
    module = importlib.import_module(module_name)
    saved = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, saved)


def write_csv(path: Path, rows: List[Dict]) -> Path:
    """Rows (dicts with the same keys, in order) to ``path`` as CSV with a header; prints where."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path


def python_profile(fn: Callable[[], object], path: Path, sync: Callable[[], None], rows: int = 60) -> Path:
    """Run ``fn`` once under cProfile (host Python time: where a host-bound step spends it) and
    write the functions by own time and by cumulative time to ``path``; ``sync`` waits for the
    device so the call's queued work is inside the profile."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    sync()
    prof.enable()
    fn()
    sync()
    prof.disable()
    text = io.StringIO()
    for key in ("tottime", "cumtime"):
        text.write(f"# by {key}\n")
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(rows)
    path.write_text(_relative_paths(text.getvalue()))
    print(f"wrote {path}")
    return path


def _relative_paths(text: str) -> str:
    """File names in a profile relative to the repository, ``site-packages/`` or ``stdlib/``:
    results are committed, and this machine's paths mean nothing on another."""
    import re

    import sysconfig

    text = re.sub(r"(?<!\S)\S*/site-packages/", "site-packages/", text)
    text = text.replace(sysconfig.get_paths()["stdlib"] + "/", "stdlib/")
    return text.replace(str(Path(__file__).resolve().parents[1]) + "/", "")
