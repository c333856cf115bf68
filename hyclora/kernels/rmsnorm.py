"""RMSNorm: the op-by-op torch forward/backward and the fused Triton kernels of
``intra_inter_full_fuse`` (launchers, torch references). No autograd (``hyclora.ops.rmsnorm``),
no storage policy (``hyclora.ops.fused_rmsnorm`` is the block glue).

Torch: transformers' Llama/Mistral RMSNorm op by op (fp32 statistics, ``x * rstd`` cast back to
the input dtype before the weight multiply), so block outputs are bit-identical to the unpatched
model; the correct gradient ``dx = rstd * (g - x_hat * mean(g * x_hat))``, ``g = dy * w`` (without
the LayerNorm mean term of the HyC-LoRA reference, its bug 8.1). Long inputs run in row chunks.

Fused: :func:`rmsnorm_quant_forward` reads ``x`` once (whole rows per program) and writes ``y``,
``rstd``, the packed codes of ``x`` (identical to :func:`hyclora.quant.quantize` with the same
parameters; outlier columns have ``lo = step = inv = 0``) and the exact outlier columns;
:func:`rmsnorm_quant_backward` computes ``dx = RMSNormBackward(dy_n, x~) + dy_res`` from the
codes without materialising ``x~``. The kernel's row sum runs in another order than torch, so on
the GPU ``rstd`` (and ``y``) may differ from the op-by-op path by fp32 rounding; on CPU the torch
reference is the op-by-op code. For a dense (rebuilt) input, :func:`rmsnorm_backward_dense`
(dx, residual and per-program fp32 weight-gradient partials in one pass) and
:func:`rmsnorm_from_rstd_fused` (the renormalisation) are one pass each.

``saved`` is a per-channel :class:`~hyclora.quant.QuantizedTensor` or an object with its
``.quant`` plus exact rows ``.idx`` / ``.vals`` (``hyclora.ops.storage.OutlierRows``).

``variant`` (every entry point): how the weight scales the normalised input. ``"w"``
(Llama/Mistral): ``w * (x * rstd).to(x.dtype)``, output in ``promote(w, x)``. ``"1+w"`` (Gemma 2/3):
``((x * rstd) * (1 + w.float())).to(x.dtype)``, all in fp32 and rounded once to ``x.dtype``, as
transformers' ``Gemma2RMSNorm`` computes it (bit-identical forward in every dtype); its backward
follows autograd's fp32 chain (``g = dy.float() * (1 + w)``, ``dw = sum(dy.float() * x_hat)`` with
the unrounded fp32 ``x_hat``), equal to rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hyclora.quant.core import QuantizedTensor, quantize_pack_torch, unpack_dequantize_torch
from hyclora.quant.format import check_bits, packed_width

from .common import (INTERPRET, cast_out, check_triton_device, launch_opts, next_pow2, prev_pow2, resolve_backend, tl,
                     triton)

if triton is not None:
    from hyclora.quant.triton_kernels import pack_tile, quant_codes, unpack_tile


# ---------------------------------------------------------------------------------------------
# op-by-op torch (transformers' formulation; the reference of everything below)
# ---------------------------------------------------------------------------------------------


NORM_VARIANTS = ("w", "1+w")


def one_plus_w(variant: str) -> bool:
    """Whether ``variant`` is Gemma's ``(1 + w)`` scaling (checked: one of :data:`NORM_VARIANTS`)."""
    if variant == "w":
        return False
    if variant == "1+w":
        return True
    raise ValueError(f"hyclora RMSNorm: variant={variant!r}; expected one of {', '.join(NORM_VARIANTS)}")


def norm_out_dtype(x_dtype: torch.dtype, weight: torch.Tensor, variant: str = "w") -> torch.dtype:
    """The output dtype of the norm: ``promote(w, x)`` for ``"w"``, ``x``'s for ``"1+w"``."""
    return x_dtype if one_plus_w(variant) else torch.promote_types(weight.dtype, x_dtype)


def _scale(weight: torch.Tensor) -> torch.Tensor:
    """``1 + w`` in fp32, as Gemma's norm computes it (``1.0 + self.weight.float()``)."""
    return 1.0 + weight.to(torch.float32)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "w") -> Tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if one_plus_w(variant):
        return ((xf * rstd) * _scale(weight)).to(x.dtype), rstd
    return weight * (xf * rstd).to(x.dtype), rstd


def rmsnorm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "w"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, rstd)``; ``rstd`` is fp32 with shape ``x.shape[:-1] + (1,)``. Long inputs
    outside autograd run in row chunks (see ``_CHUNK_ELEMENTS``; row-wise, so the values do not
    depend on it). ``variant``: see the module docstring."""
    d = x.shape[-1]
    recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.numel() <= _CHUNK_ELEMENTS or d == 0 or recording:  # under autograd: one differentiable piece
        return _rms(x, weight, eps, variant)
    x2 = x.reshape(-1, d)
    rstd = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    y = torch.empty(x2.shape, dtype=norm_out_dtype(x.dtype, weight, variant), device=x.device)
    for rows in _row_chunks(x2.shape[0], d):
        y[rows], rstd[rows] = _rms(x2[rows], weight, eps, variant)
    return y.view(x.shape), rstd.view(*x.shape[:-1], 1)


# Rows per chunk of the backward's (and the renormalisation's) fp32 work: its temporaries (the
# upcast input, x_hat, g, g * x_hat) exist for one chunk of at most 2**24 elements (64 MiB in
# fp32) instead of the whole (tokens, hidden) tensor. They were the peak of a checkpointed
# long-context step (the attention block's backward: five fp32 (s, hidden) tensors, 2.5 GiB of
# Llama-2-7B's 8.35 GiB at 32k). Up to 4096 tokens of a 4096-wide model stay one chunk (no extra
# launches on the host-bound short-sequence path). Row-wise results do not depend on the chunking;
# the weight gradient sums its chunks' fp32 partial sums.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _normalised_rows(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, scale) -> torch.Tensor:
    """The normalised output of rows ``x`` with their ``r`` = rstd, op by op as the forward."""
    if scale is not None:
        return ((x.to(torch.float32) * r) * scale).to(x.dtype)
    return weight * (x.to(torch.float32) * r).to(x.dtype)


def _backward_rows(dy, x, r, weight, scale, need_dx: bool, need_dweight: bool):
    """``(dx, fp32 weight-gradient sum over these rows)`` of rows ``x`` (either may be None)."""
    x_hat = x.to(torch.float32) * r
    dx = part = None
    if need_dx:
        if scale is not None:  # (1 + w): autograd's chain is fp32 from dy.float() on
            g = dy.to(torch.float32) * scale
        else:  # autograd multiplies dy * w in the output dtype before upcasting; do the same.
            g = (dy * weight).to(torch.float32)
        dx = (r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)
        del g
    if need_dweight:
        # fp32 accumulation over all tokens (autograd sums in the grad dtype); (1 + w)
        # multiplies the unrounded fp32 x_hat
        xw = x_hat if scale is not None else x_hat.to(x.dtype).to(torch.float32)
        part = (dy.to(torch.float32) * xw).reshape(-1, x.shape[-1]).sum(0)
    return dx, part


def _one_chunk(*tensors: torch.Tensor) -> bool:
    """Whether the row loop would run once over contiguous tensors: then the rows are the tensors
    themselves (no output buffer, slices or copies)."""
    return tensors[0].numel() <= _CHUNK_ELEMENTS and all(t.is_contiguous() for t in tensors)


def _rows_rstd(rstd: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return rstd if rstd.dim() == x.dim() else rstd.view(*x.shape[:-1], 1)


def rmsnorm_from_rstd(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, variant: str = "w") -> torch.Tensor:
    """The forward's output rebuilt from its input ``x`` (or a reconstruction of it) and the
    exact ``rstd``, op by op as :func:`rmsnorm_forward` computes it (bit-identical for the exact
    input), in row chunks."""
    d = x.shape[-1]
    scale = _scale(weight) if one_plus_w(variant) else None
    if _one_chunk(x):
        return _normalised_rows(x, _rows_rstd(rstd, x), weight, scale)
    x2, r2 = x.reshape(-1, d), rstd.reshape(-1, 1)
    out = torch.empty(x2.shape, dtype=norm_out_dtype(x.dtype, weight, variant), device=x.device)
    for rows in _row_chunks(x2.shape[0], d):
        out[rows] = _normalised_rows(x2[rows], r2[rows], weight, scale)
    return out.view(x.shape)


def rmsnorm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    need_dx: bool = True,
    need_dweight: bool = False,
    variant: str = "w",
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`rmsnorm_forward` w.r.t. ``x`` and ``weight``, in row chunks.

    ``x`` may be a reconstruction of the forward input (dequantised); ``rstd`` is the exact
    statistic saved by the forward, so the scale of the gradient stays exact.
    """
    d = x.shape[-1]
    scale = _scale(weight) if one_plus_w(variant) else None
    if _one_chunk(x, dy):
        dx, part = _backward_rows(dy, x, _rows_rstd(rstd, x), weight, scale, need_dx, need_dweight)
        # + 0.0: as the loop's accumulation into zeros (a -0.0 sum comes out +0.0 there too)
        return dx, (None if part is None else part.add_(0.0).to(weight.dtype))
    x2, dy2, r2 = x.reshape(-1, d), dy.reshape(-1, d), rstd.reshape(-1, 1)
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dweight = torch.zeros(d, dtype=torch.float32, device=x.device) if need_dweight else None
    for rows in _row_chunks(x2.shape[0], d):
        dx_rows, part = _backward_rows(dy2[rows], x2[rows], r2[rows], weight, scale, need_dx, need_dweight)
        if need_dx:
            dx[rows] = dx_rows
        if need_dweight:
            dweight += part
        del dx_rows, part
    return (None if dx is None else dx.view(x.shape)), (None if dweight is None else dweight.to(weight.dtype))


# ---------------------------------------------------------------------------------------------
# torch references of the fused kernels (the op-by-op code itself: the CPU path and the oracle)
# ---------------------------------------------------------------------------------------------


def rmsnorm_quant_forward_torch(x2d: Tensor, weight: Tensor, eps: float, lo: Tensor, inv: Tensor,
                                outlier_idx: Optional[Tensor], bits: int, row_score: bool = False, variant: str = "w"):
    """Reference of :func:`rmsnorm_quant_forward`: ``(y, rstd (M,), codes, outlier_vals,
    row_score)``; ``row_score`` = max |x| per row in x's dtype (None unless asked)."""
    y, rstd = rmsnorm_forward(x2d, weight, eps, variant)
    codes = quantize_pack_torch(x2d, lo, inv, bits)
    vals = None if outlier_idx is None else x2d.index_select(1, outlier_idx)
    score = x2d.abs().amax(1) if row_score else None
    return y, rstd.view(-1), codes, vals, score


def _split_rows(saved) -> Tuple[QuantizedTensor, Optional[Tensor], Optional[Tensor]]:
    """(QuantizedTensor, exact row indices, exact rows) of a QuantizedTensor or OutlierRows."""
    if isinstance(saved, QuantizedTensor):
        return saved, None, None
    return saved.quant, saved.idx, saved.vals


def rmsnorm_quant_backward_torch(saved, rstd: Tensor, weight: Tensor, dy_n: Tensor,
                                 dy_res: Optional[Tensor], variant: str = "w"):
    """Reference of :func:`rmsnorm_quant_backward`: dequantise, then the op-by-op backward."""
    q, ridx, rvals = _split_rows(saved)
    n = q.width
    x_hat = unpack_dequantize_torch(q.codes, q.lo, q.step, q.bits, n, q.dtype)
    if q.outlier_idx is not None:
        x_hat.index_copy_(1, q.outlier_idx, q.outlier_vals)
    if ridx is not None:
        x_hat.index_copy_(0, ridx, rvals.to(x_hat.dtype))
    dx, _ = rmsnorm_backward(dy_n, x_hat, rstd.view(-1, 1), weight, need_dx=True, need_dweight=False,
                             variant=variant)
    return dx if dy_res is None else dx + dy_res


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:
    # cast_out(v, like_ptr, RNE).to(tl.float32): v rounded to like_ptr's element type and back to
    # fp32, the intermediate roundings that torch makes when an op's result has a 16-bit dtype

    @triton.jit
    def _norm_operands(xn, x_ptr, w_ptr, cols, cmask, RNE_X: tl.constexpr, ONE_PLUS_W: tl.constexpr):
        """``(h, w)`` in fp32 whose product is the norm output: ``(x * rstd).to(x.dtype)`` and
        ``w`` (variant "w"), or the unrounded ``x * rstd`` and ``1 + w`` (variant "1+w")."""
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if ONE_PLUS_W:
            return xn, 1.0 + w
        return cast_out(xn, x_ptr, RNE_X).to(tl.float32), w

    @triton.jit
    def _rms_fwd_kernel(
        x_ptr, w_ptr, lo_ptr, inv_ptr, idx_ptr,
        y_ptr, rstd_ptr, codes_ptr, vals_ptr, score_ptr,
        M, D, NB, K, stride_xm, stride_ym, eps,
        BITS: tl.constexpr, HAS_OUT: tl.constexpr, ROW_SCORE: tl.constexpr,
        RNE_X: tl.constexpr, RNE_Y: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PLUS_W: tl.constexpr = False,
    ):
        E: tl.constexpr = 8 // BITS
        BLOCK_B: tl.constexpr = BLOCK_D // E
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        xr = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        x = xr.to(tl.float32)
        # rstd = 1 / sqrt(mean(x^2) + eps) with IEEE sqrt and division (no approximations)
        var = tl.sum(x * x, axis=1) / D
        rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        if ROW_SCORE:
            # max |x| of each row (exact in x's dtype): the host picks the exact outlier rows
            score = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
            tl.store(score_ptr + rows, score.to(score_ptr.dtype.element_ty), mask=rmask)
        h, w = _norm_operands(x * rstd[:, None], x_ptr, w_ptr, cols, cmask, RNE_X, ONE_PLUS_W)
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], cast_out(w[None, :] * h, y_ptr, RNE_Y),
                 mask=mask)
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)[None, :]
        inv = tl.load(inv_ptr + cols, mask=cmask, other=0.0)[None, :]
        packed = pack_tile(quant_codes(x, lo, inv, mask, BITS), BLOCK_M, BLOCK_D, BITS)
        bcols = tl.arange(0, BLOCK_B)
        tl.store(codes_ptr + rows[:, None] * NB + bcols[None, :], packed,
                 mask=rmask[:, None] & (bcols < NB)[None, :])
        if HAS_OUT:
            # the exact outlier columns: a gather from the rows just read (L1/L2 hits)
            ks = tl.arange(0, BLOCK_K)
            kmask = ks < K
            idx = tl.load(idx_ptr + ks, mask=kmask, other=0)
            omask = rmask[:, None] & kmask[None, :]
            v = tl.load(x_ptr + rows[:, None] * stride_xm + idx[None, :], mask=omask, other=0.0)
            tl.store(vals_ptr + rows[:, None] * K + ks[None, :], v, mask=omask)

    @triton.jit
    def _rms_bwd_kernel(
        codes_ptr, lo_ptr, step_ptr, slot_ptr, vals_ptr, rslot_ptr, rvals_ptr,
        rstd_ptr, w_ptr, dyn_ptr, dres_ptr, xdt_ptr, g_ptr, dx_ptr,
        M, D, NB, K, stride_dyn, stride_dres, stride_dx,
        BITS: tl.constexpr, HAS_OUT: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_RES: tl.constexpr,
        RNE_X: tl.constexpr, RNE_G: tl.constexpr, RNE_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PLUS_W: tl.constexpr = False,
    ):
        E: tl.constexpr = 8 // BITS
        BLOCK_B: tl.constexpr = BLOCK_D // E
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        bcols = tl.arange(0, BLOCK_B)
        p = tl.load(codes_ptr + rows[:, None] * NB + bcols[None, :],
                    mask=rmask[:, None] & (bcols < NB)[None, :], other=0)
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)[None, :]
        step = tl.load(step_ptr + cols, mask=cmask, other=0.0)[None, :]
        # x~ as dequantize() returns it: rounded to the activation dtype (xdt_ptr's element type)
        xh = cast_out(unpack_tile(p, BLOCK_M, BLOCK_D, BITS) * step + lo, xdt_ptr, RNE_X).to(tl.float32)
        if HAS_OUT:
            # exact outlier columns: slot[c] = position of column c among them, -1 elsewhere
            slot = tl.load(slot_ptr + cols, mask=cmask, other=-1)
            is_out = (slot >= 0)[None, :] & mask
            ov = tl.load(vals_ptr + rows[:, None] * K + slot[None, :], mask=is_out, other=0.0)
            xh = tl.where(is_out, ov.to(tl.float32), xh)
        if HAS_ROWS:
            # exact outlier rows (they override everything): rslot[row] = its position, or -1
            rslot = tl.load(rslot_ptr + rows, mask=rmask, other=-1)
            is_row = (rslot >= 0)[:, None] & mask
            rv = tl.load(rvals_ptr + rslot.to(tl.int64)[:, None] * D + cols[None, :], mask=is_row, other=0.0)
            xh = tl.where(is_row, rv.to(tl.float32), xh)
        xh = tl.where(mask, xh, 0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        dyn = tl.load(dyn_ptr + rows[:, None] * stride_dyn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        _store_dx(xh * rstd[:, None], rstd, dyn, rows, cols, mask, w_ptr, dres_ptr, xdt_ptr, g_ptr, dx_ptr,
                  D, stride_dres, stride_dx, HAS_RES, RNE_X, RNE_G, RNE_OUT, ONE_PLUS_W)

    @triton.jit
    def _store_dx(xn, rstd, dyn, rows, cols, mask, w_ptr, dres_ptr, xdt_ptr, g_ptr, dx_ptr,
                  D, stride_dres, stride_dx,
                  HAS_RES: tl.constexpr, RNE_X: tl.constexpr, RNE_G: tl.constexpr, RNE_OUT: tl.constexpr,
                  ONE_PLUS_W: tl.constexpr = False):
        # dx = rstd * (g - xn * mean(g * xn)), g = dy * w, in rmsnorm_backward's op order (+ residual)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        if ONE_PLUS_W:  # g = dy.float() * (1 + w), fp32 throughout
            g = dyn * (1.0 + w)[None, :]
        else:
            g = cast_out(dyn * w[None, :], g_ptr, RNE_G).to(tl.float32)  # (dy * weight) in the promoted dtype
        g = tl.where(mask, g, 0.0)
        mean_gx = tl.sum(g * xn, axis=1) / D
        dx = rstd[:, None] * (g - xn * mean_gx[:, None])
        if HAS_RES:
            dx = cast_out(dx, xdt_ptr, RNE_X).to(tl.float32)  # .to(x.dtype), then + the residual gradient
            dres = tl.load(dres_ptr + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0)
            dx = dx + dres.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], cast_out(dx, dx_ptr, RNE_OUT), mask=mask)

    @triton.jit
    def _rms_bwd_dense_kernel(
        x_ptr, rstd_ptr, w_ptr, dyn_ptr, dres_ptr, g_ptr, dx_ptr, dwp_ptr,
        M, D, stride_x, stride_dyn, stride_dres, stride_dx,
        NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, HAS_RES: tl.constexpr,
        RNE_X: tl.constexpr, RNE_G: tl.constexpr, RNE_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ITERS: tl.constexpr, ONE_PLUS_W: tl.constexpr = False,
    ):
        # rmsnorm_backward for a dense (reconstructed) input: one read of x and dy per row; the
        # weight gradient as one fp32 partial sum per program (summed over programs on the host
        # side), so no (tokens, hidden) fp32 temporary exists
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for it in range(ROW_ITERS):
            rows = ((tl.program_id(0) * ROW_ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            xn = x * rstd[:, None]
            dyn = tl.load(dyn_ptr + rows[:, None] * stride_dyn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if NEED_DX:
                _store_dx(xn, rstd, dyn, rows, cols, mask, w_ptr, dres_ptr, x_ptr, g_ptr, dx_ptr,
                          D, stride_dres, stride_dx, HAS_RES, RNE_X, RNE_G, RNE_OUT, ONE_PLUS_W)
            if NEED_DW:
                # dy * (x * rstd).to(x.dtype) ("w") or dy * (x * rstd) ("1+w"), summed in fp32
                if ONE_PLUS_W:
                    xw = xn
                else:
                    xw = cast_out(xn, x_ptr, RNE_X).to(tl.float32)
                dw += tl.sum(tl.where(mask, dyn * xw, 0.0), axis=0)
        if NEED_DW:
            tl.store(dwp_ptr + tl.program_id(0) * D + cols, dw, mask=cmask)

    @triton.jit
    def _rms_from_rstd_kernel(x_ptr, rstd_ptr, w_ptr, out_ptr, M, D, stride_x, stride_out,
                              RNE_X: tl.constexpr, RNE_OUT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PLUS_W: tl.constexpr = False):
        # weight * (x * rstd).to(x.dtype) (or (x * rstd) * (1 + w)): rmsnorm_from_rstd's roundings, one pass
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        h, w = _norm_operands(x * rstd[:, None], x_ptr, w_ptr, cols, cmask, RNE_X, ONE_PLUS_W)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], cast_out(w[None, :] * h, out_ptr, RNE_OUT),
                 mask=mask)


def gpu_blocks(d: int):
    """(BLOCK_M, BLOCK_D, num_warps) on the GPU: whole rows per program, 16 values per thread.
    sm_90 ptxas (ahead of time, bf16): 64-148 registers, no spills up to d = 4096; d = 5120
    (padded to 8192, 16 warps, at most 128 registers per thread) spills 32 bytes."""
    block_d = max(16, next_pow2(d))
    warps = 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)
    return max(1, (warps * 32 * 16) // block_d), block_d, warps


def _blocks(m: int, d: int):
    if INTERPRET:  # the interpreter pays per program: many rows per program
        block_d = max(16, next_pow2(d))
        return max(1, min(next_pow2(m), 4096 // block_d, 64)), block_d, 4
    return gpu_blocks(d)


def _rne(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def rmsnorm_quant_forward_triton(x2d, weight, eps, lo, inv, outlier_idx, bits, row_score=False, variant="w"):
    check_triton_device("fused RMSNorm", x2d)
    x2d = x2d.contiguous()
    m, d = x2d.shape
    nb = packed_width(d, bits)
    y_dtype = norm_out_dtype(x2d.dtype, weight, variant)
    y = torch.empty((m, d), dtype=y_dtype, device=x2d.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x2d.device)
    codes = torch.empty((m, nb), dtype=torch.uint8, device=x2d.device)
    k = 0 if outlier_idx is None else outlier_idx.numel()
    vals = torch.empty((m, k), dtype=x2d.dtype, device=x2d.device) if k else None
    score = torch.empty((m,), dtype=x2d.dtype, device=x2d.device) if row_score else None
    block_m, block_d, warps = _blocks(m, d)
    _rms_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2d, weight.contiguous(), lo.float().contiguous(), inv.float().contiguous(),
        outlier_idx if k else lo, y, rstd, codes, vals if k else y, score if row_score else y,
        m, d, nb, k, x2d.stride(0), y.stride(0), float(eps),
        BITS=bits, HAS_OUT=k > 0, ROW_SCORE=row_score, RNE_X=_rne(x2d.dtype), RNE_Y=_rne(y_dtype),
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=max(1, next_pow2(k)), ONE_PLUS_W=one_plus_w(variant),
        **launch_opts(warps))
    return y, rstd, codes, vals, score


def _slot_map(idx: Tensor, d: int) -> Tensor:
    """(d,) int32: position of each column among the outlier columns, -1 for the others."""
    slot = torch.full((d,), -1, dtype=torch.int32, device=idx.device)
    slot.index_copy_(0, idx, torch.arange(idx.numel(), dtype=torch.int32, device=idx.device))
    return slot


def _rows_2d(t: Tensor, d: int) -> Tensor:
    """``(rows, d)`` view of ``t`` with a unit last stride (a copy only when it has none)."""
    t = t.reshape(-1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


def rmsnorm_quant_backward_triton(saved, rstd, weight, dy_n, dy_res, variant="w"):
    q, ridx, rvals = _split_rows(saved)
    check_triton_device("fused RMSNorm", q.codes, dy_n)
    m, d = q.rows, q.width
    dy_n = _rows_2d(dy_n, d)
    if dy_res is not None:
        dy_res = _rows_2d(dy_res, d)
    g_dtype = torch.float32 if one_plus_w(variant) else torch.promote_types(dy_n.dtype, weight.dtype)
    x_dtype = q.dtype
    dx_dtype = x_dtype if dy_res is None else torch.promote_types(x_dtype, dy_res.dtype)
    dx = torch.empty((m, d), dtype=dx_dtype, device=dy_n.device)
    k = q.num_outliers
    # zero-size tensors that only carry a dtype for the kernel's roundings
    x_like = torch.empty(0, dtype=x_dtype, device=dy_n.device)
    g_like = torch.empty(0, dtype=g_dtype, device=dy_n.device)
    block_m, block_d, warps = _blocks(m, d)
    _rms_bwd_kernel[(triton.cdiv(m, block_m),)](
        q.codes.contiguous(), q.lo.contiguous(), q.step.contiguous(),
        _slot_map(q.outlier_idx, d) if k else q.lo, q.outlier_vals.contiguous() if k else q.lo,
        _slot_map(ridx, m) if ridx is not None else q.lo, rvals.contiguous() if ridx is not None else q.lo,
        rstd.reshape(m).contiguous(), weight.contiguous(), dy_n, dy_res if dy_res is not None else dy_n,
        x_like, g_like, dx,
        m, d, packed_width(d, q.bits), k, dy_n.stride(0),
        dy_res.stride(0) if dy_res is not None else 0, dx.stride(0),
        BITS=q.bits, HAS_OUT=k > 0, HAS_ROWS=ridx is not None, HAS_RES=dy_res is not None,
        RNE_X=_rne(x_dtype), RNE_G=_rne(g_dtype), RNE_OUT=_rne(dx_dtype),
        BLOCK_M=block_m, BLOCK_D=block_d, ONE_PLUS_W=one_plus_w(variant), **launch_opts(warps))
    return dx


def rmsnorm_backward_dense_triton(dy_n: Tensor, x: Tensor, rstd: Tensor, weight: Tensor,
                                  dy_res: Optional[Tensor], need_dx: bool, need_dweight: bool, variant: str = "w"):
    check_triton_device("fused RMSNorm", x, dy_n)
    d = x.shape[-1]
    x2, dy2 = _rows_2d(x, d), _rows_2d(dy_n, d)
    m = x2.shape[0]
    res2 = None if dy_res is None else _rows_2d(dy_res, d)
    g_dtype = torch.float32 if one_plus_w(variant) else torch.promote_types(dy_n.dtype, weight.dtype)
    dx_dtype = x.dtype if res2 is None else torch.promote_types(x.dtype, res2.dtype)
    dx = torch.empty((m, d), dtype=dx_dtype, device=x.device) if need_dx else None
    block_m, block_d, warps = _blocks(m, d)
    # a few hundred programs: enough to fill the GPU, few partial sums to add up. A power of two
    # (rounded down: at least as many programs): ROW_ITERS is a constexpr, and one per token
    # count would compile the kernel again for every new padded length
    row_iters = 1 if INTERPRET else prev_pow2(max(1, min(64, triton.cdiv(m, block_m * 528))))
    grid = triton.cdiv(m, block_m * row_iters)
    partial = torch.empty((grid, d), dtype=torch.float32, device=x.device) if need_dweight else None
    g_like = torch.empty(0, dtype=g_dtype, device=x.device)
    _rms_bwd_dense_kernel[(grid,)](
        x2, rstd.reshape(m).contiguous(), weight.contiguous(), dy2, res2 if res2 is not None else dy2, g_like,
        dx if dx is not None else dy2, partial if partial is not None else rstd,
        m, d, x2.stride(0), dy2.stride(0), res2.stride(0) if res2 is not None else 0, d,
        NEED_DX=need_dx, NEED_DW=need_dweight, HAS_RES=res2 is not None,
        RNE_X=_rne(x.dtype), RNE_G=_rne(g_dtype), RNE_OUT=_rne(dx_dtype),
        BLOCK_M=block_m, BLOCK_D=block_d, ROW_ITERS=row_iters, ONE_PLUS_W=one_plus_w(variant), **launch_opts(warps))
    dw = None if partial is None else partial.sum(0).to(weight.dtype)
    return (None if dx is None else dx.view(dy_n.shape)), dw


def rmsnorm_from_rstd_triton(x: Tensor, rstd: Tensor, weight: Tensor, variant: str = "w") -> Tensor:
    check_triton_device("fused RMSNorm", x)
    d = x.shape[-1]
    x2 = _rows_2d(x, d)
    m = x2.shape[0]
    out = torch.empty((m, d), dtype=norm_out_dtype(x.dtype, weight, variant), device=x.device)
    block_m, block_d, warps = _blocks(m, d)
    _rms_from_rstd_kernel[(triton.cdiv(m, block_m),)](
        x2, rstd.reshape(m).contiguous(), weight.contiguous(), out, m, d, x2.stride(0), d,
        RNE_X=_rne(x.dtype), RNE_OUT=_rne(out.dtype), BLOCK_M=block_m, BLOCK_D=block_d,
        ONE_PLUS_W=one_plus_w(variant), **launch_opts(warps))
    return out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# public operator entry points
# ---------------------------------------------------------------------------------------------


def rmsnorm_quant_forward(x2d: Tensor, weight: Tensor, eps: float, lo: Tensor, inv: Tensor,
                          outlier_idx: Optional[Tensor], bits: int, *, row_score: bool = False,
                          backend: str = "auto", variant: str = "w"):
    """RMSNorm of ``x2d`` (M, D) that also compresses its input in the same pass.

    ``lo``/``inv``: (D,) fp32 per-channel parameters (0 on outlier columns); ``outlier_idx``:
    (k,) long columns kept exactly, or None. Returns ``(y, rstd (M,) fp32, codes, outlier_vals,
    row_score)`` with ``y`` in ``promote(weight.dtype, x.dtype)``, ``codes`` identical to
    :func:`hyclora.quant.quantize`'s with these parameters, ``outlier_vals`` (M, k) or None, and
    with ``row_score=True`` the max |x| of each row (M,) in x's dtype (to pick exact rows).
    """
    check_bits(bits)
    if x2d.dim() != 2 or weight.shape != (x2d.shape[1],):
        raise ValueError(f"hyclora fused RMSNorm: x {tuple(x2d.shape)} must be 2-D (tokens, hidden) and the "
                         f"weight ({x2d.shape[-1]},), got {tuple(weight.shape)}; reshape(-1, hidden) first.")
    d = x2d.shape[1]
    for name, t in (("lo", lo), ("inv", inv)):
        if t.shape != (d,):
            raise ValueError(f"hyclora fused RMSNorm: {name} has shape {tuple(t.shape)}; expected ({d},).")
    one_plus_w(variant)
    if resolve_backend(backend, x2d.device) == "triton":
        return rmsnorm_quant_forward_triton(x2d, weight, eps, lo, inv, outlier_idx, bits, row_score, variant)
    return rmsnorm_quant_forward_torch(x2d, weight, eps, lo, inv, outlier_idx, bits, row_score, variant)


def rmsnorm_quant_backward(saved, rstd: Tensor, weight: Tensor, dy_n: Tensor,
                           dy_res: Optional[Tensor] = None, *, backend: str = "auto", variant: str = "w") -> Tensor:
    """``dx = RMSNormBackward(dy_n, x~, rstd, weight) + dy_res`` with ``x~`` read from ``saved``
    (the forward's :class:`QuantizedTensor`, per channel, outlier columns exact, or an
    ``OutlierRows`` holding one plus exact rows). Shape of ``dy_n``."""
    q, _, _ = _split_rows(saved)
    if q.group_size is not None:
        raise ValueError("hyclora fused RMSNorm: per-group codes are not supported (per channel only).")
    if dy_n.numel() != q.rows * q.width or dy_n.shape[-1] != q.width:
        raise ValueError(f"hyclora fused RMSNorm: dy_n {tuple(dy_n.shape)} does not match the saved input "
                         f"{tuple(q.shape)}.")
    shape = dy_n.shape
    one_plus_w(variant)
    if resolve_backend(backend, dy_n.device) == "triton":
        dx = rmsnorm_quant_backward_triton(saved, rstd, weight, dy_n, dy_res, variant)
    else:
        dx = rmsnorm_quant_backward_torch(saved, rstd, weight, dy_n.reshape(-1, q.width),
                                          None if dy_res is None else dy_res.reshape(-1, q.width), variant)
    return dx.view(shape)


def rmsnorm_backward_dense(dy_n: Tensor, x: Tensor, rstd: Tensor, weight: Tensor, dy_res: Optional[Tensor] = None,
                           *, need_dx: bool = True, need_dweight: bool = False, backend: str = "auto",
                           variant: str = "w"):
    """:func:`rmsnorm_backward` of a dense input ``x`` (the dequantised norm
    input, when the block rebuilds it anyway for the LoRA terms), plus ``dy_res`` added to ``dx``:
    ``(dx, dweight)``. The Triton path reads ``x`` and ``dy_n`` once and keeps no fp32
    (tokens, hidden) temporaries; ``dx`` follows the reference's roundings (equal up to the row
    sum order), the weight gradient sums per-program fp32 partials (another order than torch)."""
    d = x.shape[-1]
    if weight.shape != (d,) or dy_n.shape != x.shape or rstd.numel() * d != x.numel():
        raise ValueError(f"hyclora RMSNorm backward: x {tuple(x.shape)}, dy {tuple(dy_n.shape)}, rstd "
                         f"{tuple(rstd.shape)} and weight {tuple(weight.shape)} do not match.")
    one_plus_w(variant)
    if resolve_backend(backend, x.device) == "triton":
        return rmsnorm_backward_dense_triton(dy_n, x, rstd, weight, dy_res, need_dx, need_dweight, variant)
    dx, dw = rmsnorm_backward(dy_n, x, rstd, weight, need_dx=need_dx, need_dweight=need_dweight, variant=variant)
    return (dx if dx is None or dy_res is None else dx + dy_res), dw


def rmsnorm_from_rstd_fused(x: Tensor, rstd: Tensor, weight: Tensor, *, backend: str = "auto",
                            variant: str = "w") -> Tensor:
    """:func:`rmsnorm_from_rstd` in one pass on the Triton path (bit-identical:
    elementwise, the same roundings)."""
    if weight.shape != (x.shape[-1],) or rstd.numel() * x.shape[-1] != x.numel():
        raise ValueError(f"hyclora RMSNorm: x {tuple(x.shape)}, rstd {tuple(rstd.shape)} and weight "
                         f"{tuple(weight.shape)} do not match.")
    one_plus_w(variant)
    if resolve_backend(backend, x.device) == "triton":
        return rmsnorm_from_rstd_triton(x, rstd, weight, variant)
    return rmsnorm_from_rstd(x, rstd, weight, variant)


__all__ = [
    "NORM_VARIANTS",
    "one_plus_w",
    "norm_out_dtype",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "rmsnorm_from_rstd",
    "rmsnorm_quant_forward",
    "rmsnorm_quant_forward_torch",
    "rmsnorm_quant_forward_triton",
    "rmsnorm_quant_backward",
    "rmsnorm_quant_backward_torch",
    "rmsnorm_quant_backward_triton",
    "rmsnorm_backward_dense",
    "rmsnorm_backward_dense_triton",
    "rmsnorm_from_rstd_fused",
    "rmsnorm_from_rstd_triton",
    "gpu_blocks",
]
