"""LoRA linear: ``y = x W^T (+ bias) + s * (drop(x) A^T) B^T`` with a hand-written backward.

The base weight ``W`` is frozen (its gradient is never computed: that would need the exact
input); ``A`` (``r x in``) and ``B`` (``out x r``) are trained. The forward follows PEFT's
``lora.Linear`` op by op (input cast to the adapter dtype, dropout, ``lora_B(lora_A(x)) *
scaling`` added to the base output, result cast back), so outputs equal PEFT's bit for bit.

The backward needs only:
* ``xa = drop(x) A^T`` (``... x r``, kept exactly) for ``grad_B``;
* a (possibly reconstructed) input ``x_hat`` for ``grad_A``;
* nothing for ``grad_x`` (weights only).

LoRA dropout is honoured without storing the mask: the RNG state before the mask is drawn is
kept (a few bytes) and the same mask is drawn again in the backward. On the CPU the mask is
drawn exactly as ``torch.nn.Dropout`` draws it, so a seeded run reproduces PEFT's masks; on
CUDA PyTorch's fused dropout kernel consumes the generator differently, so the masks are
statistically equivalent but not identical to PEFT's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from hyclora.kernels import lora as lora_kernels
from hyclora.kernels.lora import cast_to, scaled


@dataclass(frozen=True)
class FusedLoRA:
    """The fused LoRA ops of ``intra_inter_full_fuse`` (one-rounding epilogue, 16-bit reads):
    the kernel ``backend``, and from how many tokens per call their Triton kernels launch outside
    CUDA graph capture (``min_tokens``; ``None``: only under capture)."""

    backend: str
    min_tokens: Optional[int] = None

    def kernels_run(self, x: torch.Tensor) -> bool:
        """Whether the Triton kernels run for ``x`` (``(..., features)``)."""
        return lora_kernels.kernels_run(self.backend, x, self.min_tokens)


@dataclass(frozen=True)
class FusedPart:
    """A linear of a block that is output rows ``[start, stop)`` of a fused linear (Phi-3's
    ``qkv_proj`` / ``gate_up_proj``: one weight, one LoRA ``A``, one ``B`` for several of the
    block's projections). The block receives the fused parameters whole for each part (Function
    inputs, never views made outside, so ZeRO-3 can swap ``param.data``) and hands the ops the
    part's rows: ``W`` in :func:`dense_weight` (after any dequantisation), the bias and ``B`` as row
    views (:func:`hyclora.ops.block_common.part_inputs`). ``index`` / ``count``: the part's place
    among the fused linear's parts; all take the same input, so parts after the first reuse the
    first's ``drop(x) A^T`` (one product, one dropout mask, as PEFT applies the adapter once)."""

    fused: str  # the fused linear's name (messages)
    index: int
    count: int
    start: int
    stop: int


@dataclass(frozen=True)
class LinearMeta:
    """Non-tensor description of one linear of a block.

    Attributes:
        name: ``q_proj`` ... ``down_proj`` (used in error messages and saved-tensor names).
        has_lora: whether ``A``/``B`` are present for this call.
        scaling: PEFT's scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        dropout_p: LoRA dropout probability (0 = none).
        weight_fn: turns the stored base weight into a dense ``out x in`` matrix (e.g. NF4
            dequantisation); ``None`` for a plain weight.
        part: the rows of a fused linear this linear is (:class:`FusedPart`), or ``None``.
    """

    name: str
    has_lora: bool = False
    scaling: float = 1.0
    dropout_p: float = 0.0
    weight_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    part: Optional[FusedPart] = None

    @property
    def reuses_xa(self) -> bool:
        """Whether this linear takes ``drop(x) A^T`` from the previous part of its fused linear."""
        return self.part is not None and self.part.index > 0


def dense_weight(meta: LinearMeta, weight: torch.Tensor) -> torch.Tensor:
    """The dense ``out x in`` base weight (for a fused part: its rows of the fused weight)."""
    w = meta.weight_fn(weight) if meta.weight_fn is not None else weight
    if w.numel() == 0:
        # ZeRO-3 partitions parameters to empty tensors outside their module's forward.
        raise RuntimeError(
            f"hyclora: the base weight of {meta.name} is empty (a ZeRO-3 partitioned parameter "
            "that was not gathered?). Register the decoder layer as a ZeRO-3 leaf module."
        )
    part = meta.part
    return w if part is None else w[part.start:part.stop]


# -- dropout masks that can be drawn again in the backward ----------------------------------


def capture_rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "cpu":
        return torch.get_rng_state()
    raise NotImplementedError(
        f"hyclora: LoRA dropout on device type {device.type!r} is not supported (cpu and cuda "
        "are); set lora_dropout=0."
    )


@contextlib.contextmanager
def _rng_restored(device: torch.device, state: torch.Tensor):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


def draw_dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Scaled keep-mask drawn exactly as ``torch.nn.functional.dropout`` does on the CPU."""
    return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(1.0 - p).div_(1.0 - p)


def redraw_dropout_mask(
    state: torch.Tensor, shape, dtype: torch.dtype, device: torch.device, p: float
) -> torch.Tensor:
    with _rng_restored(device, state):
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p).div_(1.0 - p)


# -- forward / backward ---------------------------------------------------------------------





@dataclass
class LinearOut:
    y: torch.Tensor                      # full output
    y_w: torch.Tensor                    # base part x W^T + bias (== y without LoRA)
    xa: Optional[torch.Tensor]           # drop(x) A^T as (tokens, r), exact (None without LoRA)
    rng_state: Optional[torch.Tensor]    # generator state before the dropout mask


def lora_linear_forward(
    meta: LinearMeta,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    *,
    fused: Optional[FusedLoRA] = None,
    down: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
) -> LinearOut:
    """``fused`` (``intra_inter_full_fuse``: the kernel backend, else None): the LoRA term is
    added in one pass (:func:`_add_lora`), one rounding instead of three, no full-size temporary.
    ``down``: ``(xa, rng_state)`` of the previous part of the same fused linear (same input, same
    ``A``: ``meta.reuses_xa``), used instead of computing ``drop(x) A^T`` again."""
    y_w2, xa2, rng_state = _base_rows(meta, x, weight, bias, lora_a, fused, down)
    if xa2 is None:
        y_w = _unflat(y_w2, x)
        return LinearOut(y_w, y_w, None, None)
    y2 = _add_lora(meta, y_w2, xa2, lora_b, fused)
    # xa stays (tokens, r): every reader takes it 2-D (a view op less each way)
    return LinearOut(_unflat(y2, x), _unflat(y_w2, x), xa2, rng_state)


def _unflat(t2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t2`` (tokens, n) as ``x``'s leading shape (no view op when ``x`` is 2-D already)."""
    return t2 if x.dim() == 2 else t2.view(*x.shape[:-1], t2.shape[-1])


def _base_rows(meta: LinearMeta, x, weight, bias, lora_a, fused, down):
    """``(x W^T + bias, drop(x) A^T or None, rng state)`` on ``(tokens, features)`` views.

    A contiguous ``(..., in)`` input goes through its 2-D view: that is what ``F.linear`` /
    ``matmul`` fold it into (the same ``addmm`` / ``mm`` calls, bit for bit), without their view
    and transpose ops per call (host time). Other inputs keep the ``(..., in)`` ops (linear then
    runs matmul + bias add instead of one addmm) and come back as 2-D views."""
    w = dense_weight(meta, weight)
    if x.dim() == 2 or x.is_contiguous():
        x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
        y_w2 = F.linear(x2, w, bias)
    else:
        x2 = None
        y_w2 = F.linear(x, w, bias)
        y_w2 = y_w2.reshape(-1, y_w2.shape[-1])
    if not meta.has_lora:
        return y_w2, None, None
    if meta.reuses_xa or down is not None or x2 is None or meta.dropout_p > 0:
        # dropout: the mask is drawn in x's shape, as the backward redraws it
        xa, rng_state = _down(meta, x, lora_a, fused, down)
        return y_w2, xa if xa.dim() == 2 else xa.reshape(-1, xa.shape[-1]), rng_state
    if _reads_16bit(fused, x2, lora_a):
        return y_w2, lora_kernels.lora_down(x2, lora_a, backend=fused.backend, min_tokens=fused.min_tokens), None
    return y_w2, F.linear(cast_to(x2, lora_a.dtype), lora_a), None


def _down(meta: LinearMeta, x, lora_a, fused, down):
    """:func:`lora_down_projection`, or the previous fused part's result (``down``)."""
    if meta.reuses_xa:
        if down is None or down[0] is None:
            raise RuntimeError(f"hyclora internal error: {meta.name} reuses its fused linear's XA, but none was given")
        return down
    if down is not None:
        raise RuntimeError(f"hyclora internal error: {meta.name} was given an XA to reuse")
    return lora_down_projection(meta, x, lora_a, fused)


def lora_down_projection(meta: LinearMeta, x: torch.Tensor, lora_a: torch.Tensor,
                         fused: Optional[FusedLoRA] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(drop(x) A^T, generator state before the dropout mask or None)`` in ``A``'s dtype.
    ``fused`` (a kernel backend) without dropout: a 16-bit ``x`` with fp32 ``A`` is read as it is
    by :func:`hyclora.kernels.lora.lora_down` instead of being cast to fp32 first."""
    if meta.dropout_p == 0 and _reads_16bit(fused, x, lora_a):
        return lora_kernels.lora_down(x, lora_a, backend=fused.backend, min_tokens=fused.min_tokens), None
    xl = x if x.dtype == lora_a.dtype else x.to(lora_a.dtype)
    rng_state = None
    if meta.dropout_p > 0:
        rng_state = capture_rng_state(xl.device)
        xl = xl * draw_dropout_mask(xl, meta.dropout_p)
    return F.linear(xl, lora_a), rng_state


def _add_lora(meta: LinearMeta, y_w: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor,
              fused: Optional[FusedLoRA]) -> torch.Tensor:
    """``y_w + s * xa B^T`` on (tokens, n) and (tokens, r) rows, in ``y_w``'s dtype. Op by op
    (PEFT's roundings) unless ``fused`` (a kernel backend): then one ``addmm`` whose GEMM epilogue
    adds ``y_w`` in fp32 when the three share a dtype, and :func:`lora_epilogue` for mixed dtypes
    (PEFT's fp32 adapters on a bf16 base): one Triton pass where its kernels run (CUDA graph
    capture by default: :func:`hyclora.kernels.lora.kernels_run`), else PEFT's op-by-op expression."""
    if fused is None:
        return lora_kernels.lora_epilogue_torch(y_w, xa, lora_b, meta.scaling)
    if xa.dtype == y_w.dtype == lora_b.dtype and y_w.is_contiguous():
        return torch.addmm(y_w, xa, lora_b.t(), alpha=meta.scaling)
    return lora_kernels.lora_epilogue(y_w, xa, lora_b, meta.scaling, backend=fused.backend,
                                      min_tokens=fused.min_tokens)


def lora_base_forward(meta: LinearMeta, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor] = None, *,
                      fused: Optional[FusedLoRA] = None,
                      down: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None) -> LinearOut:
    """:func:`hyclora.ops.lora.lora_linear_forward` without the final ``y_w + s (XA) B^T``
    (``y`` is ``None``; ``lora_b`` is accepted for the same signature and not used): the fused
    kernel adds the LoRA term itself, so the full output is never materialised. Same ops, same
    dropout draw (same generator consumption) as the original; ``down`` as there."""
    y_w2, xa2, rng_state = _base_rows(meta, x, weight, bias, lora_a, fused, down)
    return LinearOut(None, _unflat(y_w2, x), xa2, rng_state)


def lora_reconstruct(
    meta: LinearMeta, y_w: torch.Tensor, xa: Optional[torch.Tensor], lora_b: Optional[torch.Tensor],
    *, fused: Optional[FusedLoRA] = None,
) -> torch.Tensor:
    """Rebuild ``y = y_w + s * xa B^T`` from a (dequantised) base part and the exact ``xa``."""
    if not meta.has_lora:
        return y_w
    rows = _add_lora(meta, y_w.reshape(-1, y_w.shape[-1]), xa.reshape(-1, xa.shape[-1]), lora_b, fused)
    return rows.view(y_w.shape)


def lora_linear_backward(
    meta: LinearMeta,
    dy: torch.Tensor,
    x_hat: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    rng_state: Optional[torch.Tensor] = None,
    need_dx: bool = True,
    need_da: bool = True,
    need_db: bool = True,
    need_dbias: bool = False,
    fused: Optional[FusedLoRA] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Return ``(dx, dbias, dA, dB)``; A/B gradients are reduced over all tokens explicitly.

    ``x_hat`` is the (possibly dequantised) forward input; only ``dA`` uses it. ``fused`` (a
    kernel backend, ``intra_inter_full_fuse``): with fp32 adapters on a 16-bit ``dy``, where the
    kernels of :mod:`hyclora.kernels.lora` run (``kernels_run``: CUDA graph capture by
    default), ``s dy B``, ``dB`` and ``dA`` come from them reading ``dy`` and ``x_hat`` as they
    are (no fp32 copies), and the LoRA part of ``dx`` is added over ``dx`` in one rounding.
    """
    return _lora_linear_backward(meta, dy, x_hat, xa, weight, bias, lora_a, lora_b, rng_state, need_dx,
                                 need_da, need_db, need_dbias, fused)[:4]


def _lora_linear_backward(meta, dy, x_hat, xa, weight, bias, lora_a, lora_b, rng_state, need_dx, need_da,
                          need_db, need_dbias, fused):
    """:func:`lora_linear_backward` that also returns ``dxa = s dy B`` as ``(tokens, r)`` (``None``
    without LoRA)."""
    # Every product on (tokens, features) views: the mm calls that matmul / linear fold a
    # (..., n) operand into, bit for bit, without their view / transpose ops per call (host time).
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx2 = dy2.mm(dense_weight(meta, weight)) if need_dx else None
    dbias = dy2.sum(0).to(bias.dtype) if (need_dbias and bias is not None) else None
    da = db = dxa2 = None
    if meta.has_lora and (need_dx or need_da or need_db):
        r = lora_a.shape[0]
        if _reads_16bit(fused, dy, lora_b):
            # fp32 adapters, 16-bit dy: the rank-r products read dy as it is (no fp32 copy)
            if need_db:
                db = cast_to(scaled(lora_kernels.token_reduced_product(dy2, _rows2(xa, r), backend=fused.backend,
                                                                       min_tokens=fused.min_tokens), meta.scaling),
                             lora_b.dtype)
            dxa2 = scaled(lora_kernels.lora_down(dy2, lora_b.t(), backend=fused.backend, min_tokens=fused.min_tokens),
                          meta.scaling)  # (tokens, r)
        else:
            dl2 = scaled(cast_to(dy2, lora_b.dtype), meta.scaling)
            if need_db:
                db = cast_to(dl2.t().mm(cast_to(_rows2(xa, r), dl2.dtype)), lora_b.dtype)
            dxa2 = dl2.mm(cast_to(lora_b, dl2.dtype))  # (tokens, r)
            del dl2
        mask2 = None
        if meta.dropout_p > 0 and (need_da or need_dx):
            mask2 = _dropout_mask(meta, rng_state, dy, lora_a).view(-1, lora_a.shape[1])
        if need_da:
            da = _lora_grad_a(meta, dxa2, x_hat, lora_a, mask2, fused)
        if need_dx:
            if mask2 is None and dxa2.dtype == dx2.dtype:
                # straight into dx (this function's own fresh tensor): no (tokens, in) temporary
                dx2.addmm_(dxa2, cast_to(lora_a, dx2.dtype))
            elif mask2 is None and _reads_16bit(fused, dx2, lora_a):
                dx2 = lora_kernels.lora_epilogue(dx2, dxa2, lora_a.t(), 1.0, backend=fused.backend,
                                                 min_tokens=fused.min_tokens, in_place=True)  # dx: ours
            else:
                dxl = dxa2.mm(cast_to(lora_a, dxa2.dtype))
                if mask2 is not None:
                    dxl = dxl * mask2
                dx2 = dx2.add_(cast_to(dxl, dx2.dtype))
    dx = None if dx2 is None else dx2.view(*dy.shape[:-1], dx2.shape[-1])
    return dx, dbias, da, db, dxa2


def _rows2(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as ``(tokens, n)``; no view op when it is 2-D already (a kept ``xa``)."""
    return t if t.dim() == 2 else t.reshape(-1, n)


def _dropout_mask(meta: LinearMeta, rng_state, dy: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    shape = dy.shape[:-1] + (lora_a.shape[1],)
    return redraw_dropout_mask(rng_state, shape, lora_a.dtype, dy.device, meta.dropout_p)


def _reads_16bit(fused: Optional[FusedLoRA], x: torch.Tensor, factor: torch.Tensor) -> bool:
    """Whether the fused LoRA kernels take ``x`` (16-bit) with an fp32 ``factor`` (the fp32
    copy of ``x`` that cuBLAS would need is skipped): only where their Triton path runs (the
    backend, and :func:`hyclora.kernels.lora.kernels_run`'s launch threshold); else the op-by-op
    path, which casts each tensor once for all its products."""
    if fused is None or factor.dtype is not torch.float32 or x.dtype not in _16BIT:
        return False
    return fused.kernels_run(x)


_16BIT = (torch.float16, torch.bfloat16)


def _lora_grad_a(meta: LinearMeta, dxa2: torch.Tensor, x_hat: Optional[torch.Tensor], lora_a: torch.Tensor,
                 mask2: Optional[torch.Tensor], fused: Optional[FusedLoRA] = None) -> torch.Tensor:
    """``dA = dxa^T (drop(x_hat))`` reduced over all tokens, in ``lora_a``'s dtype; ``dxa2`` and
    the mask ``mask2`` as ``(tokens, .)``."""
    if x_hat is None:
        raise RuntimeError(f"hyclora internal error: {meta.name} input was not saved")
    x2 = x_hat.reshape(-1, x_hat.shape[-1])
    if mask2 is None and _reads_16bit(fused, x_hat, lora_a) and dxa2.dtype == torch.float32:
        return cast_to(lora_kernels.token_reduced_product(x2, dxa2, backend=fused.backend,
                                                          min_tokens=fused.min_tokens).t(), lora_a.dtype)
    xl = cast_to(x2, lora_a.dtype)
    if mask2 is not None:
        xl = xl * mask2
    return cast_to(dxa2.t().mm(xl), lora_a.dtype)


def lora_linear_backward_input_first(
    meta: LinearMeta,
    dy: torch.Tensor,
    xa: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    rng_state: Optional[torch.Tensor] = None,
    need_da: bool = True,
    need_db: bool = True,
    need_dbias: bool = False,
    fused: Optional[FusedLoRA] = None,
):
    """:func:`lora_linear_backward` in two steps, for a linear whose input the backward rebuilds
    (down_proj's ``D``): ``dx``, ``dbias`` and ``dB`` need no input and come first, so the input
    does not exist yet while their matmuls run; ``dA`` comes from the returned ``grad_a(x_hat)``
    once it does (``None`` when not needed), from the first step's ``s dy B`` (a (tokens, r)
    tensor kept in between; the dropout mask, a full-size tensor, is redrawn instead).
    Returns ``(dx, dbias, dB, grad_a)``."""
    dx, dbias, _, db, dxa = _lora_linear_backward(
        meta, dy, None, xa, weight, bias, lora_a, lora_b, rng_state, True, False, need_db, need_dbias, fused)

    def grad_a(x_hat: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if not (need_da and meta.has_lora):
            return None
        mask2 = (_dropout_mask(meta, rng_state, dy, lora_a).view(-1, lora_a.shape[1]) if meta.dropout_p > 0
                 else None)
        return _lora_grad_a(meta, dxa, x_hat, lora_a, mask2, fused)

    return dx, dbias, db, grad_a


__all__ = [
    "lora_base_forward",
    "FusedPart",
    "LinearMeta",
    "LinearOut",
    "lora_linear_forward",
    "lora_linear_backward",
    "lora_linear_backward_input_first",
    "lora_reconstruct",
    "dense_weight",
    "capture_rng_state",
    "draw_dropout_mask",
    "redraw_dropout_mask",
]
