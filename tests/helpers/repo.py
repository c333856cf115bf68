"""The checkout: its folders, ``PYTHONPATH`` for subprocesses, scripts loaded by path."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SHARED_DATA = REPO / ".." / "shared" / "data"  # data sets and models shared by the checkouts
GLUE_DIR = SHARED_DATA / "glue"
TINYLLAMA = SHARED_DATA / "tinyllamas-stories260K" / "hf"  # the pretrained 260K-parameter Llama


def pythonpath(*folders: Path) -> str:
    """``PYTHONPATH`` for a subprocess: ``folders`` (default: the checkout, so that hyclora imports
    where it is not installed) before the inherited value."""
    return os.pathsep.join([*(str(f) for f in folders or (REPO,)), os.environ.get("PYTHONPATH", "")])


def load_script(name: str, path: Path):
    """The file ``path`` (e.g. ``examples/glue.py``: not a package) loaded once as module ``name``,
    registered in ``sys.modules`` before it runs (dataclasses look their module up there)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
