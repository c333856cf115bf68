"""Fused gated-MLP epilogue (``act(G) * U`` with LoRA on gate and up) of
``intra_inter_full_fuse``: one kernel forward, one kernel backward.

``intra_inter`` keeps, for gate and up, the quantised base output ``Q(X W)`` and the exact
``XA``, rebuilds ``G = deq + s (XA) B^T`` (same for ``U``) in the backward and recomputes
``act(G)`` and ``D = act(G) * U``: about ten passes over ``(tokens, d_ff)`` tensors op by op,
one pass each way here.

* forward (:func:`glu_lora_forward`): reads ``Y_W`` of gate and up, the ``(tokens, r)`` LoRA-A
  outputs and the LoRA-B weights; writes the codes of both ``Y_W`` (the codec of
  :mod:`hyclora.quant`, so :func:`hyclora.quant.dequantize` reads them) and ``D``. ``G`` and ``U``
  never reach memory.
* backward (:func:`glu_lora_backward`): reads both codes, the LoRA operands and ``dD``; writes
  ``dG``, ``dU`` and the rebuilt ``D~`` (down_proj's LoRA-A gradient needs it).

The activation (SiLU for Llama, GELU-tanh for Gemma) is a constexpr. Every load and store is
masked and the rank is zero-padded to a power of two >= 16, so any token count, width and rank
work (the HyC-LoRA reference needed multiples of 32 and a rank >= 16). Between the loads and the
stores everything is fp32; the dot operands are first rounded to the dtype torch would use for
``F.linear(xa, B)``, so the LoRA term carries the op-by-op path's operand rounding. The torch
references (``*_torch``) are the CPU path and the test oracle.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from hyclora.quant.core import quantize_pack_torch, unpack_codes
from hyclora.quant.format import check_bits, packed_width
from hyclora.quant.triton_kernels import pack_tile, quant_codes, unpack_tile

from .activations import act_and_deriv, act_deriv_fp32, act_fp32, activation_code
from .common import (AUTOTUNE, FIXED_TILE, INTERPRET, block_r, byte_columns, cast_out, channel_row,
                     check_triton_device, column_block, dot_operands, interpret_tile, launch_opts, launch_tuned,
                     lora_term_torch, lora_tile, program_bt, promoted_dtype, resolve_backend, row_block, tl, triton,
                     with_lora)

# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


def _check_2d(name: str, t: Tensor, rows: int, cols: Optional[int] = None):
    if t.dim() != 2 or t.shape[0] != rows or (cols is not None and t.shape[1] != cols):
        want = f"({rows}, {cols if cols is not None else 'r'})"
        raise ValueError(f"hyclora fused GLU: {name} has shape {tuple(t.shape)}, expected {want}.")


def _check_lora(which: str, xa: Optional[Tensor], b: Optional[Tensor], m: int, n: int):
    if (xa is None) != (b is None):
        raise ValueError(f"hyclora fused GLU: pass both xa_{which} and b_{which}, or neither (no LoRA).")
    if xa is None:
        return
    _check_2d(f"xa_{which}", xa, m)
    if b.dim() != 2 or b.shape != (n, xa.shape[1]):
        raise ValueError(
            f"hyclora fused GLU: b_{which} has shape {tuple(b.shape)}; expected PEFT's lora_B "
            f"layout (out_features, r) = ({n}, {xa.shape[1]})."
        )


def _bit_pair(bits) -> Tuple[int, int]:
    """``(bits_gate, bits_up)`` from one width or a pair, each checked (2, 4 or 8)."""
    if isinstance(bits, (tuple, list)):
        if len(bits) != 2:
            raise ValueError(f"hyclora fused GLU: bits={bits!r}; expected one width or a (gate, up) pair.")
        return check_bits(bits[0]), check_bits(bits[1])
    b = check_bits(bits)
    return b, b


# ---------------------------------------------------------------------------------------------
# torch reference (the oracle of the tests, and the CPU path)
# ---------------------------------------------------------------------------------------------


def glu_lora_forward_torch(yw_g, yw_u, xa_g, xa_u, b_g, b_u, scale_g, scale_u,
                           lo_g, inv_g, lo_u, inv_u, bits, *, act="silu", dot_dtype=None):
    """Reference of :func:`glu_lora_forward` (same arguments, same results)."""
    bits_g, bits_u = _bit_pair(bits)
    codes_g = quantize_pack_torch(yw_g, lo_g, inv_g, bits_g)
    codes_u = quantize_pack_torch(yw_u, lo_u, inv_u, bits_u)
    dot = promoted_dtype(dot_dtype, xa_g, b_g, xa_u, b_u)
    g = with_lora(yw_g.float(), lora_term_torch(xa_g, b_g, dot), scale_g)
    u = with_lora(yw_u.float(), lora_term_torch(xa_u, b_u, dot), scale_u)
    d = act_fp32(g, act) * u
    return codes_g, codes_u, d.to(yw_g.dtype)


def glu_lora_backward_torch(codes_g, codes_u, lo_g, step_g, lo_u, step_u, xa_g, xa_u, b_g, b_u,
                            scale_g, scale_u, dd, bits, *, dtype, act="silu", need_d=True, dot_dtype=None):
    """Reference of :func:`glu_lora_backward` (same arguments, same results)."""
    n = dd.shape[1]
    bits_g, bits_u = _bit_pair(bits)
    g = unpack_codes(codes_g, bits_g, n).float() * step_g + lo_g
    u = unpack_codes(codes_u, bits_u, n).float() * step_u + lo_u
    dot = promoted_dtype(dot_dtype, xa_g, b_g, xa_u, b_u)
    g = with_lora(g, lora_term_torch(xa_g, b_g, dot), scale_g)
    u = with_lora(u, lora_term_torch(xa_u, b_u, dot), scale_u)
    a, deriv = act_fp32(g, act), act_deriv_fp32(g, act)
    ddf = dd.float()
    out_dtype = torch.promote_types(dd.dtype, dtype)
    du = (ddf * a).to(out_dtype)
    dg = (ddf * u * deriv).to(out_dtype)
    d_hat = (a * u).to(dtype) if need_d else None
    return dg, du, d_hat


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _glu_fwd_kernel(
        yg_ptr, yu_ptr, xag_ptr, xau_ptr, bg_ptr, bu_ptr,
        log_ptr, invg_ptr, lou_ptr, invu_ptr,
        cg_ptr, cu_ptr, d_ptr,
        M, N, NB_G, NB_U, R, stride_ym, stride_xm, stride_bn, stride_dm,
        scale_g, scale_u,
        BITS_G: tl.constexpr, BITS_U: tl.constexpr, ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, DOT_FP32: tl.constexpr,
        USE_FMA: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_ITERS: tl.constexpr,
    ):
        # CUDA-core fp32 dot: forced for fp32 operands (and the interpreter), else a tuning choice
        FMA_PATH: tl.constexpr = DOT_FP32 or USE_FMA
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # gate and up may differ in bits (gate, an activation input, is kept at twice q_bit)
        cols, cmask = column_block(pid_n, N, BLOCK_N)
        bcols_g, bmask_g = byte_columns(pid_n, NB_G, BLOCK_N, BITS_G)
        bcols_u, bmask_u = byte_columns(pid_n, NB_U, BLOCK_N, BITS_U)
        # per-program constants, reused for all ROW_ITERS * BLOCK_M rows
        lo_g, inv_g = channel_row(log_ptr, cols, cmask), channel_row(invg_ptr, cols, cmask)
        lo_u, inv_u = channel_row(lou_ptr, cols, cmask), channel_row(invu_ptr, cols, cmask)
        bt_g = program_bt(bg_ptr, cols, cmask, R, stride_bn, HAS_G, FMA_PATH, BLOCK_R, BLOCK_N)
        bt_u = program_bt(bu_ptr, cols, cmask, R, stride_bn, HAS_U, FMA_PATH, BLOCK_R, BLOCK_N)
        for it in tl.static_range(ROW_ITERS):
            rows, rmask = row_block(pid_m, it, M, BLOCK_M, ROW_ITERS)
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * stride_ym + cols[None, :]
            yg = tl.load(yg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            yu = tl.load(yu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # codes of the base outputs (what the backward rebuilds G and U from)
            pg = pack_tile(quant_codes(yg, lo_g, inv_g, mask, BITS_G), BLOCK_M, BLOCK_N, BITS_G)
            pu = pack_tile(quant_codes(yu, lo_u, inv_u, mask, BITS_U), BLOCK_M, BLOCK_N, BITS_U)
            tl.store(cg_ptr + rows[:, None] * NB_G + bcols_g[None, :], pg, mask=rmask[:, None] & bmask_g[None, :])
            tl.store(cu_ptr + rows[:, None] * NB_U + bcols_u[None, :], pu, mask=rmask[:, None] & bmask_u[None, :])
            # G and U with their LoRA terms, then D = SiLU(G) * U
            g = yg
            if HAS_G:
                g = yg + lora_tile(xag_ptr, bg_ptr, bt_g, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                               BLOCK_M, BLOCK_N, BLOCK_R, FMA_PATH) * scale_g
            u = yu
            if HAS_U:
                u = yu + lora_tile(xau_ptr, bu_ptr, bt_u, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                               BLOCK_M, BLOCK_N, BLOCK_R, FMA_PATH) * scale_u
            a, _ = act_and_deriv(g, ACT)
            d = a * u
            tl.store(d_ptr + rows[:, None] * stride_dm + cols[None, :],
                     cast_out(d, d_ptr, EMULATE_BF16_RNE), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        cg_ptr, cu_ptr, log_ptr, stepg_ptr, lou_ptr, stepu_ptr,
        xag_ptr, xau_ptr, bg_ptr, bu_ptr, dd_ptr,
        dg_ptr, du_ptr, dh_ptr,
        M, N, NB_G, NB_U, R, stride_ddm, stride_xm, stride_bn, stride_om,
        scale_g, scale_u,
        BITS_G: tl.constexpr, BITS_U: tl.constexpr, ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, DOT_FP32: tl.constexpr,
        USE_FMA: tl.constexpr, NEED_D: tl.constexpr, EMULATE_BF16_RNE_GRAD: tl.constexpr, EMULATE_BF16_RNE_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_ITERS: tl.constexpr,
    ):
        FMA_PATH: tl.constexpr = DOT_FP32 or USE_FMA
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols, cmask = column_block(pid_n, N, BLOCK_N)
        bcols_g, bmask_g = byte_columns(pid_n, NB_G, BLOCK_N, BITS_G)
        bcols_u, bmask_u = byte_columns(pid_n, NB_U, BLOCK_N, BITS_U)
        lo_g, st_g = channel_row(log_ptr, cols, cmask), channel_row(stepg_ptr, cols, cmask)
        lo_u, st_u = channel_row(lou_ptr, cols, cmask), channel_row(stepu_ptr, cols, cmask)
        bt_g = program_bt(bg_ptr, cols, cmask, R, stride_bn, HAS_G, FMA_PATH, BLOCK_R, BLOCK_N)
        bt_u = program_bt(bu_ptr, cols, cmask, R, stride_bn, HAS_U, FMA_PATH, BLOCK_R, BLOCK_N)
        for it in tl.static_range(ROW_ITERS):
            rows, rmask = row_block(pid_m, it, M, BLOCK_M, ROW_ITERS)
            mask = rmask[:, None] & cmask[None, :]
            pg = tl.load(cg_ptr + rows[:, None] * NB_G + bcols_g[None, :], mask=rmask[:, None] & bmask_g[None, :],
                         other=0)
            pu = tl.load(cu_ptr + rows[:, None] * NB_U + bcols_u[None, :], mask=rmask[:, None] & bmask_u[None, :],
                         other=0)
            g = unpack_tile(pg, BLOCK_M, BLOCK_N, BITS_G) * st_g + lo_g
            u = unpack_tile(pu, BLOCK_M, BLOCK_N, BITS_U) * st_u + lo_u
            if HAS_G:
                g = g + lora_tile(xag_ptr, bg_ptr, bt_g, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                               BLOCK_M, BLOCK_N, BLOCK_R, FMA_PATH) * scale_g
            if HAS_U:
                u = u + lora_tile(xau_ptr, bu_ptr, bt_u, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                               BLOCK_M, BLOCK_N, BLOCK_R, FMA_PATH) * scale_u
            a, deriv = act_and_deriv(g, ACT)
            ddv = tl.load(dd_ptr + rows[:, None] * stride_ddm + cols[None, :], mask=mask, other=0.0)
            ddv = ddv.to(tl.float32)
            du = ddv * a
            dg = ddv * u * deriv
            ooffs = rows[:, None] * stride_om + cols[None, :]
            tl.store(dg_ptr + ooffs, cast_out(dg, dg_ptr, EMULATE_BF16_RNE_GRAD), mask=mask)
            tl.store(du_ptr + ooffs, cast_out(du, du_ptr, EMULATE_BF16_RNE_GRAD), mask=mask)
            if NEED_D:
                tl.store(dh_ptr + ooffs, cast_out(a * u, dh_ptr, EMULATE_BF16_RNE_D), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, num_warps, ROW_ITERS, USE_FMA): every dot dimension >= 16 whatever the bit
# width (packing comes after the dot); ROW_ITERS > 1 reuses the B^T tiles and per-channel
# parameters over more rows. Tiles that spill registers on sm_90 are left out; USE_FMA entries do
# the rank-r product on CUDA cores (no MMA-layout round trips, more registers), and the autotuner
# measures which wins (BENCHMARKS.md has the sweeps).
FWD_CONFIGS = [(32, 64, 8, 2, False), (32, 64, 8, 4, False), (16, 128, 8, 4, False), (16, 64, 4, 4, False),
               (64, 64, 8, 1, False), (64, 64, 8, 2, False), (32, 128, 8, 2, False), (32, 32, 4, 4, False),
               (32, 64, 8, 2, True), (64, 64, 8, 1, True)]
BWD_CONFIGS = FWD_CONFIGS


@functools.lru_cache(maxsize=None)
def _tuned(which: str):
    table = FWD_CONFIGS if which == "fwd" else BWD_CONFIGS
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "ROW_ITERS": ri, "USE_FMA": fma}, num_warps=w)
               for bm, bn, w, ri, fma in table]
    kernel = _glu_fwd_kernel if which == "fwd" else _glu_bwd_kernel
    key = ["N", "R", "BITS_G", "BITS_U", "ACT", "HAS_G", "HAS_U", "DOT_FP32"]
    # the backward writes dG/dU/D~ in full, the forward codes and D: no output is read back,
    # so autotune's repeated runs are harmless
    return triton.autotune(configs=configs, key=key)(kernel)


def _launch(which: str, m: int, n: int, args: tuple, consts: dict, config) -> None:
    kernel = _glu_fwd_kernel if which == "fwd" else _glu_bwd_kernel
    if config is None and not INTERPRET and AUTOTUNE:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_ITERS"]), triton.cdiv(n, meta["BLOCK_N"]))
        launch_tuned(_tuned(which), grid, args, dict(consts, enable_fp_fusion=False), tokens=m)
        return
    if config is not None:
        bm, bn, warps, ri, fma = (tuple(config) + (1, False)[len(config) - 3:])[:5]
    elif INTERPRET:
        bm, bn, warps, ri, fma = interpret_tile(m, n) + (False,)
    else:
        bm, bn, warps, ri, fma = FIXED_TILE + (False,)
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"fused GLU tile {bm}x{bn}: both must be powers of two >= 16 (tl.dot minimum).")
    grid = (triton.cdiv(m, bm * ri), triton.cdiv(n, bn))
    kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, ROW_ITERS=ri, USE_FMA=bool(fma), **launch_opts(warps))


def glu_lora_forward_triton(yw_g, yw_u, xa_g, xa_u, b_g, b_u, scale_g, scale_u,
                            lo_g, inv_g, lo_u, inv_u, bits, *, act="silu", dot_dtype=None, config=None,
                            tensor_core_on_fp32=False):
    check_triton_device("fused GLU", yw_g, yw_u, xa_g, xa_u)
    m, n = yw_g.shape
    yw_g, yw_u = yw_g.contiguous(), yw_u.contiguous()
    (xa_g, b_g, xa_u, b_u), r, dot_fp32 = dot_operands("fused GLU", dot_dtype, [(xa_g, b_g), (xa_u, b_u)],
                                                      tensor_core_on_fp32=tensor_core_on_fp32)
    bits_g, bits_u = _bit_pair(bits)
    nb_g, nb_u = packed_width(n, bits_g), packed_width(n, bits_u)
    codes_g = torch.empty((m, nb_g), dtype=torch.uint8, device=yw_g.device)
    codes_u = torch.empty((m, nb_u), dtype=torch.uint8, device=yw_g.device)
    d = torch.empty((m, n), dtype=yw_g.dtype, device=yw_g.device)
    lo_g, inv_g, lo_u, inv_u = (t.float().contiguous() for t in (lo_g, inv_g, lo_u, inv_u))
    dummy = yw_g  # never read when HAS_* is False
    args = (yw_g, yw_u, xa_g if xa_g is not None else dummy, xa_u if xa_u is not None else dummy,
            b_g if b_g is not None else dummy, b_u if b_u is not None else dummy,
            lo_g, inv_g, lo_u, inv_u, codes_g, codes_u, d,
            m, n, nb_g, nb_u, r, yw_g.stride(0), r, r, d.stride(0), float(scale_g), float(scale_u))
    consts = dict(BITS_G=bits_g, BITS_U=bits_u, ACT=activation_code(act), HAS_G=xa_g is not None, HAS_U=xa_u is not None, DOT_FP32=dot_fp32,
                  EMULATE_BF16_RNE=INTERPRET and d.dtype == torch.bfloat16, BLOCK_R=block_r(r))
    _launch("fwd", m, n, args, consts, config)
    return codes_g, codes_u, d


def glu_lora_backward_triton(codes_g, codes_u, lo_g, step_g, lo_u, step_u, xa_g, xa_u, b_g, b_u,
                             scale_g, scale_u, dd, bits, *, dtype, act="silu", need_d=True, dot_dtype=None,
                             config=None, tensor_core_on_fp32=False):
    check_triton_device("fused GLU", codes_g, codes_u, dd, xa_g, xa_u)
    m, n = dd.shape
    bits_g, bits_u = _bit_pair(bits)
    nb_g, nb_u = packed_width(n, bits_g), packed_width(n, bits_u)
    dd = dd.contiguous()
    codes_g, codes_u = codes_g.contiguous(), codes_u.contiguous()
    (xa_g, b_g, xa_u, b_u), r, dot_fp32 = dot_operands("fused GLU", dot_dtype, [(xa_g, b_g), (xa_u, b_u)],
                                                      tensor_core_on_fp32=tensor_core_on_fp32)
    out_dtype = torch.promote_types(dd.dtype, dtype)
    dg = torch.empty((m, n), dtype=out_dtype, device=dd.device)
    du = torch.empty_like(dg)
    d_hat = torch.empty((m, n), dtype=dtype, device=dd.device) if need_d else None
    lo_g, step_g, lo_u, step_u = (t.float().contiguous() for t in (lo_g, step_g, lo_u, step_u))
    dummy = dd
    args = (codes_g, codes_u, lo_g, step_g, lo_u, step_u,
            xa_g if xa_g is not None else dummy, xa_u if xa_u is not None else dummy,
            b_g if b_g is not None else dummy, b_u if b_u is not None else dummy, dd,
            dg, du, d_hat if d_hat is not None else dg,
            m, n, nb_g, nb_u, r, dd.stride(0), r, r, dg.stride(0), float(scale_g), float(scale_u))
    consts = dict(BITS_G=bits_g, BITS_U=bits_u, ACT=activation_code(act), HAS_G=xa_g is not None, HAS_U=xa_u is not None, DOT_FP32=dot_fp32,
                  NEED_D=need_d, EMULATE_BF16_RNE_GRAD=INTERPRET and out_dtype == torch.bfloat16,
                  EMULATE_BF16_RNE_D=INTERPRET and dtype == torch.bfloat16, BLOCK_R=block_r(r))
    _launch("bwd", m, n, args, consts, config)
    return dg, du, d_hat


# ---------------------------------------------------------------------------------------------
# public operator entry points
# ---------------------------------------------------------------------------------------------


def _check_params(name: str, t: Tensor, n: int):
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(
            f"hyclora fused GLU: {name} has shape {tuple(t.shape)}; expected per-channel ({n},) "
            "fp32 parameters (hyclora.quant.core.affine_params / ChannelStats.frozen_params)."
        )


def glu_lora_forward(yw_g: Tensor, yw_u: Tensor, xa_g: Optional[Tensor], xa_u: Optional[Tensor],
                        b_g: Optional[Tensor], b_u: Optional[Tensor], scale_g: float, scale_u: float,
                        lo_g: Tensor, inv_g: Tensor, lo_u: Tensor, inv_u: Tensor, bits: int, *,
                     act: str = "silu", dot_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                     config=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantise the gate/up base outputs and compute ``D = act(G) * U`` in one pass.

    Args:
        yw_g, yw_u: ``(M, N)`` base outputs ``X W^T (+ bias)`` of gate_proj / up_proj.
        xa_g, xa_u: ``(M, r)`` LoRA-A outputs ``drop(X) A^T``, or ``None`` without LoRA.
        b_g, b_u: PEFT ``lora_B`` weights ``(N, r)``, or ``None``.
        scale_g, scale_u: LoRA scalings.
        lo_*, inv_*: ``(N,)`` fp32 per-channel quantisation parameters (``lo``, ``1/step``).
        bits: 2, 4 or 8, or a ``(bits_gate, bits_up)`` pair.
        act: the gate's activation, a transformers name (``silu``, ``gelu``, ``gelu_pytorch_tanh``...).
        dot_dtype: operand dtype of the LoRA dot (default: promoted dtype of ``xa`` and ``b``).
        backend: ``auto`` (Triton on CUDA, torch on CPU), ``triton`` or ``torch``.
        config: ``(BLOCK_M, BLOCK_N, num_warps[, ROW_ITERS[, USE_FMA]])`` overriding the autotuner.

    Returns ``(codes_g, codes_u, D)``: packed uint8 codes ``(M, ceil(N*bits/8))`` (each at its
    own width) identical to
    :func:`hyclora.quant.quantize` with these parameters, and ``D`` in ``yw_g.dtype``.
    """
    _bit_pair(bits)
    if yw_g.dim() != 2 or yw_g.shape != yw_u.shape or yw_g.dtype != yw_u.dtype:
        raise ValueError(
            f"hyclora fused GLU: yw_g {tuple(yw_g.shape)} {yw_g.dtype} and yw_u {tuple(yw_u.shape)} "
            f"{yw_u.dtype} must be 2-D (tokens, d_ff) of one shape and dtype; reshape(-1, d_ff) first."
        )
    m, n = yw_g.shape
    _check_lora("g", xa_g, b_g, m, n)
    _check_lora("u", xa_u, b_u, m, n)
    for name, t in (("lo_g", lo_g), ("inv_g", inv_g), ("lo_u", lo_u), ("inv_u", inv_u)):
        _check_params(name, t, n)
    if resolve_backend(backend, yw_g.device) == "triton":
        return glu_lora_forward_triton(yw_g, yw_u, xa_g, xa_u, b_g, b_u, scale_g, scale_u,
                                          lo_g, inv_g, lo_u, inv_u, bits, act=act, dot_dtype=dot_dtype,
                                       config=config)
    return glu_lora_forward_torch(yw_g, yw_u, xa_g, xa_u, b_g, b_u, scale_g, scale_u,
                                     lo_g, inv_g, lo_u, inv_u, bits, act=act, dot_dtype=dot_dtype)


def glu_lora_backward(codes_g: Tensor, codes_u: Tensor, lo_g: Tensor, step_g: Tensor, lo_u: Tensor,
                         step_u: Tensor, xa_g: Optional[Tensor], xa_u: Optional[Tensor],
                         b_g: Optional[Tensor], b_u: Optional[Tensor], scale_g: float, scale_u: float,
                      dd: Tensor, bits: int, *, dtype: torch.dtype, act: str = "silu", need_d: bool = True,
                      dot_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                      config=None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Rebuild ``G``, ``U`` from their codes and LoRA terms; return ``(dG, dU, D~)``.

    ``dd``: ``(M, N)`` gradient of ``D``; ``dtype``: dtype of the forward activations (that of
    ``D~``; ``dG``/``dU`` get ``promote(dd.dtype, dtype)``). ``need_d=False`` skips ``D~``
    (down_proj without LoRA). Other arguments as in :func:`glu_lora_forward`, with ``step_*``
    (not ``1/step``) for dequantisation.
    """
    pair = _bit_pair(bits)
    if dd.dim() != 2:
        raise ValueError(f"hyclora fused GLU: dd has shape {tuple(dd.shape)}; expected 2-D (tokens, d_ff).")
    m, n = dd.shape
    for name, c, b in (("codes_g", codes_g, pair[0]), ("codes_u", codes_u, pair[1])):
        nb = packed_width(n, b)
        if c.dtype != torch.uint8 or c.shape != (m, nb):
            raise ValueError(f"hyclora fused GLU: {name} is {c.dtype} {tuple(c.shape)}; expected "
                             f"uint8 ({m}, {nb}) for {n} columns at {b} bits.")
    _check_lora("g", xa_g, b_g, m, n)
    _check_lora("u", xa_u, b_u, m, n)
    for name, t in (("lo_g", lo_g), ("step_g", step_g), ("lo_u", lo_u), ("step_u", step_u)):
        _check_params(name, t, n)
    if resolve_backend(backend, dd.device) == "triton":
        return glu_lora_backward_triton(codes_g, codes_u, lo_g, step_g, lo_u, step_u, xa_g, xa_u,
                                           b_g, b_u, scale_g, scale_u, dd, bits, dtype=dtype,
                                        act=act, need_d=need_d, dot_dtype=dot_dtype, config=config)
    return glu_lora_backward_torch(codes_g, codes_u, lo_g, step_g, lo_u, step_u, xa_g, xa_u, b_g, b_u,
                                      scale_g, scale_u, dd, bits, dtype=dtype, act=act, need_d=need_d,
                                   dot_dtype=dot_dtype)




__all__ = [
    "glu_lora_forward",
    "glu_lora_backward",
    "glu_lora_forward_torch",
    "glu_lora_backward_torch",
    "glu_lora_forward_triton",
    "glu_lora_backward_triton",
    "FWD_CONFIGS",
    "BWD_CONFIGS",
]
