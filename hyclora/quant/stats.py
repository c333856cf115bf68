"""Calibration statistics of one saved activation: per-channel range and outlier channels.

The reference kept these in a Python dict (lost on resume, moved by nothing), measured them on
the first sequence of the micro-batch only, averaged scales computed with different channel sets
removed and kept only the LAST batch's outlier set (method notes §8.7, §8.8). Here:

* everything is a registered buffer of fixed shape (``state_dict``, ``.to()``, DDP broadcast);
* ranges come from ALL rows of the micro-batch and merge by running min/max, so the frozen range
  covers every calibration batch (values outside it later are clamped);
* outlier scores are the per-channel sum of squares over all calibration rows (= squared L2
  norm over every calibration token), accumulated, so the frozen outlier set is the top-k of the
  whole calibration window, not of the last batch;
* ``count`` advances only with ``update=True`` (a gradient-checkpointing recompute passes
  ``update=False`` and is not counted twice).

Range drift: frozen ranges clamp whatever later falls outside them, and fine-tuning moves the
activations (frozen statistics measurably cost eval loss on ``make demo``; BENCHMARKS.md). With
``recalibrate_every = N`` the statistics are renewed after N counted forwards with frozen values
(the layer calls :meth:`note_counted_forward` once per counted forward); ``0`` freezes for good, as
the paper does. Two ways (``refresh``):

* ``True`` (``HyCLoRAConfig.recalibrate_mode="refresh"``, the default): the frozen parameters stay
  in use while the next ``iteration_threshold`` forwards gather new ranges and outlier scores
  beside them (:meth:`observe`, predicated on the device flag ``observing``, so a captured CUDA
  graph gathers them too); then the new parameters are written into the cached parameter tensors
  in place (:meth:`frozen_params`' tensors keep their storage), between two forwards. A graph never
  has to be released, and no step runs eager.
* ``False`` (``"reset"``): the statistics expire (:meth:`reset`) and calibrate again from scratch,
  each calibrating forward quantising with its own range (eager steps under CUDA graphs).

Quick first calibration (``quick=True``, ``HyCLoRAConfig.calibration="quick"``, the default with
``refresh``): the first counted forward's range and outlier scores freeze provisionally, and the
next ``iteration_threshold - 1`` forwards refine them as a refresh window seeded with them (its
statistics start from the first forward's, not empty); at its end they are exactly what an eager
calibration over the same ``iteration_threshold`` forwards freezes (running min/max, summed
scores), and ``count`` reaches ``iteration_threshold``. Each of those forwards quantises with the
range of the forwards before it (written in place into the parameters at its start, so a captured
graph reads it and a checkpoint recompute sees the same; values outside it are clamped) instead of
its own, and CUDA graphs capture at the second step instead of after ``iteration_threshold`` eager
ones. A window is saved with the statistics, so a run resumed inside one continues it as the
uninterrupted run does.

``iteration_threshold == 0`` never freezes: ranges come from each micro-batch and the outlier set
is recomputed from each micro-batch alone (``outlier_score`` then holds the latest batch's score,
not a sum that would grow without bound).

No host syncs on the hot path: whether the stats are frozen is decided from a Python-side mirror
of ``count`` (kept in step by :meth:`range_for`, :meth:`reset` and ``load_state_dict``), and the
forwards since freezing are counted on the host only (``frozen_forwards`` is refreshed from that
count whenever ``state_dict`` is taken, so a resumed run expires the statistics at the same step
as the uninterrupted one).

``state_dict`` never holds a zero-element tensor: with ``num_outliers == 0`` the (empty)
``outlier_idx`` buffer is not persistent. safetensors, and accelerate's ``save_state``, which
saves with it by default, treat every zero-element tensor as sharing storage with every other (all
have the same null data pointer) and drop all but one of them, after which a strict
``load_state`` fails on the missing keys. A checkpoint written before this change, which holds
that empty buffer, still loads.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Tuple

import torch
from torch import Tensor


class ChannelStats(torch.nn.Module):
    """Calibration state for ONE saved tensor of width ``width``.

    Buffers: ``lo`` (N,) fp32, ``hi`` (N,) fp32, ``outlier_score`` (N,) fp32,
    ``outlier_idx`` (k,) long (not in ``state_dict`` when k == 0), ``count`` () long,
    ``frozen_forwards`` () long (counted forwards since the statistics froze), and the refresh
    window's ``next_lo`` / ``next_hi`` / ``next_score`` (N,) fp32, ``observing`` () int32 and
    ``window_observed`` () long.
    """

    def __init__(self, width: int, *, num_outliers: int = 0, iteration_threshold: int = 5,
                 recalibrate_every: int = 0, refresh: bool = True, quick: bool = False):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"ChannelStats width={width!r} is invalid: use the tensor's last dimension (>= 1).")
        if isinstance(num_outliers, bool) or not isinstance(num_outliers, int) or not 0 <= num_outliers <= width:
            raise ValueError(
                f"ChannelStats num_outliers={num_outliers!r} is invalid: use an int in [0, {width}] "
                f"(e.g. floor(width * layernorm_outlier_ratio))."
            )
        if (isinstance(iteration_threshold, bool) or not isinstance(iteration_threshold, int)
                or iteration_threshold < 0):
            raise ValueError(
                f"ChannelStats iteration_threshold={iteration_threshold!r} is invalid: use an int "
                f">= 0 (0 = recompute every step, never freeze)."
            )
        if (isinstance(recalibrate_every, bool) or not isinstance(recalibrate_every, int)
                or recalibrate_every < 0):
            raise ValueError(
                f"ChannelStats recalibrate_every={recalibrate_every!r} is invalid: use an int >= 0 "
                f"(0 = keep the frozen statistics for good)."
            )
        if quick and not (refresh and iteration_threshold > 0):
            raise ValueError(
                "ChannelStats quick=True refines the first statistics in a refresh window: it needs "
                f"refresh=True and iteration_threshold >= 1 (got refresh={refresh!r}, "
                f"iteration_threshold={iteration_threshold!r}); use quick=False."
            )
        self.width = width
        self.recalibrate_every = recalibrate_every
        self.refresh = bool(refresh)
        self.quick = bool(quick)
        self._frozen_forwards = 0  # counted forwards since the statistics froze (host only)
        self.num_outliers = num_outliers
        self.iteration_threshold = iteration_threshold
        self.register_buffer("lo", torch.full((width,), float("inf")))
        self.register_buffer("hi", torch.full((width,), float("-inf")))
        self.register_buffer("outlier_score", torch.zeros(width))
        # empty when there are no outlier channels: kept out of state_dict (see the module notes)
        self.register_buffer("outlier_idx", torch.arange(num_outliers, dtype=torch.long),
                             persistent=num_outliers > 0)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        # device copy of _frozen_forwards, written only when state_dict is taken
        self.register_buffer("frozen_forwards", torch.zeros((), dtype=torch.long))
        self._count_host = 0
        self._counting = True  # False inside uncounted_updates(): merge, do not count
        # refresh window (see the module notes): the next statistics, gathered while the frozen
        # ones stay in use; the device flag the observe kernel reads, and its host mirror; saved, so
        # a run resumed inside a window continues it
        self.register_buffer("next_lo", torch.full((width,), float("inf")))
        self.register_buffer("next_hi", torch.full((width,), float("-inf")))
        self.register_buffer("next_score", torch.zeros(width))
        self.register_buffer("observing", torch.zeros((), dtype=torch.int32))
        # device copy of _observed, written only when state_dict is taken
        self.register_buffer("window_observed", torch.zeros((), dtype=torch.long))
        self._observing = False
        self._observed = 0  # forwards observed in this window
        # frozen quantisation parameters per bit width (see frozen_params); rewritten in place only
        # between two counted forwards (windows), when no autograd graph still references them
        self._param_cache = {}

    # -- state ----------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        # quick: provisionally after the first forward (refined by the first window)
        return self.iteration_threshold > 0 and self._count_host >= (1 if self.quick else self.iteration_threshold)

    @property
    def _first_unfinished(self) -> bool:
        """The quick calibration's first statistics are still being refined (frozen, not counted out)."""
        return self._count_host < self.iteration_threshold

    @property
    def _window_length(self) -> int:
        """Forwards the open window observes: the quick calibration's the ones its first forward
        left, a renewal's ``iteration_threshold``."""
        return self.iteration_threshold - (self._count_host if self._first_unfinished else 0)

    @property
    def gathers(self) -> bool:
        """Whether refresh windows may ever open (so :meth:`observe` has work, and a captured
        forward must launch it)."""
        return self.refresh and bool(self.recalibrate_every or self.quick)

    @property
    def calibrating(self) -> bool:
        """Statistics are being gathered (at least one calibration forward, not yet frozen)."""
        return not self.frozen and self._count_host > 0

    def expires_at_next_forward(self) -> bool:
        """Whether the next :meth:`note_counted_forward` resets these frozen statistics (never
        with ``refresh``: they are renewed in place)."""
        return (not self.refresh and self.frozen and bool(self.recalibrate_every)
                and self._frozen_forwards + 1 > self.recalibrate_every)

    def note_counted_forward(self) -> None:
        """Called by the owning layer once per counted training forward, before it quantises:
        after ``recalibrate_every`` forwards with frozen statistics, ``refresh`` opens a window
        of ``iteration_threshold`` observed forwards and, at the forward after it, writes the new
        parameters in place; otherwise the statistics expire (:meth:`reset`) and this forward
        starts a new calibration window."""
        if not self.frozen:
            return
        # plain host ints written into the instance dict: nn.Module.__setattr__ (it searches the
        # parameter / buffer / module registries first) costs host time on every layer call
        d = self.__dict__
        if self.refresh:
            if self._observing and self._observed >= self._window_length:
                self._finish_refresh()
            elif not self._observing and self._first_unfinished:
                self._start_refresh()  # quick: the first calibration's remaining forwards
            elif not self._observing and self.recalibrate_every and self._frozen_forwards >= self.recalibrate_every:
                self._start_refresh()
            elif self._observing and self._first_unfinished:
                self._use_running_range()
            d["_frozen_forwards"] += 1
            d["_observed"] += self._observing
            return
        expires = self.expires_at_next_forward()
        d["_frozen_forwards"] += 1
        if expires:
            self.reset()

    def _set_observing(self, on: bool) -> None:
        with torch.no_grad():
            self.observing.fill_(int(on))
        self._observing, self._observed = on, 0

    def _start_refresh(self) -> None:
        """Open a window gathering new statistics (:attr:`_window_length` forwards); the quick
        calibration's continues the statistics its first forward gathered."""
        with torch.no_grad():
            if self._first_unfinished:
                self.next_lo.copy_(self.lo)
                self.next_hi.copy_(self.hi)
                self.next_score.copy_(self.outlier_score)
            else:
                self.next_lo.fill_(float("inf"))
                self.next_hi.fill_(float("-inf"))
                self.next_score.zero_()
        self._set_observing(True)

    def _finish_refresh(self) -> None:
        """The observed window becomes the statistics: ``lo``/``hi``/``outlier_score``/``outlier_idx``
        and every cached parameter set, written in place (a captured graph reads those tensors;
        no autograd graph of an earlier step is alive between two counted forwards)."""
        self._set_observing(False)
        self._frozen_forwards = 0

        with torch.no_grad():
            if self._first_unfinished:  # the quick calibration's window: done
                self.count.fill_(self.iteration_threshold)
                self._count_host = self.iteration_threshold
            # a window that observed nothing (a path these statistics are not on) keeps what is in
            # use; decided on the device, no host read
            seen = torch.isfinite(self.next_lo).all()
            for buf, new in ((self.lo, self.next_lo), (self.hi, self.next_hi), (self.outlier_score, self.next_score)):
                buf.copy_(torch.where(seen, new, buf))
            if self.num_outliers > 0:
                idx = torch.topk(self.outlier_score, self.num_outliers, sorted=False).indices.sort().values
                self.outlier_idx.copy_(torch.where(seen, idx, self.outlier_idx))
        self._write_cached_params()

    def _use_running_range(self) -> None:
        """Inside the quick calibration's window: the range in use becomes the range of the
        forwards so far (fixed for this forward and its checkpoint recompute), written in place."""
        with torch.no_grad():
            self.lo.copy_(self.next_lo)
            self.hi.copy_(self.next_hi)
        self._write_cached_params()

    def _write_cached_params(self) -> None:
        """Every cached parameter set recomputed from ``lo``/``hi``/``outlier_idx``, in place."""
        from .core import affine_params

        with torch.no_grad():
            for bits, (lo, step, inv_step, idx) in self._param_cache.items():
                new = affine_params(self.lo, self.hi, bits)
                if idx is not None:
                    idx.copy_(self.outlier_idx)
                    new = tuple(t.index_fill(0, idx, 0.0) for t in new)
                for buf, value in zip((lo, step, inv_step), new):
                    buf.copy_(value)

    def observe(self, x2d: Tensor, *, skip_rows: Optional[Tensor] = None, update: bool = True,
                backend: str = "auto") -> None:
        """Gather ``x2d``'s ranges and outlier scores (all rows but ``skip_rows``, the exact rows)
        into the refresh window's statistics. Launched while a window is open, and always inside a
        CUDA graph capture (the kernel then reads the device flag on every replay); nothing else
        (``update=False``: a checkpoint recompute, already observed)."""
        if not (self.gathers and update):
            return
        if not (self._observing or (x2d.is_cuda and torch.cuda.is_current_stream_capturing())):
            return
        from .core import observe_columns

        observe_columns(x2d, self.observing, self.next_lo, self.next_hi, self.next_score, skip_rows, backend)

    def reset(self) -> None:
        """Forget everything and calibrate again."""
        with torch.no_grad():
            self.lo.fill_(float("inf"))
            self.hi.fill_(float("-inf"))
            self.outlier_score.zero_()
            self.outlier_idx.copy_(torch.arange(self.num_outliers, device=self.outlier_idx.device))
            self.count.zero_()
        self._count_host = 0
        self._frozen_forwards = 0  # the frozen_forwards buffer follows when state_dict is taken
        self._set_observing(False)
        self._param_cache = {}

    _FP32_BUFFERS = ("lo", "hi", "outlier_score", "next_lo", "next_hi", "next_score")
    # the refresh window's state (saved since the quick calibration; older checkpoints lack it)
    WINDOW_BUFFERS = ("next_lo", "next_hi", "next_score", "observing", "window_observed")

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` cast every floating buffer; statistics must stay
        # fp32 (an fp16 sum of squares overflows at 65504, a bf16 range loses the 2-bit grid), so
        # take the device move but keep the original fp32 values.
        before = {name: self._buffers[name] for name in self._FP32_BUFFERS}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        self._param_cache = {}
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the host count is the truth (no device work per forward); write it where state_dict
        # reads it (an inference tensor can only be written inside inference mode)
        for buf, value in ((self.frozen_forwards, self._frozen_forwards), (self.window_observed, self._observed)):
            if not buf.is_inference() or torch.is_inference_mode_enabled():
                with torch.no_grad():
                    buf.fill_(value)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # Checkpoints written before frozen_forwards was saved lack it (the count since freezing
        # then restarts at 0, as it did), or the refresh window (it then opens again at the next
        # forward, as it did), and hold an empty outlier_idx when there are no outlier channels,
        # which is no longer saved: all load.
        had = {name: prefix + name in state_dict for name in ("frozen_forwards", *self.WINDOW_BUFFERS)}
        for name, present in had.items():
            if not present and prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        had_frozen_forwards = had["frozen_forwards"]
        key = prefix + "outlier_idx"
        if (self.num_outliers == 0 and key in unexpected_keys and isinstance(state_dict.get(key), torch.Tensor)
                and state_dict[key].numel() == 0):
            unexpected_keys.remove(key)
        # one host read per load, so the hot path never has to read `count` from the device
        self._count_host = int(self.count.item())
        if had_frozen_forwards:
            self._frozen_forwards = int(self.frozen_forwards.item())
        elif prefix + "count" in state_dict:
            self._frozen_forwards = 0
        self._param_cache = {}
        if all(had[name] for name in self.WINDOW_BUFFERS) and self.gathers and int(self.observing.item()):
            self._observing, self._observed = True, int(self.window_observed.item())
            return
        if self.refresh and self.recalibrate_every:
            # no window saved: one the checkpoint was taken in opens again at the next forward
            self._frozen_forwards = min(self._frozen_forwards, self.recalibrate_every)
        self._set_observing(False)

    def extra_repr(self) -> str:
        return (f"width={self.width}, num_outliers={self.num_outliers}, "
                f"iteration_threshold={self.iteration_threshold}, recalibrate_every={self.recalibrate_every}, "
                f"refresh={self.refresh}, quick={self.quick}, "
                f"count={self._count_host}")

    def check_compatible(self, x: Tensor) -> None:
        if x.shape[-1] != self.width:
            raise ValueError(
                f"ChannelStats of width {self.width} got a tensor of width {x.shape[-1]} "
                f"(shape {tuple(x.shape)}): use one ChannelStats per saved tensor, built with "
                f"ChannelStats({x.shape[-1]}, ...)."
            )
        if x.device != self.lo.device:
            raise ValueError(
                f"ChannelStats buffers are on {self.lo.device} but the tensor is on {x.device}: "
                f"move the module that owns them (module.to({str(x.device)!r}))."
            )

    # -- statistics -----------------------------------------------------------------------------
    def range_for(self, x: Tensor, *, update: bool = True, backend: str = "auto") -> Tuple[Tensor, Tensor]:
        """Per-channel (lo, hi) fp32 to quantise ``x`` with.

        Calibrating: ``x``'s own min/max over all its rows (merged into the running min/max and
        counted when ``update``). Frozen: the stored range (copies, so a later reset cannot
        change what an autograd graph saved).
        """
        self.check_compatible(x)
        if self.frozen:
            return self.lo.clone(), self.hi.clone()
        with torch.no_grad():
            from .core import column_minmax

            lo, hi = column_minmax(x.detach().reshape(-1, self.width), backend)
            if update:
                torch.minimum(self.lo, lo, out=self.lo)
                torch.maximum(self.hi, hi, out=self.hi)
                if self._counting:
                    self.count += 1
                    self._count_host += 1
        return lo, hi

    def frozen_params(self, bits: int):
        """(lo, step, inv_step, outlier_idx) fp32/long for quantising with frozen stats.

        Computed once per bit width after freezing and reused on every later step, so the
        steady-state ``quantize`` launches the kernel and the outlier gather, nothing else.
        Outlier columns get lo = step = inv_step = 0 (they encode as 0, restored exactly).
        Inside the quick calibration's window they follow the running range (rewritten in place
        at each counted forward, :meth:`note_counted_forward`).
        """
        if not self.frozen:
            raise RuntimeError("ChannelStats.frozen_params() is only defined once the stats are frozen.")
        cached = self._param_cache.get(bits)
        if cached is None:
            from .core import affine_params

            with torch.no_grad():
                lo, step, inv_step = affine_params(self.lo, self.hi, bits)
                idx = self.outlier_idx.clone() if self.num_outliers > 0 else None
                if idx is not None:
                    lo = lo.index_fill(0, idx, 0.0)
                    step = step.index_fill(0, idx, 0.0)
                    inv_step = inv_step.index_fill(0, idx, 0.0)
            cached = (lo, step, inv_step, idx)
            self._param_cache[bits] = cached
        return cached

    def select_outliers(self, x: Tensor, *, update: bool = True) -> Tensor:
        """(k,) long indices (ascending) of the channels to keep exactly.

        Calibrating with ``update``: the per-channel sum of squares of ``x`` is added to
        ``outlier_score`` (replaces it when ``iteration_threshold == 0``) and the top-k of the
        score becomes ``outlier_idx``. Calibrating without ``update`` (a recompute): the stored
        set, which is what the counted forward of the same micro-batch used; before any update,
        the top-k of ``x`` alone. Frozen: the stored set.
        """
        self.check_compatible(x)
        k = self.num_outliers
        if k == 0:
            return torch.empty(0, dtype=torch.long, device=x.device)
        if self.frozen or (not update and self._count_host > 0):
            return self.outlier_idx.clone()
        with torch.no_grad():
            xf = x.detach().reshape(-1, self.width).float()
            score = (xf * xf).sum(0)
            if update:
                if self.iteration_threshold == 0:
                    self.outlier_score.copy_(score)
                else:
                    self.outlier_score += score
                score = self.outlier_score
            idx = torch.topk(score, k, sorted=False).indices.sort().values
            if update:
                self.outlier_idx.copy_(idx)
        return idx


@contextlib.contextmanager
def uncounted_updates(stats: Iterable[ChannelStats]) -> Iterator[None]:
    """Calibration updates inside merge into the running range and outlier scores as usual but
    do not count as a calibration forward.

    A block that quantises one tensor in several row chunks (the MLP of a long sequence) runs
    every chunk but the last inside this, so the statistics end up exactly as if the whole
    tensor had been seen at once: one count, the min/max and the sum of squares over all rows,
    and every chunk of the forward sees the same frozen/calibrating state."""
    stats = list(stats)
    for s in stats:
        s._counting = False
    try:
        yield
    finally:
        for s in stats:
            s._counting = True
