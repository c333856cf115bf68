"""Fused activation epilogue with LoRA on one projection (``F = act(Y_W + s (XA) B^T)``): the
encoder FFN's GELU under ``intra_inter_full_fuse``, one kernel forward, one kernel backward.

* forward (:func:`act_lora_forward`): reads the base output ``Y_W = X W + bias``, the ``(tokens,
  r)`` LoRA-A output and ``lora_B``; writes the codes of ``Y_W`` (the codec of :mod:`hyclora.quant`)
  and ``F``. The full ``U = Y_W + s (XA) B^T`` never reaches memory.
* backward (:func:`act_lora_backward`): reads the codes, the LoRA operands and ``dF``; writes
  ``dU = dF * act'(U~)`` and, if asked, ``F~ = act(U~)`` (the next projection's LoRA-A gradient
  needs it).

Same conventions as :mod:`hyclora.kernels.glu`: masked loads and stores (any shape and rank),
fp32 between loads and stores, LoRA dot operands rounded first to the dtype torch would use. The
torch references (``*_torch``) are the CPU path and the test oracle.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hyclora.quant.core import quantize_pack_torch, unpack_codes
from hyclora.quant.format import check_bits, packed_width
from hyclora.quant.triton_kernels import pack_tile, quant_codes, unpack_tile

from .activations import act_and_deriv, act_deriv_fp32, act_fp32, activation_code
from .common import (FIXED_TILE, INTERPRET, block_r, byte_columns, cast_out, channel_row, check_triton_device,
                     column_block, dot_operands, interpret_tile, launch_opts, lora_term_torch, lora_tile, program_bt,
                     promoted_dtype, resolve_backend, row_block, tl, triton, with_lora)

_WHAT = "fused activation epilogue"

# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


def _check_args(yw_or_df: Tensor, xa: Optional[Tensor], b: Optional[Tensor], lo: Tensor, other: Tensor, what: str):
    if yw_or_df.dim() != 2:
        raise ValueError(f"hyclora {_WHAT}: {what} has shape {tuple(yw_or_df.shape)}; reshape(-1, d_ff) first.")
    m, n = yw_or_df.shape
    if (xa is None) != (b is None):
        raise ValueError(f"hyclora {_WHAT}: pass both xa and lora_B, or neither (no LoRA).")
    if xa is not None and (xa.dim() != 2 or xa.shape[0] != m or b.shape != (n, xa.shape[1])):
        raise ValueError(f"hyclora {_WHAT}: xa {tuple(xa.shape)} / lora_B {tuple(b.shape)} do not fit "
                         f"({m}, r) / ({n}, r).")
    for t in (lo, other):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"hyclora {_WHAT}: per-channel parameters of shape {tuple(t.shape)}; expected ({n},).")


# ---------------------------------------------------------------------------------------------
# torch reference (the oracle of the tests, and the CPU path)
# ---------------------------------------------------------------------------------------------


def act_lora_forward_torch(yw, xa, b, scale, lo, inv, bits, act="gelu", *, dot_dtype=None):
    """Reference of :func:`act_lora_forward` (same arguments, same results)."""
    codes = quantize_pack_torch(yw, lo, inv, bits)
    u = with_lora(yw.float(), lora_term_torch(xa, b, promoted_dtype(dot_dtype, xa, b)), scale)
    return codes, act_fp32(u, act).to(yw.dtype)


def act_lora_backward_torch(codes, lo, step, xa, b, scale, df, bits, act="gelu", *, dtype, need_f=True,
                            dot_dtype=None):
    """Reference of :func:`act_lora_backward` (same arguments, same results)."""
    n = df.shape[1]
    u = unpack_codes(codes, bits, n).float() * step + lo
    u = with_lora(u, lora_term_torch(xa, b, promoted_dtype(dot_dtype, xa, b)), scale)
    out_dtype = torch.promote_types(df.dtype, dtype)
    du = (df.float() * act_deriv_fp32(u, act)).to(out_dtype)
    f_hat = act_fp32(u, act).to(dtype) if need_f else None
    return du, f_hat


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _act_lora_fwd_kernel(
        y_ptr, xa_ptr, b_ptr, lo_ptr, inv_ptr, c_ptr, f_ptr,
        M, N, NB, R, stride_ym, stride_xm, stride_bn, stride_fm, scale,
        BITS: tl.constexpr, HAS_LORA: tl.constexpr, ACT: tl.constexpr, DOT_FP32: tl.constexpr,
        EMULATE_BF16_RNE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_ITERS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols, cmask = column_block(pid_n, N, BLOCK_N)
        bcols, bmask = byte_columns(pid_n, NB, BLOCK_N, BITS)
        lo, inv = channel_row(lo_ptr, cols, cmask), channel_row(inv_ptr, cols, cmask)
        bt = program_bt(b_ptr, cols, cmask, R, stride_bn, HAS_LORA, DOT_FP32, BLOCK_R, BLOCK_N)
        for it in tl.static_range(ROW_ITERS):
            rows, rmask = row_block(pid_m, it, M, BLOCK_M, ROW_ITERS)
            mask = rmask[:, None] & cmask[None, :]
            y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            packed = pack_tile(quant_codes(y, lo, inv, mask, BITS), BLOCK_M, BLOCK_N, BITS)
            tl.store(c_ptr + rows[:, None] * NB + bcols[None, :], packed, mask=rmask[:, None] & bmask[None, :])
            u = y
            if HAS_LORA:
                u = y + lora_tile(xa_ptr, b_ptr, bt, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                                  BLOCK_M, BLOCK_N, BLOCK_R, DOT_FP32) * scale
            f, _ = act_and_deriv(u, ACT)
            tl.store(f_ptr + rows[:, None] * stride_fm + cols[None, :], cast_out(f, f_ptr, EMULATE_BF16_RNE),
                     mask=mask)

    @triton.jit
    def _act_lora_bwd_kernel(
        c_ptr, lo_ptr, step_ptr, xa_ptr, b_ptr, df_ptr, du_ptr, fh_ptr,
        M, N, NB, R, stride_dfm, stride_xm, stride_bn, stride_om, scale,
        BITS: tl.constexpr, HAS_LORA: tl.constexpr, ACT: tl.constexpr, DOT_FP32: tl.constexpr,
        NEED_F: tl.constexpr, EMULATE_BF16_RNE_GRAD: tl.constexpr, EMULATE_BF16_RNE_F: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_ITERS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols, cmask = column_block(pid_n, N, BLOCK_N)
        bcols, bmask = byte_columns(pid_n, NB, BLOCK_N, BITS)
        lo, st = channel_row(lo_ptr, cols, cmask), channel_row(step_ptr, cols, cmask)
        bt = program_bt(b_ptr, cols, cmask, R, stride_bn, HAS_LORA, DOT_FP32, BLOCK_R, BLOCK_N)
        for it in tl.static_range(ROW_ITERS):
            rows, rmask = row_block(pid_m, it, M, BLOCK_M, ROW_ITERS)
            mask = rmask[:, None] & cmask[None, :]
            codes = tl.load(c_ptr + rows[:, None] * NB + bcols[None, :], mask=rmask[:, None] & bmask[None, :], other=0)
            u = unpack_tile(codes, BLOCK_M, BLOCK_N, BITS) * st + lo
            if HAS_LORA:
                u = u + lora_tile(xa_ptr, b_ptr, bt, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                                  BLOCK_M, BLOCK_N, BLOCK_R, DOT_FP32) * scale
            f, deriv = act_and_deriv(u, ACT)
            dfv = tl.load(df_ptr + rows[:, None] * stride_dfm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            ooffs = rows[:, None] * stride_om + cols[None, :]
            tl.store(du_ptr + ooffs, cast_out(dfv * deriv, du_ptr, EMULATE_BF16_RNE_GRAD), mask=mask)
            if NEED_F:
                tl.store(fh_ptr + ooffs, cast_out(f, fh_ptr, EMULATE_BF16_RNE_F), mask=mask)


def _launch(kernel, m: int, n: int, args: tuple, consts: dict, config) -> None:
    """Fixed tiles (no autotuning: the gated kernels' table is tuned for their own kernels):
    ``config`` = ``(BLOCK_M, BLOCK_N[, num_warps[, ROW_ITERS]])``, else the interpreter's tile or
    :data:`~hyclora.kernels.common.FIXED_TILE`."""
    if config is not None:
        bm, bn, warps, ri = tuple(config) + (1,) * (4 - len(config))
    elif INTERPRET:
        bm, bn, warps, ri = interpret_tile(m, n)
    else:
        bm, bn, warps, ri = FIXED_TILE
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"{_WHAT} tile {bm}x{bn}: both must be powers of two >= 16 (tl.dot minimum).")
    grid = (triton.cdiv(m, bm * ri), triton.cdiv(n, bn))
    kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, ROW_ITERS=ri, **launch_opts(warps))


def act_lora_forward_triton(yw, xa, b, scale, lo, inv, bits, act="gelu", *, dot_dtype=None, config=None,
                            tensor_core_on_fp32=False):
    check_triton_device(_WHAT, yw, xa)
    m, n = yw.shape
    yw = yw.contiguous()
    (xa, b), r, dot_fp32 = dot_operands(_WHAT, dot_dtype, [(xa, b)], tensor_core_on_fp32=tensor_core_on_fp32)
    nb = packed_width(n, bits)
    codes = torch.empty((m, nb), dtype=torch.uint8, device=yw.device)
    f = torch.empty((m, n), dtype=yw.dtype, device=yw.device)
    args = (yw, xa if xa is not None else yw, b if b is not None else yw, lo.float().contiguous(),
            inv.float().contiguous(), codes, f, m, n, nb, r, yw.stride(0), r, r, f.stride(0), float(scale))
    consts = dict(BITS=bits, HAS_LORA=xa is not None, ACT=activation_code(act), DOT_FP32=dot_fp32,
                  EMULATE_BF16_RNE=INTERPRET and f.dtype == torch.bfloat16, BLOCK_R=block_r(r))
    _launch(_act_lora_fwd_kernel, m, n, args, consts, config)
    return codes, f


def act_lora_backward_triton(codes, lo, step, xa, b, scale, df, bits, act="gelu", *, dtype, need_f=True,
                             dot_dtype=None, config=None, tensor_core_on_fp32=False):
    check_triton_device(_WHAT, codes, df, xa)
    m, n = df.shape
    nb = packed_width(n, bits)
    df, codes = df.contiguous(), codes.contiguous()
    (xa, b), r, dot_fp32 = dot_operands(_WHAT, dot_dtype, [(xa, b)], tensor_core_on_fp32=tensor_core_on_fp32)
    out_dtype = torch.promote_types(df.dtype, dtype)
    du = torch.empty((m, n), dtype=out_dtype, device=df.device)
    f_hat = torch.empty((m, n), dtype=dtype, device=df.device) if need_f else None
    args = (codes, lo.float().contiguous(), step.float().contiguous(), xa if xa is not None else df,
            b if b is not None else df, df, du, f_hat if f_hat is not None else du,
            m, n, nb, r, df.stride(0), r, r, du.stride(0), float(scale))
    consts = dict(BITS=bits, HAS_LORA=xa is not None, ACT=activation_code(act), DOT_FP32=dot_fp32, NEED_F=need_f,
                  EMULATE_BF16_RNE_GRAD=INTERPRET and out_dtype == torch.bfloat16,
                  EMULATE_BF16_RNE_F=INTERPRET and dtype == torch.bfloat16, BLOCK_R=block_r(r))
    _launch(_act_lora_bwd_kernel, m, n, args, consts, config)
    return du, f_hat


# ---------------------------------------------------------------------------------------------
# public operator entry points
# ---------------------------------------------------------------------------------------------


def act_lora_forward(yw: Tensor, xa: Optional[Tensor], b: Optional[Tensor], scale: float,
                     lo: Tensor, inv: Tensor, bits: int, act: str = "gelu", *,
                     dot_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                     config=None) -> Tuple[Tensor, Tensor]:
    """Quantise a projection's base output and compute ``F = act(yw + s xa B^T)`` in one pass.

    ``yw``: ``(M, N)``; ``xa``: ``(M, r)`` or ``None``; ``b``: PEFT ``lora_B`` ``(N, r)``;
    ``lo`` / ``inv``: ``(N,)`` fp32 (``lo``, ``1/step``); ``act``: a name of
    :data:`~hyclora.kernels.activations.ACTIVATIONS`. Returns ``(codes, F)``: packed uint8 codes
    identical to :func:`hyclora.quant.quantize` with these parameters, ``F`` in ``yw.dtype``.
    """
    check_bits(bits)
    activation_code(act)
    _check_args(yw, xa, b, lo, inv, "yw")
    if resolve_backend(backend, yw.device) == "triton":
        return act_lora_forward_triton(yw, xa, b, scale, lo, inv, bits, act, dot_dtype=dot_dtype, config=config)
    return act_lora_forward_torch(yw, xa, b, scale, lo, inv, bits, act, dot_dtype=dot_dtype)


def act_lora_backward(codes: Tensor, lo: Tensor, step: Tensor, xa: Optional[Tensor], b: Optional[Tensor],
                      scale: float, df: Tensor, bits: int, act: str = "gelu", *, dtype: torch.dtype,
                      need_f: bool = True, dot_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                      config=None) -> Tuple[Tensor, Optional[Tensor]]:
    """Rebuild ``U~`` from its codes and LoRA term; return ``(dU, F~)`` (``F~`` ``None`` unless
    ``need_f``). ``dtype``: the forward activations' dtype (that of ``F~``; ``dU`` gets
    ``promote(df.dtype, dtype)``); ``step`` (not ``1/step``) dequantises."""
    check_bits(bits)
    activation_code(act)
    _check_args(df, xa, b, lo, step, "df")
    m, n = df.shape
    nb = packed_width(n, bits)
    if codes.dtype != torch.uint8 or codes.shape != (m, nb):
        raise ValueError(f"hyclora {_WHAT}: codes are {codes.dtype} {tuple(codes.shape)}; expected uint8 ({m}, {nb}).")
    if resolve_backend(backend, df.device) == "triton":
        return act_lora_backward_triton(codes, lo, step, xa, b, scale, df, bits, act, dtype=dtype, need_f=need_f,
                                        dot_dtype=dot_dtype, config=config)
    return act_lora_backward_torch(codes, lo, step, xa, b, scale, df, bits, act, dtype=dtype, need_f=need_f,
                                   dot_dtype=dot_dtype)


__all__ = [
    "act_lora_forward",
    "act_lora_backward",
    "act_lora_forward_torch",
    "act_lora_backward_torch",
    "act_lora_forward_triton",
    "act_lora_backward_triton",
]
