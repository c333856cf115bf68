"""What hyclora supports of the libraries it patches: the tested version ranges, and the
transformers APIs whose names changed inside them.

``TESTED`` is the one source of truth: ``setup.cfg``'s ranges, ``requirements-dev.txt`` (the low
end) and ``requirements-latest.txt`` (the high end) must agree with it, and a test checks that
they do. CI runs the whole suite at both ends.
"""

from __future__ import annotations

import re
import sys
import warnings
from importlib import metadata
from typing import Dict, Optional, Tuple

# distribution -> (oldest tested, newest tested), both inclusive
TESTED: Dict[str, Tuple[str, str]] = {
    # torch 2.11 is the GPU image's (device tests and benchmarks); CI runs 2.13 and 2.14.1
    "torch": ("2.11.0", "2.14.1"),
    "transformers": ("5.17.0", "5.25.0"),
    "peft": ("0.21.0", "0.21.2"),
    "accelerate": ("1.15.0", "1.16.0"),
}


class UntestedVersionWarning(UserWarning):
    """A dependency is newer than the newest release hyclora was tested with."""


def version_tuple(version: str) -> Tuple[int, ...]:
    """``"5.25.0"`` -> ``(5, 25, 0)``; local and pre-release suffixes (``+cpu``, ``.dev0``,
    ``rc1``) are dropped, so ``2.14.1+cu130`` compares as ``2.14.1``."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def _release(version: str) -> Tuple[int, int, int]:
    """(major, minor, patch) of ``version``, missing parts 0."""
    return (version_tuple(version) + (0, 0, 0))[:3]


def installed_version(distribution: str) -> Optional[str]:
    """The imported module's ``__version__`` (what runs), else the installed distribution's."""
    module = sys.modules.get(distribution)
    if isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def tested_range_text() -> str:
    return ", ".join(f"{name} {low}-{high}" for name, (low, high) in TESTED.items())


def check_versions(installed: Optional[Dict[str, Optional[str]]] = None) -> None:
    """Refuse a dependency older than the tested range or of another major version (hyclora
    patches their internals: it would break in ways nobody has seen); warn once for one newer
    than the newest tested release of the same major version (:class:`UntestedVersionWarning`),
    where the forward probe at ``apply_hyclora`` still refuses a layer whose forward would be
    bypassed. ``installed``: ``{distribution: version}`` to check instead of what is installed."""
    for name, (low, high) in TESTED.items():
        version = installed.get(name) if installed is not None else installed_version(name)
        if version is None:
            continue  # not installed: whatever needs it fails on import with its own message
        # compare (major, minor, patch), padded: "2.13" is 2.13.0, not older than it
        have, lo, hi = (_release(v) for v in (version, low, high))
        if have < lo or have[:1] > hi[:1]:
            raise RuntimeError(
                f"hyclora: {name} {version} is not supported: hyclora patches its internals and is tested "
                f"with {tested_range_text()}. Install a tested release: pip install '{name}>={low},<={high}'."
            )
        if have > hi:
            warnings.warn(
                f"hyclora: {name} {version} is newer than the newest tested release ({high}); tested: "
                f"{tested_range_text()}. hyclora checks that its patched layers still run its forward and "
                f"refuses them otherwise; report problems, or pin '{name}<={high}'.",
                UntestedVersionWarning, stacklevel=3,
            )


# -- transformers APIs renamed inside the tested range ------------------------------------------
# transformers 5.23 renamed gradient checkpointing to activation checkpointing (the old names
# warn and go in v6): call the new name where the model has it.

def checkpointing_enable(model, use_reentrant: bool = False) -> None:
    """``activation_checkpointing_enable`` (transformers >= 5.23) or ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_disable(model) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None)
    if callable(disable):
        disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    if hasattr(type(model), "is_activation_checkpointing") or hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


__all__ = [
    "TESTED",
    "UntestedVersionWarning",
    "check_versions",
    "checkpointing_disable",
    "checkpointing_enable",
    "installed_version",
    "is_checkpointing",
    "tested_range_text",
    "version_tuple",
]
