"""Fused SwiGLU epilogue of ``intra_inter_full_fuse``: one kernel forward, one kernel backward.

``intra_inter`` keeps, for gate and up, the quantised base output ``Q(X W)`` and the exact
``XA``; it rebuilds ``G = deq + s (XA) B^T`` (same for ``U``) in the backward and recomputes
``SiLU(G)`` and ``D = SiLU(G) * U`` from them. Done op by op that is ~10 passes over
``(b*s, d_ff)`` tensors per direction. Here it is one pass each way:

* forward (:func:`swiglu_lora_forward`): reads ``Y_W`` of gate and up (the base GEMM outputs,
  computed by torch), the ``(b*s, r)`` LoRA-A outputs and the LoRA-B weights; writes the packed
  codes of both ``Y_W`` (identical to :func:`hyclora.quant.quantize` with the same ``lo`` /
  ``1/step``, so :func:`hyclora.quant.dequantize` reads them) and ``D`` (the down_proj input).
  ``G`` and ``U`` never reach memory.
* backward (:func:`swiglu_lora_backward`): reads both codes, the LoRA operands and ``dD``;
  writes ``dG``, ``dU`` and the rebuilt ``D~`` (the down_proj LoRA-A gradient needs it).

The LoRA term is an in-kernel ``tl.dot`` of an ``(BLOCK_M, r)`` tile of ``XA`` by a
``(r, BLOCK_N)`` tile of ``B^T`` with fp32 accumulation. Every load and store is masked, so any
``b*s``, ``d_ff`` and rank work (the HyC-LoRA reference needed ``s`` and ``d_ff`` multiples of
32 and a power-of-two rank >= 16, and its 2-bit variant asked ``tl.dot`` for an N of 8, below
Triton's minimum: method notes §5, §8.9). Here the rank is zero-padded to the next power of
two >= 16 by masked loads, and the tile width is always >= 16 columns whatever the bit width
(packing happens after the dot, on the full tile).

Numerics: everything between the loads and the stores is fp32 (the op-by-op path rounds ``G``,
``U``, ``SiLU(G)`` and ``D`` to the activation dtype after every op; with fp32 activations the
two agree to rounding, which the model tests assert). The dot operands are first rounded to the
dtype torch would use for ``F.linear(xa, B)`` (the autocast dtype under autocast, else the
promoted dtype of ``XA`` and ``B``), so the LoRA term carries the same operand rounding as the
op-by-op path; fp32 operands use an IEEE fp32 dot (no TF32), as torch does by default.

The torch reference (:func:`swiglu_lora_forward_torch`, :func:`swiglu_lora_backward_torch`) has
the same semantics; it is the CPU path and the test oracle. Under ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors (tests); the interpreter's bf16 ``tl.dot`` and its truncating
fp32 -> bf16 cast are wrong, so there the dot runs on fp32 copies of the operands (exact: they
were rounded already) and bf16 stores round to nearest even by hand.

The block-level glue at the end (:func:`fused_gate_up_forward`, :func:`fused_mlp_epilogue_backward`)
is what :class:`hyclora.ops.blocks.MLPBlockFn` calls for ``intra_inter_full_fuse``.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hyclora.quant.core import (
    QuantizedTensor,
    affine_params,
    check_bits,
    column_minmax,
    packed_width,
    quantize_pack_torch,
    resolve_backend,
    unpack_codes,
)
from hyclora.quant.tuned import launch_tuned

from .lora import (LinearMeta, LinearOut, dense_weight,
                   lora_down_projection, lora_linear_backward_input_first)

try:  # Triton is optional: without it only the torch reference (CPU / backend='torch') exists
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Linux images ship triton
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AUTOTUNE = os.environ.get("HYCLORA_QUANT_AUTOTUNE", "1") != "0"
# tests only: under the interpreter, run the tensor-core (non-fp32) dot branch on fp32 operands,
# which the interpreter computes correctly, so the GPU branch's loads and masks are exercised
_TEST_TENSOR_CORE_PATH = False

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def dot_dtype_for(xa: Tensor, lora_b: Tensor) -> torch.dtype:
    """The dtype torch's ``F.linear(xa, lora_b)`` computes in here: the autocast dtype when
    autocast is on for this device type, else the promoted dtype of the two operands."""
    dev = xa.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError):  # pragma: no cover - device type without autocast
        pass
    return torch.promote_types(xa.dtype, lora_b.dtype)


def _check_2d(name: str, t: Tensor, rows: int, cols: Optional[int] = None):
    if t.dim() != 2 or t.shape[0] != rows or (cols is not None and t.shape[1] != cols):
        want = f"({rows}, {cols if cols is not None else 'r'})"
        raise ValueError(f"hyclora fused SwiGLU: {name} has shape {tuple(t.shape)}, expected {want}.")


def _check_lora(which: str, xa: Optional[Tensor], b: Optional[Tensor], m: int, n: int):
    if (xa is None) != (b is None):
        raise ValueError(f"hyclora fused SwiGLU: pass both xa_{which} and b_{which}, or neither (no LoRA).")
    if xa is None:
        return
    _check_2d(f"xa_{which}", xa, m)
    if b.dim() != 2 or b.shape != (n, xa.shape[1]):
        raise ValueError(
            f"hyclora fused SwiGLU: b_{which} has shape {tuple(b.shape)}; expected PEFT's lora_B "
            f"layout (out_features, r) = ({n}, {xa.shape[1]})."
        )


def _lora_term_torch(xa: Optional[Tensor], b: Optional[Tensor], dot_dtype: torch.dtype) -> Optional[Tensor]:
    """fp32 ``xa @ b^T`` of operands rounded to ``dot_dtype`` (what the kernel's dot computes)."""
    if xa is None:
        return None
    return xa.to(dot_dtype).float() @ b.to(dot_dtype).float().t()


def _rebuild(base: Tensor, lora: Optional[Tensor], scale: float) -> Tensor:
    return base if lora is None else base + lora * scale


def _default_dot(dot_dtype, xa_g, b_g, xa_u, b_u) -> Optional[torch.dtype]:
    """One dot dtype for both LoRA terms: given, else the promoted dtype of the operands."""
    if dot_dtype is not None:
        return dot_dtype
    present = [t.dtype for t in (xa_g, b_g, xa_u, b_u) if t is not None]
    if not present:
        return None
    out = present[0]
    for dt in present[1:]:
        out = torch.promote_types(out, dt)
    return out


def _bit_pair(bits) -> Tuple[int, int]:
    """``(bits_gate, bits_up)`` from one width or a pair, each checked (2, 4 or 8)."""
    if isinstance(bits, (tuple, list)):
        if len(bits) != 2:
            raise ValueError(f"hyclora fused SwiGLU: bits={bits!r}; expected one width or a (gate, up) pair.")
        return check_bits(bits[0]), check_bits(bits[1])
    b = check_bits(bits)
    return b, b


# ---------------------------------------------------------------------------------------------
# torch reference (the oracle of the tests, and the CPU path)
# ---------------------------------------------------------------------------------------------


def swiglu_lora_forward_torch(yw_g, yw_u, xa_g, xa_u, b_g, b_u, scale_g, scale_u,
                              lo_g, inv_g, lo_u, inv_u, bits, *, dot_dtype=None):
    """Reference of :func:`swiglu_lora_forward` (same arguments, same results)."""
    bits_g, bits_u = _bit_pair(bits)
    codes_g = quantize_pack_torch(yw_g, lo_g, inv_g, bits_g)
    codes_u = quantize_pack_torch(yw_u, lo_u, inv_u, bits_u)
    dot = _default_dot(dot_dtype, xa_g, b_g, xa_u, b_u)
    g = _rebuild(yw_g.float(), _lora_term_torch(xa_g, b_g, dot), scale_g)
    u = _rebuild(yw_u.float(), _lora_term_torch(xa_u, b_u, dot), scale_u)
    d = (g * torch.sigmoid(g)) * u
    return codes_g, codes_u, d.to(yw_g.dtype)


def swiglu_lora_backward_torch(codes_g, codes_u, lo_g, step_g, lo_u, step_u, xa_g, xa_u, b_g, b_u,
                               scale_g, scale_u, dd, bits, *, dtype, need_d=True, dot_dtype=None):
    """Reference of :func:`swiglu_lora_backward` (same arguments, same results)."""
    n = dd.shape[1]
    bits_g, bits_u = _bit_pair(bits)
    g = unpack_codes(codes_g, bits_g, n).float() * step_g + lo_g
    u = unpack_codes(codes_u, bits_u, n).float() * step_u + lo_u
    dot = _default_dot(dot_dtype, xa_g, b_g, xa_u, b_u)
    g = _rebuild(g, _lora_term_torch(xa_g, b_g, dot), scale_g)
    u = _rebuild(u, _lora_term_torch(xa_u, b_u, dot), scale_u)
    sig = torch.sigmoid(g)
    silu = g * sig
    ddf = dd.float()
    out_dtype = torch.promote_types(dd.dtype, dtype)
    du = (ddf * silu).to(out_dtype)
    dg = (ddf * u * (sig * (1.0 + g * (1.0 - sig)))).to(out_dtype)
    d_hat = (silu * u).to(dtype) if need_d else None
    return dg, du, d_hat


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _lora_tile(xa_ptr, b_ptr, bt, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT_FP32: tl.constexpr):
        """fp32 (BLOCK_M, BLOCK_N) tile of xa[rows, :R] @ B[cols, :R]^T (rank zero-padded)."""
        if DOT_FP32:
            # fp32 operands (exact upcasts of already rounded values), IEEE products: what torch
            # computes for an fp32 matmul, and the only correct dot in the interpreter. The
            # CUDA-core dot keeps its whole K extent in registers (ptxas: 255 registers and a
            # 5 KB stack at K = 128), so it runs over K chunks of 16, loading B^T per chunk.
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, BLOCK_R, 16):  # a real loop: unrolled, ptxas hoists every load
                ks = k0 + tl.arange(0, 16)
                a = tl.load(xa_ptr + rows[:, None] * stride_xm + ks[None, :],
                            mask=rmask[:, None] & (ks < R)[None, :], other=0.0)
                b = tl.load(b_ptr + ks[:, None] + cols[None, :] * stride_bn,
                            mask=(ks < R)[:, None] & cmask[None, :], other=0.0)
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            return acc
        else:
            # tensor cores on bf16/fp16 operands, fp32 accumulation; B^T (bt) was loaded once per
            # program and is reused for all its row sub-tiles
            ks = tl.arange(0, BLOCK_R)
            a = tl.load(xa_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=rmask[:, None] & (ks < R)[None, :], other=0.0)
            return tl.dot(a, bt, out_dtype=tl.float32)

    @triton.jit
    def _load_bt(b_ptr, cols, cmask, R, stride_bn, BLOCK_R: tl.constexpr):
        # B is PEFT's (out_features, r) lora_B weight; B^T tile (BLOCK_R, BLOCK_N), rank padded
        ks = tl.arange(0, BLOCK_R)
        return tl.load(b_ptr + ks[:, None] + cols[None, :] * stride_bn,
                       mask=(ks < R)[:, None] & cmask[None, :], other=0.0)

    @triton.jit
    def _quant_codes(y, lo, inv, mask, BITS: tl.constexpr):
        # exactly quantize_codes_torch: floor((y - lo) * inv + 0.5) clamped (FMA off at launch)
        QMAX: tl.constexpr = (1 << BITS) - 1
        c = tl.floor((y - lo) * inv + 0.5)
        c = tl.minimum(tl.maximum(c, 0.0), QMAX)
        return tl.where(mask, c, 0.0).to(tl.int32)  # padding columns of the last byte: code 0

    @triton.jit
    def _pack(c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr):
        # adjacent columns share a byte, least significant first (hyclora.quant.core layout)
        E: tl.constexpr = 8 // BITS
        BLOCK_B: tl.constexpr = BLOCK_N // E
        if E == 1:
            packed = c
        elif E == 2:
            a, b = tl.split(tl.reshape(c, (BLOCK_M, BLOCK_B, 2)))
            packed = a | (b << 4)
        else:
            even, odd = tl.split(tl.reshape(c, (BLOCK_M, BLOCK_B, 2, 2)))
            e0, e2 = tl.split(even)
            e1, e3 = tl.split(odd)
            packed = e0 | (e1 << 2) | (e2 << 4) | (e3 << 6)
        return packed.to(tl.uint8)

    @triton.jit
    def _unpack(p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr):
        E: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        p = p.to(tl.int32)
        if E == 1:
            c = p
        elif E == 2:
            c = tl.reshape(tl.join(p & QMAX, p >> 4), (BLOCK_M, BLOCK_N))
        else:
            e0 = p & QMAX
            e1 = (p >> 2) & QMAX
            e2 = (p >> 4) & QMAX
            e3 = (p >> 6) & QMAX
            c = tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), (BLOCK_M, BLOCK_N))
        return c.to(tl.float32)

    @triton.jit
    def _cast_out(y, out_ptr, EMULATE_BF16_RNE: tl.constexpr):
        if EMULATE_BF16_RNE:
            # the interpreter truncates fp32 -> bf16; round to nearest even like torch / cvt.rn
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return y.to(out_ptr.dtype.element_ty)

    @triton.jit
    def _swiglu_fwd_kernel(
        yg_ptr, yu_ptr, xag_ptr, xau_ptr, bg_ptr, bu_ptr,
        log_ptr, invg_ptr, lou_ptr, invu_ptr,
        cg_ptr, cu_ptr, d_ptr,
        M, N, NB_G, NB_U, R, stride_ym, stride_xm, stride_bn, stride_dm,
        scale_g, scale_u,
        BITS_G: tl.constexpr, BITS_U: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, DOT_FP32: tl.constexpr,
        USE_FMA: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_ITERS: tl.constexpr,
    ):
        # gate and up may differ in bits (gate, a SiLU input, is kept at twice q_bit)
        BLOCK_BG: tl.constexpr = BLOCK_N // (8 // BITS_G)
        BLOCK_BU: tl.constexpr = BLOCK_N // (8 // BITS_U)
        # CUDA-core fp32 dot: forced for fp32 operands (and the interpreter), else a tuning choice
        FMA_PATH: tl.constexpr = DOT_FP32 or USE_FMA
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        bcols_g = pid_n * BLOCK_BG + tl.arange(0, BLOCK_BG)
        bcols_u = pid_n * BLOCK_BU + tl.arange(0, BLOCK_BU)
        bmask_g = bcols_g < NB_G
        bmask_u = bcols_u < NB_U
        # per-program constants, reused for all ROW_ITERS * BLOCK_M rows: quantisation
        # parameters of this column block and the B^T tiles
        lo_g = tl.load(log_ptr + cols, mask=cmask, other=0.0)[None, :]
        inv_g = tl.load(invg_ptr + cols, mask=cmask, other=0.0)[None, :]
        lo_u = tl.load(lou_ptr + cols, mask=cmask, other=0.0)[None, :]
        inv_u = tl.load(invu_ptr + cols, mask=cmask, other=0.0)[None, :]
        if HAS_G:
            if FMA_PATH:
                bt_g = 0.0  # loaded per K chunk inside _lora_tile
            else:
                bt_g = _load_bt(bg_ptr, cols, cmask, R, stride_bn, BLOCK_R)
        if HAS_U:
            if FMA_PATH:
                bt_u = 0.0  # loaded per K chunk inside _lora_tile
            else:
                bt_u = _load_bt(bu_ptr, cols, cmask, R, stride_bn, BLOCK_R)
        for it in tl.static_range(ROW_ITERS):
            rows = ((pid_m * ROW_ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * stride_ym + cols[None, :]
            yg = tl.load(yg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            yu = tl.load(yu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # codes of the base outputs (what the backward rebuilds G and U from)
            pg = _pack(_quant_codes(yg, lo_g, inv_g, mask, BITS_G), BLOCK_M, BLOCK_N, BITS_G)
            pu = _pack(_quant_codes(yu, lo_u, inv_u, mask, BITS_U), BLOCK_M, BLOCK_N, BITS_U)
            tl.store(cg_ptr + rows[:, None] * NB_G + bcols_g[None, :], pg, mask=rmask[:, None] & bmask_g[None, :])
            tl.store(cu_ptr + rows[:, None] * NB_U + bcols_u[None, :], pu, mask=rmask[:, None] & bmask_u[None, :])
            # G and U with their LoRA terms, then D = SiLU(G) * U
            g = yg
            if HAS_G:
                g = yg + _lora_tile(xag_ptr, bg_ptr, bt_g, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                               BLOCK_M, BLOCK_N, BLOCK_R, FMA_PATH) * scale_g
            u = yu
            if HAS_U:
                u = yu + _lora_tile(xau_ptr, bu_ptr, bt_u, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                               BLOCK_M, BLOCK_N, BLOCK_R, FMA_PATH) * scale_u
            d = (g * tl.sigmoid(g)) * u
            tl.store(d_ptr + rows[:, None] * stride_dm + cols[None, :],
                     _cast_out(d, d_ptr, EMULATE_BF16_RNE), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        cg_ptr, cu_ptr, log_ptr, stepg_ptr, lou_ptr, stepu_ptr,
        xag_ptr, xau_ptr, bg_ptr, bu_ptr, dd_ptr,
        dg_ptr, du_ptr, dh_ptr,
        M, N, NB_G, NB_U, R, stride_ddm, stride_xm, stride_bn, stride_om,
        scale_g, scale_u,
        BITS_G: tl.constexpr, BITS_U: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, DOT_FP32: tl.constexpr,
        USE_FMA: tl.constexpr, NEED_D: tl.constexpr, EMULATE_BF16_RNE_GRAD: tl.constexpr, EMULATE_BF16_RNE_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_ITERS: tl.constexpr,
    ):
        # gate and up may differ in bits (gate, a SiLU input, is kept at twice q_bit)
        BLOCK_BG: tl.constexpr = BLOCK_N // (8 // BITS_G)
        BLOCK_BU: tl.constexpr = BLOCK_N // (8 // BITS_U)
        # CUDA-core fp32 dot: forced for fp32 operands (and the interpreter), else a tuning choice
        FMA_PATH: tl.constexpr = DOT_FP32 or USE_FMA
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        bcols_g = pid_n * BLOCK_BG + tl.arange(0, BLOCK_BG)
        bcols_u = pid_n * BLOCK_BU + tl.arange(0, BLOCK_BU)
        bmask_g = bcols_g < NB_G
        bmask_u = bcols_u < NB_U
        lo_g = tl.load(log_ptr + cols, mask=cmask, other=0.0)[None, :]
        st_g = tl.load(stepg_ptr + cols, mask=cmask, other=0.0)[None, :]
        lo_u = tl.load(lou_ptr + cols, mask=cmask, other=0.0)[None, :]
        st_u = tl.load(stepu_ptr + cols, mask=cmask, other=0.0)[None, :]
        if HAS_G:
            if FMA_PATH:
                bt_g = 0.0  # loaded per K chunk inside _lora_tile
            else:
                bt_g = _load_bt(bg_ptr, cols, cmask, R, stride_bn, BLOCK_R)
        if HAS_U:
            if FMA_PATH:
                bt_u = 0.0  # loaded per K chunk inside _lora_tile
            else:
                bt_u = _load_bt(bu_ptr, cols, cmask, R, stride_bn, BLOCK_R)
        for it in tl.static_range(ROW_ITERS):
            rows = ((pid_m * ROW_ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            pg = tl.load(cg_ptr + rows[:, None] * NB_G + bcols_g[None, :], mask=rmask[:, None] & bmask_g[None, :],
                         other=0)
            pu = tl.load(cu_ptr + rows[:, None] * NB_U + bcols_u[None, :], mask=rmask[:, None] & bmask_u[None, :],
                         other=0)
            g = _unpack(pg, BLOCK_M, BLOCK_N, BITS_G) * st_g + lo_g
            u = _unpack(pu, BLOCK_M, BLOCK_N, BITS_U) * st_u + lo_u
            if HAS_G:
                g = g + _lora_tile(xag_ptr, bg_ptr, bt_g, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                               BLOCK_M, BLOCK_N, BLOCK_R, FMA_PATH) * scale_g
            if HAS_U:
                u = u + _lora_tile(xau_ptr, bu_ptr, bt_u, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                               BLOCK_M, BLOCK_N, BLOCK_R, FMA_PATH) * scale_u
            sig = tl.sigmoid(g)
            silu = g * sig
            ddv = tl.load(dd_ptr + rows[:, None] * stride_ddm + cols[None, :], mask=mask, other=0.0)
            ddv = ddv.to(tl.float32)
            du = ddv * silu
            dg = ddv * u * (sig * (1.0 + g * (1.0 - sig)))
            ooffs = rows[:, None] * stride_om + cols[None, :]
            tl.store(dg_ptr + ooffs, _cast_out(dg, dg_ptr, EMULATE_BF16_RNE_GRAD), mask=mask)
            tl.store(du_ptr + ooffs, _cast_out(du, du_ptr, EMULATE_BF16_RNE_GRAD), mask=mask)
            if NEED_D:
                tl.store(dh_ptr + ooffs, _cast_out(silu * u, dh_ptr, EMULATE_BF16_RNE_D), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_r(r: int) -> int:
    # tl.dot needs K >= 16 (and a power of two); the rank is zero-padded by masked loads
    return max(16, _next_pow2(r))


# (BLOCK_M, BLOCK_N, num_warps, ROW_ITERS, USE_FMA). Every dot dimension >= 16 whatever the bit
# width (BLOCK_N counts columns, packing comes after the dot). ROW_ITERS > 1 reuses the B^T tiles
# and the per-channel parameters over more rows. Chosen from ptxas's sm_90 resource usage (Triton
# 3.6 compiled ahead of time for GPUTarget("cuda", 90), bf16, r=16, 2/4 bits): at 8-16 elements
# per thread the tensor-core kernels need 80-165 registers and never spill, while 64x64 / 4 warps
# took 255 registers with spills and 128x128 / 8 warps spilled up to 2 KB per thread.
# First H200 run (BENCHMARKS.md, run 2): 17-26% of copy bandwidth. The TTGIR shows why: the dot
# result lives in the MMA layout and the loads/stores in a blocked one, so every sub-tile makes
# 5-6 shared-memory layout round trips (~35 barriers per program in the backward). USE_FMA=True
# entries do the rank-r product on CUDA cores instead (exact fp32 products of the rounded
# operands, K in chunks of 16): no MMA layout, fewer barriers (19-27), but 160-200 registers;
# the autotuner (per N, R, BITS, ...) measures which wins; bench_fused.py --sweep times all.
FWD_CONFIGS = [(32, 64, 8, 2, False), (32, 64, 8, 4, False), (16, 128, 8, 4, False), (16, 64, 4, 4, False),
               (64, 64, 8, 1, False), (64, 64, 8, 2, False), (32, 128, 8, 2, False), (32, 32, 4, 4, False),
               (32, 64, 8, 2, True), (64, 64, 8, 1, True)]
BWD_CONFIGS = FWD_CONFIGS
# HYCLORA_QUANT_AUTOTUNE=0: (BLOCK_M, BLOCK_N, num_warps, ROW_ITERS), tensor cores; 80-91
# registers at r=16. Kept a 4-tuple: hyclora.ops.encoder's fused GELU launches with it too.
_FIXED = (32, 64, 8, 2)


def _interpret_blocks(m: int, n: int):
    # the interpreter pays per program, not per element: few, large tiles
    return max(16, min(_next_pow2(m), 64)), max(16, min(_next_pow2(n), 128)), 4, 1


def _launch_opts(num_warps: int) -> dict:
    if _INTERPRET:
        return {}
    # no FMA contraction: (y - lo) * inv + 0.5 must round twice, like the torch reference
    return dict(num_warps=num_warps, enable_fp_fusion=False)


@functools.lru_cache(maxsize=None)
def _tuned(which: str):
    table = FWD_CONFIGS if which == "fwd" else BWD_CONFIGS
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "ROW_ITERS": ri, "USE_FMA": fma}, num_warps=w)
               for bm, bn, w, ri, fma in table]
    kernel = _swiglu_fwd_kernel if which == "fwd" else _swiglu_bwd_kernel
    key = ["N", "R", "BITS_G", "BITS_U", "HAS_G", "HAS_U", "DOT_FP32"]
    # the backward writes dG/dU/D~ in full, the forward codes and D: no output is read back,
    # so autotune's repeated runs are harmless
    return triton.autotune(configs=configs, key=key)(kernel)


def _launch(which: str, m: int, n: int, args: tuple, consts: dict, config) -> None:
    kernel = _swiglu_fwd_kernel if which == "fwd" else _swiglu_bwd_kernel
    if config is None and not _INTERPRET and _AUTOTUNE:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_ITERS"]), triton.cdiv(n, meta["BLOCK_N"]))
        launch_tuned(_tuned(which), grid, args, dict(consts, enable_fp_fusion=False))
        return
    if config is not None:
        bm, bn, warps, ri, fma = (tuple(config) + (1, False)[len(config) - 3:])[:5]
    elif _INTERPRET:
        bm, bn, warps, ri, fma = _interpret_blocks(m, n) + (False,)
    else:
        bm, bn, warps, ri, fma = _FIXED + (False,)
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"fused SwiGLU tile {bm}x{bn}: both must be powers of two >= 16 (tl.dot minimum).")
    grid = (triton.cdiv(m, bm * ri), triton.cdiv(n, bn))
    kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, ROW_ITERS=ri, USE_FMA=bool(fma), **_launch_opts(warps))


def _check_triton_device(*tensors):
    if triton is None:
        raise RuntimeError("hyclora fused SwiGLU: backend='triton' needs the `triton` package; use backend='torch'.")
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not _INTERPRET:
            raise RuntimeError(
                "hyclora fused SwiGLU: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                "before Python starts); use backend='torch' for CPU tensors."
            )


def _dot_operands(xa_g, xa_u, b_g, b_u, dot_dtype):
    """Round the LoRA operands to the dot dtype in torch (round to nearest even; tiny tensors),
    so the kernel only ever upcasts them exactly. Returns (xa_g, xa_u, b_g, b_u, R, DOT_FP32)."""
    present = [(xa, b) for xa, b in ((xa_g, b_g), (xa_u, b_u)) if xa is not None]
    if not present:
        return xa_g, xa_u, b_g, b_u, 1, True
    dot_dtype = _default_dot(dot_dtype, xa_g, b_g, xa_u, b_u)
    if dot_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hyclora fused SwiGLU: dot dtype {dot_dtype} is not supported (fp32/bf16/fp16).")
    ranks = {xa.shape[1] for xa, _ in present}
    if len(ranks) != 1:
        # one BLOCK_R per launch; different gate/up ranks would need two (not a PEFT default)
        raise ValueError(f"hyclora fused SwiGLU: gate and up LoRA ranks differ ({sorted(ranks)}); "
                         "use the same rank for gate_proj and up_proj, or layer_type='intra_inter'.")

    def prep(t):
        return None if t is None else t.to(dot_dtype).contiguous()

    # the interpreter's bf16/fp16 dot is wrong: there the operands are upcast (exactly) instead,
    # except when a test asks for the tensor-core branch on fp32 data (_TEST_TENSOR_CORE_PATH)
    dot_fp32 = dot_dtype == torch.float32 or _INTERPRET
    if _INTERPRET and _TEST_TENSOR_CORE_PATH:
        if dot_dtype != torch.float32:
            raise ValueError("_TEST_TENSOR_CORE_PATH runs the tensor-core branch on fp32 operands only")
        dot_fp32 = False
    return prep(xa_g), prep(xa_u), prep(b_g), prep(b_u), ranks.pop(), dot_fp32


def swiglu_lora_forward_triton(yw_g, yw_u, xa_g, xa_u, b_g, b_u, scale_g, scale_u,
                               lo_g, inv_g, lo_u, inv_u, bits, *, dot_dtype=None, config=None):
    _check_triton_device(yw_g, yw_u, xa_g, xa_u)
    m, n = yw_g.shape
    yw_g, yw_u = yw_g.contiguous(), yw_u.contiguous()
    xa_g, xa_u, b_g, b_u, r, dot_fp32 = _dot_operands(xa_g, xa_u, b_g, b_u, dot_dtype)
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
    consts = dict(BITS_G=bits_g, BITS_U=bits_u, HAS_G=xa_g is not None, HAS_U=xa_u is not None, DOT_FP32=dot_fp32,
                  EMULATE_BF16_RNE=_INTERPRET and d.dtype == torch.bfloat16, BLOCK_R=_block_r(r))
    _launch("fwd", m, n, args, consts, config)
    return codes_g, codes_u, d


def swiglu_lora_backward_triton(codes_g, codes_u, lo_g, step_g, lo_u, step_u, xa_g, xa_u, b_g, b_u,
                                scale_g, scale_u, dd, bits, *, dtype, need_d=True, dot_dtype=None,
                                config=None):
    _check_triton_device(codes_g, codes_u, dd, xa_g, xa_u)
    m, n = dd.shape
    bits_g, bits_u = _bit_pair(bits)
    nb_g, nb_u = packed_width(n, bits_g), packed_width(n, bits_u)
    dd = dd.contiguous()
    codes_g, codes_u = codes_g.contiguous(), codes_u.contiguous()
    xa_g, xa_u, b_g, b_u, r, dot_fp32 = _dot_operands(xa_g, xa_u, b_g, b_u, dot_dtype)
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
    consts = dict(BITS_G=bits_g, BITS_U=bits_u, HAS_G=xa_g is not None, HAS_U=xa_u is not None, DOT_FP32=dot_fp32,
                  NEED_D=need_d, EMULATE_BF16_RNE_GRAD=_INTERPRET and out_dtype == torch.bfloat16,
                  EMULATE_BF16_RNE_D=_INTERPRET and dtype == torch.bfloat16, BLOCK_R=_block_r(r))
    _launch("bwd", m, n, args, consts, config)
    return dg, du, d_hat


# ---------------------------------------------------------------------------------------------
# public operator entry points
# ---------------------------------------------------------------------------------------------


def _check_params(name: str, t: Tensor, n: int):
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(
            f"hyclora fused SwiGLU: {name} has shape {tuple(t.shape)}; expected per-channel ({n},) "
            "fp32 parameters (hyclora.quant.core.affine_params / ChannelStats.frozen_params)."
        )


def swiglu_lora_forward(yw_g: Tensor, yw_u: Tensor, xa_g: Optional[Tensor], xa_u: Optional[Tensor],
                        b_g: Optional[Tensor], b_u: Optional[Tensor], scale_g: float, scale_u: float,
                        lo_g: Tensor, inv_g: Tensor, lo_u: Tensor, inv_u: Tensor, bits: int, *,
                        dot_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                        config=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantise the gate/up base outputs and compute ``D = SiLU(G) * U`` in one pass.

    Args:
        yw_g, yw_u: ``(M, N)`` base outputs ``X W^T (+ bias)`` of gate_proj / up_proj.
        xa_g, xa_u: ``(M, r)`` LoRA-A outputs ``drop(X) A^T``, or ``None`` without LoRA.
        b_g, b_u: PEFT ``lora_B`` weights ``(N, r)``, or ``None``.
        scale_g, scale_u: LoRA scalings.
        lo_*, inv_*: ``(N,)`` fp32 per-channel quantisation parameters (``lo``, ``1/step``).
        bits: 2, 4 or 8, or a ``(bits_gate, bits_up)`` pair.
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
            f"hyclora fused SwiGLU: yw_g {tuple(yw_g.shape)} {yw_g.dtype} and yw_u {tuple(yw_u.shape)} "
            f"{yw_u.dtype} must be 2-D (tokens, d_ff) of one shape and dtype; reshape(-1, d_ff) first."
        )
    m, n = yw_g.shape
    _check_lora("g", xa_g, b_g, m, n)
    _check_lora("u", xa_u, b_u, m, n)
    for name, t in (("lo_g", lo_g), ("inv_g", inv_g), ("lo_u", lo_u), ("inv_u", inv_u)):
        _check_params(name, t, n)
    if resolve_backend(backend, yw_g.device) == "triton":
        return swiglu_lora_forward_triton(yw_g, yw_u, xa_g, xa_u, b_g, b_u, scale_g, scale_u,
                                          lo_g, inv_g, lo_u, inv_u, bits, dot_dtype=dot_dtype, config=config)
    return swiglu_lora_forward_torch(yw_g, yw_u, xa_g, xa_u, b_g, b_u, scale_g, scale_u,
                                     lo_g, inv_g, lo_u, inv_u, bits, dot_dtype=dot_dtype)


def swiglu_lora_backward(codes_g: Tensor, codes_u: Tensor, lo_g: Tensor, step_g: Tensor, lo_u: Tensor,
                         step_u: Tensor, xa_g: Optional[Tensor], xa_u: Optional[Tensor],
                         b_g: Optional[Tensor], b_u: Optional[Tensor], scale_g: float, scale_u: float,
                         dd: Tensor, bits: int, *, dtype: torch.dtype, need_d: bool = True,
                         dot_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                         config=None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Rebuild ``G``, ``U`` from their codes and LoRA terms; return ``(dG, dU, D~)``.

    ``dd``: ``(M, N)`` gradient of ``D``; ``dtype``: dtype of the forward activations (that of
    ``D~``; ``dG``/``dU`` get ``promote(dd.dtype, dtype)``). ``need_d=False`` skips ``D~``
    (down_proj without LoRA). Other arguments as in :func:`swiglu_lora_forward`, with ``step_*``
    (not ``1/step``) for dequantisation.
    """
    pair = _bit_pair(bits)
    if dd.dim() != 2:
        raise ValueError(f"hyclora fused SwiGLU: dd has shape {tuple(dd.shape)}; expected 2-D (tokens, d_ff).")
    m, n = dd.shape
    for name, c, b in (("codes_g", codes_g, pair[0]), ("codes_u", codes_u, pair[1])):
        nb = packed_width(n, b)
        if c.dtype != torch.uint8 or c.shape != (m, nb):
            raise ValueError(f"hyclora fused SwiGLU: {name} is {c.dtype} {tuple(c.shape)}; expected "
                             f"uint8 ({m}, {nb}) for {n} columns at {b} bits.")
    _check_lora("g", xa_g, b_g, m, n)
    _check_lora("u", xa_u, b_u, m, n)
    for name, t in (("lo_g", lo_g), ("step_g", step_g), ("lo_u", lo_u), ("step_u", step_u)):
        _check_params(name, t, n)
    if resolve_backend(backend, dd.device) == "triton":
        return swiglu_lora_backward_triton(codes_g, codes_u, lo_g, step_g, lo_u, step_u, xa_g, xa_u,
                                           b_g, b_u, scale_g, scale_u, dd, bits, dtype=dtype,
                                           need_d=need_d, dot_dtype=dot_dtype, config=config)
    return swiglu_lora_backward_torch(codes_g, codes_u, lo_g, step_g, lo_u, step_u, xa_g, xa_u, b_g, b_u,
                                      scale_g, scale_u, dd, bits, dtype=dtype, need_d=need_d,
                                      dot_dtype=dot_dtype)


# ---------------------------------------------------------------------------------------------
# block glue (called by hyclora.ops.blocks.MLPBlockFn for intra_inter_full_fuse)
# ---------------------------------------------------------------------------------------------


def lora_base_forward(meta: LinearMeta, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      lora_a: Optional[Tensor], lora_b: Optional[Tensor] = None, *,
                      fused: Optional[str] = None) -> LinearOut:
    """:func:`hyclora.ops.lora.lora_linear_forward` without the final ``y_w + s (XA) B^T``
    (``y`` is ``None``; ``lora_b`` is accepted for the same signature and not used): the fused
    kernel adds the LoRA term itself, so the full output is never materialised. Same ops, same
    dropout draw (same generator consumption) as the original."""
    y_w = F.linear(x, dense_weight(meta, weight), bias)
    if not meta.has_lora:
        return LinearOut(None, y_w, None, None)
    xa, rng_state = lora_down_projection(meta, x, lora_a, fused)
    return LinearOut(None, y_w, xa, rng_state)


def quant_params_like_policy(policy, x2d: Tensor, stats, update: bool, replay: bool, name: Optional[str] = None):
    """``(lo, step, inv_step, outlier_idx)`` that ``policy.keep`` (i.e.
    :func:`hyclora.quant.quantize`) would use for ``x2d``, in the same order of statistics
    updates: frozen stats -> the cached parameters; calibrating -> outlier channels chosen (and
    scored) first, then this tensor's range, both merged into the stats when ``update``; a
    checkpoint replay of a calibrating forward -> the stored outlier set and this tensor's own
    range; no stats -> own range, no outliers. Outlier columns get lo = step = inv_step = 0."""
    bits = policy.bits if name is None else policy.bits_for(name)
    backend = policy.backend
    with torch.no_grad():
        if stats is not None:
            stats._check_compatible(x2d)
            if stats.frozen and not replay:
                return stats.frozen_params(bits)
        idx = None
        if stats is not None and stats.num_outliers > 0:
            idx = stats.outlier_idx.clone() if replay else stats.select_outliers(x2d, update=update)
        if stats is not None and not replay:
            lo, hi = stats.range_for(x2d, update=update, backend=backend)
        else:
            lo, hi = column_minmax(x2d, backend)
        lo, step, inv = affine_params(lo, hi, bits)
        if idx is not None:
            lo, step, inv = (t.index_fill(0, idx, 0.0) for t in (lo, step, inv))
        return lo, step, inv, idx


_GATE_UP = ("gate", "up")


def fused_gate_up_forward(plan, store, g_out: LinearOut, u_out: LinearOut, b_gate: Optional[Tensor],
                          b_up: Optional[Tensor]) -> Tensor:
    """Keep ``Q(Y_W)`` of gate/up (codes from the fused kernel) and their ``XA`` in ``store``;
    return ``D = SiLU(G) * U`` of shape ``y_w.shape``. ``g_out``/``u_out`` come from
    :func:`lora_base_forward`."""
    pol = plan.policy
    from .storage import GROUPED_TENSORS, ROW_OUTLIER_EXEMPT

    for name in _GATE_UP:  # the kernel writes plain per-channel codes, as keep() must
        if name not in ROW_OUTLIER_EXEMPT or name in GROUPED_TENSORS:
            raise RuntimeError(f"hyclora internal error: the fused SwiGLU kernel keeps {name!r} per channel "
                               "without exact rows, but the storage policy keeps it otherwise.")
    bits = tuple(pol.bits_for(name) for name in _GATE_UP)
    meta_g, meta_u = plan.linears[0], plan.linears[1]
    shape = g_out.y_w.shape
    n = shape[-1]
    yw_g = g_out.y_w.reshape(-1, n)
    yw_u = u_out.y_w.reshape(-1, n)
    params = []
    for name, y2d in zip(_GATE_UP, (yw_g, yw_u)):
        lo, step, inv, idx = quant_params_like_policy(pol, y2d.detach(), plan.stats.get(name), plan.update,
                                                      name in plan.replay, name=name)
        if idx is not None:
            raise RuntimeError(
                "hyclora internal error: the fused SwiGLU kernel quantises gate/up without outlier "
                "channels, but their statistics have some."
            )
        params.append((lo, step, inv))
    (lo_g, step_g, inv_g), (lo_u, step_u, inv_u) = params
    xa_g = g_out.xa.reshape(-1, g_out.xa.shape[-1]) if meta_g.has_lora else None
    xa_u = u_out.xa.reshape(-1, u_out.xa.shape[-1]) if meta_u.has_lora else None
    bg = b_gate if meta_g.has_lora else None
    bu = b_up if meta_u.has_lora else None
    ref = xa_g if xa_g is not None else xa_u
    dot = dot_dtype_for(ref, bg if bg is not None else bu) if ref is not None else None
    with torch.no_grad():
        codes_g, codes_u, d = swiglu_lora_forward(
            yw_g.detach(), yw_u.detach(), xa_g, xa_u, bg, bu, meta_g.scaling, meta_u.scaling,
            lo_g, inv_g, lo_u, inv_u, bits, dot_dtype=dot, backend=pol.backend)
    # same names and order as the op-by-op path (blocks.swiglu_epilogue_forward)
    for name, meta, out, codes, lo, step, b in ((("gate", meta_g, g_out, codes_g, lo_g, step_g, bits[0])),
                                                (("up", meta_u, u_out, codes_u, lo_u, step_u, bits[1]))):
        if meta.has_lora:
            store.plain(f"xa_{name}", out.xa)
            if out.rng_state is not None:
                store.plain(f"rng_{name}", out.rng_state)
        qt = QuantizedTensor(codes, lo, step, bits=b, shape=shape, dtype=out.y_w.dtype)
        store.packed(name, "quant", qt)
    return d.view(shape)


def fused_mlp_epilogue_backward(plan, load, dy: Tensor, params: Sequence[Sequence[Optional[Tensor]]],
                                need_down: Sequence[bool]):
    """down_proj backward + the fused SwiGLU backward.

    ``params``: ``(W, bias, A, B)`` of gate, up, down; ``need_down``: ``needs_input_grad`` of
    down's ``(W, bias, A, B)``. Order (the op-by-op path rebuilds ``D~`` first): ``dD`` needs no
    activation, so it is computed first; then one kernel writes ``dG``, ``dU`` and ``D~``; then
    down's LoRA-A gradient reads ``D~``. Returns ``((None, dbias, dA, dB) of down, dG, dU)``.
    """
    pol = plan.policy
    meta_g, meta_u, meta_d = plan.linears
    (_, _, _, b_g), (_, _, _, b_u), (w_d, bias_d, a_d, b_d) = params
    q_g, q_u = load.get_quantized("gate"), load.get_quantized("up")
    for q in (q_g, q_u):
        if not isinstance(q, QuantizedTensor) or q.num_outliers or q.group_size is not None:
            raise RuntimeError("hyclora internal error: fused SwiGLU expects per-channel codes "
                               "without outlier columns for gate/up.")
    need_da = bool(need_down[2]) and meta_d.has_lora
    dd, dbias, db, grad_a = lora_linear_backward_input_first(
        meta_d, dy, load.get("xa_down"), w_d, bias_d, a_d, b_d, rng_state=load.get("rng_down"),
        need_da=need_da, need_db=bool(need_down[3]), need_dbias=bool(need_down[1]), fused=pol.lora_fused_backend)

    shape = q_g.shape
    n = shape[-1]
    xa_g = load.get("xa_gate") if meta_g.has_lora else None
    xa_u = load.get("xa_up") if meta_u.has_lora else None
    xa_g = None if xa_g is None else xa_g.reshape(-1, xa_g.shape[-1])
    xa_u = None if xa_u is None else xa_u.reshape(-1, xa_u.shape[-1])
    bg = b_g if meta_g.has_lora else None
    bu = b_u if meta_u.has_lora else None
    ref = xa_g if xa_g is not None else xa_u
    dot = dot_dtype_for(ref, bg if bg is not None else bu) if ref is not None else None
    with torch.no_grad():
        dg, du, d_hat = swiglu_lora_backward(
            q_g.codes, q_u.codes, q_g.lo, q_g.step, q_u.lo, q_u.step, xa_g, xa_u, bg, bu,
            meta_g.scaling, meta_u.scaling, dd.reshape(-1, n), (q_g.bits, q_u.bits), dtype=q_g.dtype,
            need_d=need_da, dot_dtype=dot, backend=pol.backend)
    del dd
    da = grad_a(None if d_hat is None else d_hat.view(shape))
    return (None, dbias, da, db), dg.view(shape), du.view(shape)


__all__ = [
    "swiglu_lora_forward",
    "swiglu_lora_backward",
    "swiglu_lora_forward_torch",
    "swiglu_lora_backward_torch",
    "swiglu_lora_forward_triton",
    "swiglu_lora_backward_triton",
    "dot_dtype_for",
    "lora_base_forward",
    "quant_params_like_policy",
    "fused_gate_up_forward",
    "fused_mlp_epilogue_backward",
]
