"""Affine (min/max + zero point) quantisation of activations, packed into uint8.

Format of a :class:`QuantizedTensor` made from ``x`` of shape ``(..., N)``:

* ``codes``: uint8, shape ``(rows, ceil(N * bits / 8))`` with ``rows = prod(x.shape[:-1])``.
  ``E = 8 // bits`` codes share a byte: column ``c`` lives in byte ``c // E`` at bit offset
  ``bits * (c % E)`` (least significant first). Adjacent columns share a byte (the reference's
  "strided inside a 32-column tile" layout needed N % 32 == 0; this one works for any N, the
  last byte is zero-padded).
* ``lo``, ``step``: fp32. Per channel: shape ``(N,)``; per group: ``(rows, ceil(N / G))``.
  ``x_hat = lo + code * step`` with ``code = clamp(floor((x - lo) / step + 0.5), 0, 2^bits - 1)``
  (round half up; the division is a multiplication by a precomputed fp32 ``1 / step`` so the
  Triton kernel and this reference produce identical codes). fp32, not bf16 as in the
  reference: at 2 bits a bf16 step alone can be off by 0.4% of the range.
  A channel whose range is 0 gets ``step = 0``: every code is 0 and it comes back as ``lo``,
  i.e. exactly.
* optional exact outlier columns: ``outlier_idx`` (k,) int64 and ``outlier_vals`` (rows, k) in
  the input dtype. Their codes carry nothing (lo = step = 0 there); dequantisation scatters the
  exact values back.

Range with zero point (asymmetric): the reference's zero-centred grid without zero point clips
every channel that is not centred on 0 (method notes §8.6); this does not.

Granularity (``group_size``): per-row groups of 64 are more accurate at the same stored bits for
V, O, U and D; per-channel ranges with exact outlier channels for the norm inputs, the linear
inputs and Q/K, whose massive-activation channels make a per-token range useless
(``benchmarks/quant_fidelity.py``; the table is in BENCHMARKS.md, "Design measurements").
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from hyclora.kernels.common import resolve_backend

from .format import SUPPORTED_BITS, SUPPORTED_DTYPES, check_bits, packed_width

_GRAD_ALREADY_OFF = contextlib.nullcontext()


def no_grad():
    """``torch.no_grad()`` where grad mode is on; a shared no-op context where it is already off
    (inside an autograd Function's forward/backward, where these functions mostly run: entering
    ``torch.no_grad`` costs several Python calls of host time each time)."""
    return torch.no_grad() if torch.is_grad_enabled() else _GRAD_ALREADY_OFF


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------
def check_input(x, what: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; quantisation takes bfloat16, float16 or float32 "
            f"activations. Cast it first (e.g. x.to(torch.bfloat16))."
        )
    if x.dim() == 0:
        raise ValueError(f"{what} is a scalar; quantisation needs a tensor of shape (..., N).")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); nothing to quantise.")


def check_group_size(group_size, n: int) -> Optional[int]:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size={group_size!r} is invalid: use None (per channel) or a positive int "
            f"(per-row groups of that many consecutive channels; {n} = per token)."
        )
    return min(group_size, n)


# ---------------------------------------------------------------------------------------------
# the compressed tensor
# ---------------------------------------------------------------------------------------------
class QuantizedTensor:
    """A compressed copy of a tensor of shape ``(..., N)`` (format: see the module docstring).

    To keep it across forward/backward in an autograd Function::

        ctx.save_for_backward(*q.tensors()); ctx.qmeta = q.meta()
        ...
        q = QuantizedTensor.restore(ctx.saved_tensors[:QuantizedTensor.NUM_TENSORS], ctx.qmeta)

    ``tensors()`` always has ``NUM_TENSORS`` entries (absent outliers are ``None``).
    """

    NUM_TENSORS = 5
    __slots__ = ("codes", "lo", "step", "outlier_idx", "outlier_vals", "bits", "shape", "dtype",
                 "group_size")

    def __init__(self, codes: Tensor, lo: Tensor, step: Tensor, *, bits: int, shape, dtype,
                 outlier_idx: Optional[Tensor] = None, outlier_vals: Optional[Tensor] = None,
                 group_size: Optional[int] = None):
        self.codes = codes
        self.lo = lo
        self.step = step
        self.outlier_idx = outlier_idx
        self.outlier_vals = outlier_vals
        self.bits = bits
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.group_size = group_size

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_idx is None else self.outlier_idx.numel()

    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        return (self.codes, self.lo, self.step, self.outlier_idx, self.outlier_vals)

    def meta(self):
        return (self.bits, tuple(self.shape), self.dtype, self.group_size)

    @staticmethod
    def restore(tensors, meta) -> "QuantizedTensor":
        tensors = tuple(tensors)
        if len(tensors) != QuantizedTensor.NUM_TENSORS:
            raise ValueError(
                f"QuantizedTensor.restore needs the {QuantizedTensor.NUM_TENSORS} entries of "
                f"tensors(), got {len(tensors)}."
            )
        codes, lo, step, idx, vals = tensors
        bits, shape, dtype, group_size = meta
        return QuantizedTensor(codes, lo, step, bits=bits, shape=shape, dtype=dtype,
                               outlier_idx=idx, outlier_vals=vals, group_size=group_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def __repr__(self) -> str:
        gran = "per-channel" if self.group_size is None else f"group={self.group_size}"
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"bits={self.bits}, {gran}, outliers={self.num_outliers}, nbytes={self.nbytes})")


# ---------------------------------------------------------------------------------------------
# parameters (shared by both backends, so both see bit-identical lo / 1/step / step)
# ---------------------------------------------------------------------------------------------
_FP32_TINY = torch.finfo(torch.float32).tiny


def affine_params(lo: Tensor, hi: Tensor, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(lo, step, inv_step) in fp32 from a range. A zero (or inverted) range gives step = 0."""
    qmax = (1 << bits) - 1
    lo = lo.float()
    hi = hi.float()
    step = (hi - lo) / qmax
    # step below the smallest normal fp32 would make 1/step overflow to inf (0 * inf = NaN):
    # treat it as a constant channel (error <= qmax * step < 3e-36).
    ok = step >= _FP32_TINY
    # Six kernels (this runs per call for per-group ranges, so its launch count matters on a
    # host-bound step): scalar operands of where need no zeros_like/ones_like tensors, and the
    # inf that reciprocal gives where step == 0 is masked out. reciprocal is what ``1.0 / t``
    # computes (``Tensor.__rtruediv__`` is reciprocal * 1), so inv_step is bit-identical.
    step = torch.where(ok, step, 0.0)
    inv_step = torch.where(ok, torch.reciprocal(step), 0.0)
    return lo, step, inv_step


def _expand_params(p: Tensor, rows: int, n: int, group_size: Optional[int]) -> Tensor:
    """Per-element view of per-channel (N,) or per-group (rows, G') parameters."""
    if group_size is None:
        return p if p.dim() == 1 else p.view(1, n)  # (N,) broadcasts over the rows as (1, N) does
    return p.repeat_interleave(group_size, dim=1)[:, :n]


# ---------------------------------------------------------------------------------------------
# pure-torch reference kernels (the oracle for the Triton kernels, and the CPU path)
# ---------------------------------------------------------------------------------------------
_SHIFTS = {}


def _shifts(bits: int, device: torch.device) -> Tensor:
    """Bit offsets ``bits * i`` of the ``8 // bits`` codes of a byte (uint8), made once per
    device and width instead of one ``arange`` launch per call."""
    key = (bits, device)
    t = _SHIFTS.get(key)
    if t is None:
        t = _SHIFTS[key] = torch.arange(8 // bits, device=device, dtype=torch.uint8) * bits
    return t


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(rows, N) uint8 codes < 2**bits -> (rows, ceil(N*bits/8)) uint8, adjacent columns per byte."""
    e = 8 // bits
    if e == 1:
        return codes.contiguous()
    rows, n = codes.shape
    pad = (-n) % e
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    # code i of a byte goes to bits [bits*i, bits*(i+1)): the shifted codes occupy disjoint bits,
    # so their sum is their bitwise OR (2 kernels instead of 2 * (e - 1) + 1)
    shifted = codes.view(rows, -1, e) << _shifts(bits, codes.device)
    return shifted.sum(-1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: (rows, NB) uint8 -> (rows, n) uint8 codes."""
    e = 8 // bits
    if e == 1:
        return packed[:, :n]
    # the mask in place on the fresh shifted tensor (one allocation less per call)
    codes = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)).bitwise_and_((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :n]


def quantize_codes_torch(x2d: Tensor, lo: Tensor, inv_step: Tensor, bits: int,
                         group_size: Optional[int] = None) -> Tensor:
    """Codes (unpacked uint8, (rows, N)) exactly as the Triton kernel computes them."""
    rows, n = x2d.shape
    qmax = (1 << bits) - 1
    lo_e = _expand_params(lo, rows, n, group_size)
    inv_e = _expand_params(inv_step, rows, n, group_size)
    # torch.sub promotes a 16-bit x2d to fp32 exactly as x2d.float() does; the rest runs in place
    # on that fresh tensor: the same ops and roundings, fewer allocations (host time)
    v = torch.sub(x2d, lo_e).mul_(inv_e)
    return v.add_(0.5).floor_().clamp_(0, qmax).to(torch.uint8)


def quantize_pack_torch(x2d, lo, inv_step, bits, group_size=None) -> Tensor:
    return pack_codes(quantize_codes_torch(x2d, lo, inv_step, bits, group_size), bits)


def unpack_dequantize_torch(packed: Tensor, lo: Tensor, step: Tensor, bits: int, n: int,
                            dtype: torch.dtype, group_size: Optional[int] = None) -> Tensor:
    rows = packed.shape[0]
    codes = unpack_codes(packed, bits, n)
    lo_e = _expand_params(lo, rows, n, group_size)
    step_e = _expand_params(step, rows, n, group_size)
    return codes.float().mul_(step_e).add_(lo_e).to(dtype)  # in place on the fresh fp32 codes


# ---------------------------------------------------------------------------------------------
# ranges
# ---------------------------------------------------------------------------------------------
def _group_range(x2d: Tensor, group_size: int, outlier_idx: Optional[Tensor]):
    """Per-row, per-group min/max; outlier columns are left out so they cannot widen a group."""
    rows, n = x2d.shape
    ng = -(-n // group_size)
    pad = ng * group_size - n
    if outlier_idx is None or outlier_idx.numel() == 0:
        # Common case (V/O/D groups): min and max in one reduction on the input dtype (exact:
        # the extremes of bf16/fp16 values are those values; cast after), no fp32 copy of x and
        # no empty-group fix-up (without outlier columns every group holds a real value).
        xg = x2d if not pad else torch.nn.functional.pad(x2d, (0, pad), mode="replicate")
        lo, hi = torch.aminmax(xg.reshape(rows, ng, group_size), dim=-1)
        return lo.float(), hi.float()
    xf = x2d.float()
    x_min = xf
    x_max = xf
    if outlier_idx is not None and outlier_idx.numel() > 0:
        x_min = xf.index_fill(1, outlier_idx, float("inf"))
        x_max = xf.index_fill(1, outlier_idx, float("-inf"))
    if pad:
        x_min = torch.nn.functional.pad(x_min, (0, pad), value=float("inf"))
        x_max = torch.nn.functional.pad(x_max, (0, pad), value=float("-inf"))
    lo = x_min.view(rows, ng, group_size).amin(-1)
    hi = x_max.view(rows, ng, group_size).amax(-1)
    # a group made only of outlier columns: harmless empty range
    empty = lo > hi
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    return lo, hi


def _check_outlier_idx(outlier_idx, x: Tensor) -> Optional[Tensor]:
    if outlier_idx is None:
        return None
    if not isinstance(outlier_idx, Tensor) or outlier_idx.dtype != torch.long or outlier_idx.dim() != 1:
        raise TypeError(
            "outlier_idx must be a 1-D torch.long tensor of column indices "
            f"(got {type(outlier_idx).__name__}"
            + (f" {outlier_idx.dtype} of shape {tuple(outlier_idx.shape)})" if isinstance(outlier_idx, Tensor) else ")")
        )
    if outlier_idx.device != x.device:
        raise ValueError(
            f"outlier_idx is on {outlier_idx.device} but x is on {x.device}: move it with .to(x.device)."
        )
    if outlier_idx.numel() > x.shape[-1]:
        raise ValueError(
            f"{outlier_idx.numel()} outlier columns requested for a tensor of width {x.shape[-1]}."
        )
    return outlier_idx if outlier_idx.numel() > 0 else None


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def column_minmax(x2d: Tensor, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Per-channel (lo, hi) in fp32 over all rows of ``x2d`` (rows, N)."""
    backend = resolve_backend(backend, x2d.device)
    if backend == "triton":
        from . import triton_kernels

        return triton_kernels.column_minmax(x2d)
    lo, hi = torch.aminmax(x2d, dim=0)
    return lo.float(), hi.float()


def observe_columns_torch(x2d: Tensor, flag: Tensor, lo: Tensor, hi: Tensor, score: Tensor,
                          skip_rows: Optional[Tensor] = None) -> None:
    """Reference of :func:`observe_columns`, predicated on the device ``flag`` the same way (no
    host read, so it is capturable too; it always computes)."""
    with no_grad():
        xf = x2d.float()
        keep = torch.ones(xf.shape[0], 1, dtype=torch.bool, device=xf.device)
        if skip_rows is not None and skip_rows.numel():
            keep = keep.index_fill(0, skip_rows, False)
        on = flag.bool()
        new_lo = torch.minimum(lo, torch.where(keep, xf, float("inf")).amin(0))
        new_hi = torch.maximum(hi, torch.where(keep, xf, float("-inf")).amax(0))
        new_score = score + (xf * xf * keep).sum(0)
        for buf, new in ((lo, new_lo), (hi, new_hi), (score, new_score)):
            buf.copy_(torch.where(on, new, buf))


def observe_columns(x2d: Tensor, flag: Tensor, lo: Tensor, hi: Tensor, score: Tensor,
                    skip_rows: Optional[Tensor] = None, backend: str = "auto") -> None:
    """While the int32 device scalar ``flag`` is non-zero, merge the per-column min, max and sum
    of squares of ``x2d`` (rows, N) over every row but ``skip_rows`` into the fp32 ``lo``, ``hi``,
    ``score`` (N,), in place; while it is 0, change nothing. Reads no host value, so a captured
    CUDA graph can launch it on every replay and gather statistics only when the flag says so
    (:meth:`hyclora.quant.ChannelStats.observe`)."""
    backend = resolve_backend(backend, x2d.device)
    if backend == "triton":
        from . import triton_kernels

        triton_kernels.observe_columns(x2d, flag, lo, hi, score, skip_rows)
        return
    observe_columns_torch(x2d, flag, lo, hi, score, skip_rows)


def _pack(x2d, lo, inv_step, bits, group_size, backend) -> Tensor:
    if backend == "triton":
        from . import triton_kernels

        return triton_kernels.quantize_pack(x2d, lo, inv_step, bits, group_size)
    return quantize_pack_torch(x2d, lo, inv_step, bits, group_size)


def quantize(x: Tensor, bits: int, *, stats=None, outlier_idx: Optional[Tensor] = None,
             update: bool = True, backend: str = "auto",
             group_size: Optional[int] = None) -> QuantizedTensor:
    """Compress ``x`` (..., N) to ``bits`` bits per element (+ exact outlier columns).

    Args:
        x: bf16/fp16/fp32 activation of any leading shape.
        bits: 2, 4 or 8.
        stats: a :class:`~hyclora.quant.ChannelStats` of width N: decides the per-channel range
            (calibrating: this micro-batch's min/max, merged into the stats when ``update``;
            frozen: the stored range, values outside it are clamped) and, when it has outlier
            channels and ``outlier_idx`` is None, which columns are kept exactly.
            Without stats the range is this tensor's own per-channel min/max.
        outlier_idx: (k,) long column indices stored exactly.
        update: passed to the stats (False on a gradient-checkpointing recompute).
        backend: 'auto' (Triton on CUDA, torch on CPU), 'triton' or 'torch'.
        group_size: None = per channel. An int G = per-row groups of G consecutive channels,
            each with its own min/max (no calibration; incompatible with ``stats``).

    Host syncs: none on the per-channel path with frozen stats or no stats. Calibration does
    none either (top-k and min/max stay on the device).
    """
    check_bits(bits)
    check_input(x)
    n = x.shape[-1]
    group_size = check_group_size(group_size, n)
    backend = resolve_backend(backend, x.device)
    explicit_outliers = outlier_idx is not None  # an explicit empty set means "none"
    outlier_idx = _check_outlier_idx(outlier_idx, x)
    # no detach op where grad mode is off (the blocks' Functions): every use below is under no_grad
    x2d = x.detach() if torch.is_grad_enabled() else x
    x2d = x2d if x2d.dim() == 2 else x2d.reshape(-1, n)

    if stats is not None:
        if group_size is not None:
            raise ValueError(
                "quantize(stats=..., group_size=...) is not supported: per-group ranges are "
                "computed from each tensor itself. Drop one of the two."
            )
        stats.check_compatible(x2d)
        if stats.frozen and not explicit_outliers:
            # steady state after calibration: cached parameters, one kernel + one gather
            lo, step, inv_step, outlier_idx = stats.frozen_params(bits)
            with no_grad():
                outlier_vals = None if outlier_idx is None else x2d.index_select(1, outlier_idx)
                codes = _pack(x2d, lo, inv_step, bits, None, backend)
            return QuantizedTensor(codes, lo, step, bits=bits, shape=x.shape, dtype=x.dtype,
                                   outlier_idx=outlier_idx, outlier_vals=outlier_vals)
        if not explicit_outliers and stats.num_outliers > 0:
            outlier_idx = stats.select_outliers(x2d, update=update)
        lo, hi = stats.range_for(x2d, update=update, backend=backend)
    elif group_size is None:
        with no_grad():
            lo, hi = column_minmax(x2d, backend)
    else:
        with no_grad():
            lo, hi = _group_range(x2d, group_size, outlier_idx)

    with no_grad():
        lo, step, inv_step = affine_params(lo, hi, bits)
        outlier_vals = None
        if outlier_idx is not None:
            outlier_vals = x2d.index_select(1, outlier_idx)
            if group_size is None:
                # outlier columns carry no information in the codes: code 0, restored exactly
                lo = lo.index_fill(0, outlier_idx, 0.0)
                step = step.index_fill(0, outlier_idx, 0.0)
                inv_step = inv_step.index_fill(0, outlier_idx, 0.0)
        codes = _pack(x2d, lo, inv_step, bits, group_size, backend)
    return QuantizedTensor(codes, lo, step, bits=bits, shape=x.shape, dtype=x.dtype,
                           outlier_idx=outlier_idx, outlier_vals=outlier_vals,
                           group_size=group_size)


def dequantize(q: QuantizedTensor, *, backend: str = "auto") -> Tensor:
    """Back to ``q.dtype`` / ``q.shape``; outlier columns come back exactly."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize expects a QuantizedTensor, got {type(q).__name__}.")
    backend = resolve_backend(backend, q.codes.device)
    n = q.width
    with no_grad():
        if backend == "triton":
            from . import triton_kernels

            out = triton_kernels.unpack_dequantize(q.codes, q.lo, q.step, q.bits, n, q.dtype,
                                                   q.group_size)
        else:
            out = unpack_dequantize_torch(q.codes, q.lo, q.step, q.bits, n, q.dtype, q.group_size)
        if q.outlier_idx is not None:
            out.index_copy_(1, q.outlier_idx, q.outlier_vals)
    return out.view(q.shape)
