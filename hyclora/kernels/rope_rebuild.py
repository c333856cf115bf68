"""Rebuild of rotated Q/K from their compressed pre-RoPE projections: one kernel per tensor.

``intra_inter`` keeps ``Q(X W)`` of q_proj/k_proj (pre-RoPE) and the exact ``XA``; its backward
rebuilds ``Q~ = RoPE(deq + s (XA) B^T)`` op by op: dequantise (+ exact outlier rows), a LoRA
GEMM, scale, add, cast, a head-major view, then RoPE as multiply / negate / concatenate /
multiply / add -- about a dozen launches and as many passes over a ``(b, s, heads * d_h)``
tensor, for Q and again for K. Here it is one kernel each (:func:`rebuild_rope`): every program
takes a block of tokens and one head, dequantises both halves of the head (any bit width; codes
are gathered per column, so head halves need not fall on byte boundaries), overwrites the exact
outlier rows, adds the LoRA term with an in-kernel ``tl.dot`` (rank zero-padded, masked), rotates
the pair (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) and writes ``(b, heads, s, d_h)``.

Numerics: ``x~`` is rounded to the activation dtype (what ``dequantize`` returns), so is the
rebuilt pre-RoPE value (``lora_reconstruct``'s cast); the rotation runs in fp32 and rounds once.
With fp32 activations that is the op-by-op result up to the order of the LoRA dot's sum; with
bf16 it skips the op-by-op path's intermediate roundings of RoPE. The torch reference
(:func:`rebuild_rope_torch`) has exactly the kernel's semantics; it is the CPU path.

``saved`` is a per-channel :class:`~hyclora.quant.QuantizedTensor` or any object with its
``.quant`` plus exact rows ``.idx`` / ``.vals`` (``hyclora.ops.storage.OutlierRows``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hyclora.quant.core import QuantizedTensor, unpack_dequantize_torch
from hyclora.quant.format import packed_width

from .common import (
    INTERPRET,
    block_r,
    cast_out,
    check_triton_device,
    dot_operands,
    launch_opts,
    load_bt,
    lora_term_torch,
    lora_tile,
    next_pow2,
    resolve_backend,
    tl,
    triton,
    with_lora,
)


def _split(saved):
    """(QuantizedTensor, exact row indices, exact rows) of a QuantizedTensor or OutlierRows."""
    if isinstance(saved, QuantizedTensor):
        return saved, None, None
    return saved.quant, saved.idx, saved.vals


def rebuild_rope_takes(saved, head_dim: int) -> bool:
    """Whether the fused rebuild takes this layout: an even ``head_dim`` and per-channel codes
    without exact columns (q/k always are); anything else goes op by op."""
    q, _, _ = _split(saved)
    return head_dim % 2 == 0 and not q.num_outliers and q.group_size is None


def _check(saved, heads: int, head_dim: int, cos: Tensor):
    q, _, _ = _split(saved)
    if q.num_outliers or q.group_size is not None:
        raise ValueError("hyclora fused RoPE rebuild: the saved tensor must be per channel without exact "
                         "columns (q/k are); use the op-by-op rebuild for other layouts.")
    if head_dim % 2 or q.width != heads * head_dim or len(q.shape) != 3:
        raise ValueError(f"hyclora fused RoPE rebuild: saved shape {tuple(q.shape)} is not (b, s, {heads} * "
                         f"{head_dim}) with an even head_dim.")
    b, s, _ = q.shape
    if cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1:] != (s, head_dim):
        raise ValueError(f"hyclora fused RoPE rebuild: cos/sin have shape {tuple(cos.shape)}; expected "
                         f"({b} or 1, {s}, {head_dim}) (the model's per-token tables).")


# ---------------------------------------------------------------------------------------------
# torch reference (the kernel's semantics: the CPU path and the oracle)
# ---------------------------------------------------------------------------------------------


def rebuild_rope_torch(saved, xa: Optional[Tensor], lora_b: Optional[Tensor], scaling: float, cos: Tensor,
                       sin: Tensor, heads: int, head_dim: int, *, dot_dtype=None) -> Tensor:
    """Reference of :func:`rebuild_rope` (the kernel's semantics, in torch)."""
    q, ridx, rvals = _split(saved)
    b, s, n = q.shape
    x = unpack_dequantize_torch(q.codes, q.lo, q.step, q.bits, n, q.dtype)
    if ridx is not None:
        x = x.index_copy(0, ridx, rvals.to(x.dtype))
    if xa is not None:
        dot = dot_dtype or torch.promote_types(xa.dtype, lora_b.dtype)
        lora = lora_term_torch(xa if xa.dim() == 2 else xa.reshape(-1, xa.shape[-1]), lora_b, dot)
        x = with_lora(x.float(), lora, scaling).to(q.dtype)
    x = x.float().view(b, s, heads, head_dim).transpose(1, 2)
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, sn = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    out = torch.cat((x1 * c[..., :half] - x2 * sn[..., :half], x2 * c[..., half:] + x1 * sn[..., half:]), dim=-1)
    return out.to(q.dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _deq_cols(codes_ptr, lo_ptr, step_ptr, rows, cols, cmask, mask, NB, BITS: tl.constexpr):
        # per-column gather of the packed codes: works whatever the byte alignment of `cols`
        # (the codec's unpack_tile needs whole bytes of adjacent columns)
        E: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        byte = tl.load(codes_ptr + rows[:, None] * NB + (cols // E)[None, :], mask=mask, other=0).to(tl.int32)
        code = (byte >> ((cols % E) * BITS)[None, :]) & QMAX
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)
        step = tl.load(step_ptr + cols, mask=cmask, other=0.0)
        return code.to(tl.float32) * step[None, :] + lo[None, :]

    @triton.jit
    def _rope_rebuild_kernel(
        codes_ptr, lo_ptr, step_ptr, rslot_ptr, rvals_ptr, xa_ptr, b_ptr, cos_ptr, sin_ptr, out_ptr,
        M, S, H, N, NB, R, HALF, stride_xm, stride_bn, stride_cb, stride_cs, scale,
        BITS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_LORA: tl.constexpr, DOT_FP32: tl.constexpr,
        RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        t = tl.arange(0, BLOCK_H)
        tmask = t < HALF
        mask = rmask[:, None] & tmask[None, :]
        c1 = h * (2 * HALF) + t
        c2 = c1 + HALF
        # x~ as dequantize() returns it (rounded to the activation dtype), exact rows restored
        x1 = cast_out(_deq_cols(codes_ptr, lo_ptr, step_ptr, rows, c1, tmask, mask, NB, BITS), out_ptr,
                      RNE).to(tl.float32)
        x2 = cast_out(_deq_cols(codes_ptr, lo_ptr, step_ptr, rows, c2, tmask, mask, NB, BITS), out_ptr,
                      RNE).to(tl.float32)
        if HAS_ROWS:
            rslot = tl.load(rslot_ptr + rows, mask=rmask, other=-1)
            is_row = (rslot >= 0)[:, None] & mask
            rbase = rslot.to(tl.int64)[:, None] * N
            x1 = tl.where(is_row, tl.load(rvals_ptr + rbase + c1[None, :], mask=is_row, other=0.0).to(tl.float32), x1)
            x2 = tl.where(is_row, tl.load(rvals_ptr + rbase + c2[None, :], mask=is_row, other=0.0).to(tl.float32), x2)
        if HAS_LORA:
            if DOT_FP32:
                bt1 = 0.0
                bt2 = 0.0
            else:
                bt1 = load_bt(b_ptr, c1, tmask, R, stride_bn, BLOCK_R)
                bt2 = load_bt(b_ptr, c2, tmask, R, stride_bn, BLOCK_R)
            l1 = lora_tile(xa_ptr, b_ptr, bt1, rows, rmask, c1, tmask, R, stride_xm, stride_bn,
                           BLOCK_M, BLOCK_H, BLOCK_R, DOT_FP32)
            l2 = lora_tile(xa_ptr, b_ptr, bt2, rows, rmask, c2, tmask, R, stride_xm, stride_bn,
                           BLOCK_M, BLOCK_H, BLOCK_R, DOT_FP32)
            # lora_reconstruct casts the rebuilt value to the activation dtype
            x1 = cast_out(x1 + l1 * scale, out_ptr, RNE).to(tl.float32)
            x2 = cast_out(x2 + l2 * scale, out_ptr, RNE).to(tl.float32)
        bi = rows // S
        si = rows - bi * S
        # cos/sin: (b or 1, s, d_h); a batch of 1 broadcasts (stride_cb = 0)
        coff = (bi * stride_cb + si * stride_cs)[:, None] + t[None, :]
        cos1 = tl.load(cos_ptr + coff, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + coff, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + coff + HALF, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + coff + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos1 - x2 * sin1
        o2 = x2 * cos2 + x1 * sin2
        # (b, s) row -> (b, h, s, :) of the head-major output
        base = ((bi * H + h) * S + si) * (2 * HALF)
        tl.store(out_ptr + base[:, None] + t[None, :], cast_out(o1, out_ptr, RNE), mask=mask)
        tl.store(out_ptr + base[:, None] + HALF + t[None, :], cast_out(o2, out_ptr, RNE), mask=mask)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def _slot(idx: Tensor, n: int) -> Tensor:
    """(n,) int32: position of each row among the exact rows ``idx``, -1 for the others."""
    slot = torch.full((n,), -1, dtype=torch.int32, device=idx.device)
    slot.index_copy_(0, idx, torch.arange(idx.numel(), dtype=torch.int32, device=idx.device))
    return slot


def rebuild_rope_triton(saved, xa, lora_b, scaling, cos, sin, heads, head_dim, *, dot_dtype=None,
                        block_m: Optional[int] = None):
    """:func:`rebuild_rope`'s Triton path (no input checks; ``block_m`` overrides the row tile)."""
    q, ridx, rvals = _split(saved)
    check_triton_device("fused RoPE rebuild", q.codes, cos)
    b, s, n = q.shape
    m = b * s
    half = head_dim // 2
    xa2 = None if xa is None else xa if xa.dim() == 2 else xa.reshape(m, -1)
    (xa2, bb), r, dot_fp32 = dot_operands("fused RoPE rebuild", dot_dtype, [(xa2, lora_b)])
    out = torch.empty((b, heads, s, head_dim), dtype=q.dtype, device=q.codes.device)
    cos2, sin2 = cos, sin
    if cos2.stride() != sin2.stride() or cos2.stride(-1) != 1:
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    stride_cb = cos2.stride(0) if cos2.shape[0] == b and b > 1 else 0
    block_h = max(16, next_pow2(half))
    if block_m is None:
        # GPU: 8 values per thread and half-head tile at 4 warps (ptxas, sm_90, head_dim 128:
        # 16 values per thread took 212 registers, and spilled at r = 128); the interpreter
        # pays per program: large tiles
        block_m = max(16, min(128, (4 * 32 * 8) // block_h)) if not INTERPRET else max(16, min(next_pow2(m), 64))
    has_rows = ridx is not None
    dummy = q.lo
    _rope_rebuild_kernel[(triton.cdiv(m, block_m), heads)](
        q.codes.contiguous(), q.lo.contiguous(), q.step.contiguous(),
        _slot(ridx, m) if has_rows else dummy, rvals.contiguous() if has_rows else dummy,
        xa2 if xa2 is not None else dummy, bb if bb is not None else dummy, cos2, sin2, out,
        m, s, heads, n, packed_width(n, q.bits), r, half, r, r, stride_cb, cos2.stride(1), float(scaling),
        BITS=q.bits, HAS_ROWS=has_rows, HAS_LORA=xa2 is not None, DOT_FP32=dot_fp32,
        RNE=INTERPRET and q.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_H=block_h,
        BLOCK_R=block_r(r), **launch_opts(4))
    return out


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def rebuild_rope(saved, xa: Optional[Tensor], lora_b: Optional[Tensor], scaling: float, cos: Tensor, sin: Tensor,
                 heads: int, head_dim: int, *, dot_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto") -> Tensor:
    """``RoPE(deq(saved) + s * xa B^T)`` as a contiguous ``(b, heads, s, head_dim)`` tensor.

    ``saved``: the forward's ``QuantizedTensor`` of ``X W`` (per channel, shape ``(b, s,
    heads * head_dim)``) or an ``OutlierRows`` holding one plus exact rows; ``xa`` ``(b, s, r)`` and
    PEFT's ``lora_B`` ``(heads * head_dim, r)``, or both None; ``cos``/``sin`` ``(b, s, head_dim)``.
    """
    _check(saved, heads, head_dim, cos)
    if (xa is None) != (lora_b is None):
        raise ValueError("hyclora fused RoPE rebuild: pass both xa and lora_b, or neither.")
    q, _, _ = _split(saved)
    if resolve_backend(backend, q.codes.device) == "triton":
        return rebuild_rope_triton(saved, xa, lora_b, scaling, cos, sin, heads, head_dim, dot_dtype=dot_dtype)
    return rebuild_rope_torch(saved, xa, lora_b, scaling, cos, sin, heads, head_dim, dot_dtype=dot_dtype)


__all__ = ["rebuild_rope", "rebuild_rope_takes", "rebuild_rope_torch", "rebuild_rope_triton"]
