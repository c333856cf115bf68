"""Which checkpoint to resume from: ``--resume_from_checkpoint latest|true|PATH``.

HF Trainer writes a checkpoint folder file by file (adapter, optimizer, scheduler, RNG state)
and ``trainer_state.json`` last; hyclora's ``HyCLoRAStateCallback`` writes ``hyclora_state.pt``
before the Trainer starts on the folder. A folder without a readable ``trainer_state.json`` was
therefore cut off while it was being saved (a kill, a full disk, a preempted node): it is never
picked as the latest, and naming it explicitly is an error that says so.

The same rule serves other layouts through ``marker`` (e.g. ``launch/longseq.py`` writes
``progress.json`` last).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import List, Optional, Tuple

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# every spelling that means "the newest complete checkpoint-* in output_dir"
LATEST = ("latest", "last", "true", "yes")
_OFF = ("", "false", "no", "none")


def checkpoint_problem(folder: str, marker: str = TRAINER_STATE) -> Optional[str]:
    """None when ``folder`` is a complete checkpoint, else what is wrong with it (one phrase)."""
    if not os.path.isdir(folder):
        return "not a folder"
    path = os.path.join(folder, marker)
    if not os.path.isfile(path):
        return f"no {marker}: its save was interrupted"
    if marker.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError) as err:
            return f"{marker} is unreadable ({type(err).__name__}): its save was interrupted"
    return None


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str, marker: str = TRAINER_STATE) -> Optional[str]:
    """The newest COMPLETE ``checkpoint-*`` folder of ``output_dir`` (see the module docstring),
    or None. Incomplete newer folders are skipped with a warning."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path, marker)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s (%s)", path, problem)
    return None


def resolve_resume(value, output_dir: str, marker: str = TRAINER_STATE) -> Optional[str]:
    """The checkpoint folder that ``--resume_from_checkpoint value`` means, or None (no resume).

    ``latest`` (also ``true``/``last``/``yes``, or ``True`` from Python): the newest complete
    ``checkpoint-*`` in ``output_dir``; a path: that folder, which must be complete. Errors say
    what was looked at and what to pass instead.
    """
    if value is None or value is False or str(value).strip().lower() in _OFF:
        return None
    if value is True or str(value).strip().lower() in LATEST:
        last = latest_checkpoint(output_dir, marker)
        if last is None:
            partial = [p for _, p in list_checkpoints(output_dir)]
            detail = (f"only incomplete ones ({', '.join(os.path.basename(p) for p in partial)}: no readable "
                      f"{marker})" if partial else "none at all")
            raise FileNotFoundError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in {output_dir!r} ({detail}); "
                "check --output_dir, or drop --resume_from_checkpoint to start afresh"
            )
        logger.info("resuming from %s", last)
        return last
    path = str(value)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path!r}: folder not found; pass a checkpoint-* folder, or 'latest' "
            f"for the newest complete one in --output_dir ({output_dir})"
        )
    problem = checkpoint_problem(path, marker)
    if problem is not None:
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is an incomplete checkpoint ({problem}); pass an older "
            "checkpoint-* folder or 'latest' (the newest complete one), and delete this one"
        )
    return path


__all__ = ["TRAINER_STATE", "LATEST", "checkpoint_problem", "list_checkpoints", "latest_checkpoint",
           "resolve_resume"]
