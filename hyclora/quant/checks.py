"""Guards that turn silent gradient corruption into a clear error.

Two modes, same contract (a ``FloatingPointError`` naming the first place that saw a NaN/Inf,
and the fix, before an optimizer can use the gradients):

* immediate (no :class:`FiniteGuard` active): :func:`check_finite` reads the result on the host
  at once. One device->host sync per call: fine for a unit test or a one-off check, but on a
  GPU every sync stops the CPU from queuing work ahead of the GPU, and the blocks check twice
  per decoder layer (64 syncs per step on a 32-layer model).
* deferred (inside ``guard.scope(order)``): :func:`check_finite` only launches a device-side
  reduction and keeps the 0-d flag; :meth:`FiniteGuard.raise_pending` reads ALL flags of the
  step with one host read and raises naming the earliest failing place. ``hyclora.models``
  arms it on the first decoder layer's output, whose gradient is the last one the backward
  computes among the patched layers, so the step still stops before the optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .core import no_grad

_FIX = (
    "The forward already diverged here; lower the learning rate, enable gradient clipping, or "
    "train in bf16 instead of fp16 (overflow). To skip this check, set "
    "HyCLoRAConfig(on_nonfinite='ignore')."
)

# Pending flags kept at most before a host read is forced (bounds memory if no backward ever
# reads them, e.g. train-mode forwards with grad that are never backpropagated).
MAX_PENDING = 4096

_local = threading.local()


class _Pending(NamedTuple):
    order: int
    seq: int
    flag: Tensor  # 0-d bool on x's device: True = all finite
    where: str
    shape: tuple
    dtype: torch.dtype


def _all_finite(x: Tensor) -> Tensor:
    """0-d bool: every element of ``x`` is finite. One read and two ops: the max-norm ``max |x|``
    propagates NaN (torch's reductions take NaN as the maximum) and is +inf for any +-inf, so it is
    below +inf iff every element is finite; a finite max |x| never overflows (``aminmax`` then
    ``isfinite`` twice dispatches several times more ops)."""
    with no_grad():  # no detach: nothing records under no_grad
        return torch.linalg.vector_norm(x, ord=math.inf) < math.inf


class FiniteGuard:
    """Collects the finite-ness flags of one training step; one host read checks them all.

    Typical use (what ``hyclora.models`` does per decoder layer)::

        guard = FiniteGuard()
        with guard.scope(order=layer_index):
            y = block(...)          # the blocks call check_finite(x, where): no host sync
        guard.arm(y)                # the first layer's output: raise_pending() in its backward

    ``order`` ranks the places so that the error names the earliest one even when the checks
    ran out of order (a reentrant checkpoint recomputes the layers last to first).
    """

    def __init__(self):
        self._pending: List[_Pending] = []
        self._seq = 0
        self.armed = False

    # -- recording ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, order: int = 0):
        """Within it, :func:`check_finite` on this thread records into this guard."""
        prev = getattr(_local, "active", None)
        _local.active = (self, order)
        try:
            yield self
        finally:
            _local.active = prev

    def record(self, x: Tensor, where: str, order: int = 0) -> None:
        """Queue a device-side "all of ``x`` finite" flag (:func:`_all_finite`, no host sync)."""
        _check_tensor(x, where)
        if not x.is_floating_point() or x.numel() == 0:
            return
        self.add_flag(_all_finite(x), where, order=order, shape=tuple(x.shape), dtype=x.dtype)

    def add_flag(self, flag: Tensor, where: str, *, order: int = 0, shape: tuple = (), dtype=None) -> None:
        """Queue a device-side flag computed elsewhere (0-d bool, True = all finite), e.g. the one
        a CUDA graph replay recomputes in place (``hyclora.cuda_graphs``); no host sync."""
        self._pending.append(_Pending(order, self._seq, flag, where, tuple(shape), dtype))
        self._seq += 1
        if len(self._pending) >= MAX_PENDING:
            self.raise_pending()

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def clear(self) -> None:
        self._pending = []
        self._seq = 0

    # -- checking -------------------------------------------------------------------------------
    def raise_pending(self) -> None:
        """Read every pending flag (one host read per device) and forget them; raise
        ``FloatingPointError`` naming the earliest non-finite place, if any."""
        pending, self._pending, self._seq = self._pending, [], 0
        if not pending:
            return
        ok: List[Optional[bool]] = [None] * len(pending)
        by_device = {}
        for i, p in enumerate(pending):
            by_device.setdefault(p.flag.device, []).append(i)
        for idxs in by_device.values():
            host = torch.stack([pending[i].flag for i in idxs]).cpu().tolist()  # the one sync
            for i, v in zip(idxs, host):
                ok[i] = bool(v)
        bad = [p for p, good in zip(pending, ok) if not good]
        if not bad:
            return
        first = min(bad, key=lambda p: (p.order, p.seq))
        raise FloatingPointError(
            f"non-finite activation (NaN or Inf) in {first.where} (shape {first.shape}, "
            f"{first.dtype}); {len(bad)} of the {len(pending)} places checked in this step were "
            f"non-finite. {_FIX}"
        )

    def arm(self, y: Tensor) -> bool:
        """Make the backward through ``y`` call :meth:`raise_pending` (before ``y``'s own
        backward runs). Returns whether it was armed (``y`` must require grad)."""
        if not (isinstance(y, Tensor) and y.requires_grad):
            return False
        self.armed = True
        y.register_hook(self._on_grad)
        return True

    def _on_grad(self, grad: Tensor):
        self.armed = False
        self.raise_pending()
        return None  # gradient unchanged


def active_guard() -> Optional[FiniteGuard]:
    """The guard :func:`check_finite` records into on this thread, or ``None``."""
    active = getattr(_local, "active", None)
    return None if active is None else active[0]


def _check_tensor(x, where: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"check_finite({where}): expected a torch.Tensor, got {type(x).__name__}.")


def check_finite(x: Tensor, where: str) -> None:
    """Raise FloatingPointError naming ``where`` if ``x`` holds a NaN or an Inf.

    A non-finite activation would poison the min/max range of its whole channel (every token of
    that channel then dequantises to NaN) and every gradient behind it, so stop at the first one.
    Inside ``FiniteGuard.scope`` the check is deferred (no host sync; see the module docstring);
    otherwise it costs one reduction and one host sync. Callers skip it when the user opted out
    (``HyCLoRAConfig(on_nonfinite="ignore")``).
    """
    active = getattr(_local, "active", None)
    if active is not None:
        guard, order = active
        guard.record(x, where, order)
        return
    _check_tensor(x, where)
    if not x.is_floating_point() or x.numel() == 0:
        return
    if bool(_all_finite(x)):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    raise FloatingPointError(
        f"non-finite activation in {where}: {n_nan} NaN and {n_inf} Inf among {x.numel()} values "
        f"(shape {tuple(x.shape)}, {x.dtype}). {_FIX}"
    )


__all__ = ["FiniteGuard", "active_guard", "check_finite", "MAX_PENDING"]
