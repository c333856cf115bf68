"""Triton kernels: quantise+pack and unpack+dequantise, same codes as the torch reference.

Semantics are those of :func:`hyclora.quant.core.quantize_pack_torch` /
:func:`~hyclora.quant.core.unpack_dequantize_torch` (the oracle in the tests):
``code = clamp(floor((x - lo) * inv_step + 0.5), 0, 2^bits - 1)``, adjacent columns packed
least-significant first, ``x_hat = code * step + lo`` rounded to the output dtype. Outlier columns
need nothing here: their lo/step/inv_step are 0 so they encode as 0; the caller gathers/scatters
the exact values with torch index ops.

Layout of the work: one program per (BLOCK_M rows) x (BLOCK_N columns = BLOCK_N * bits / 8
packed bytes). Each program reads a contiguous 2-D tile (vectorised 16-byte loads), works in fp32,
and writes a contiguous tile of packed bytes (quantise) or of dequantised values (dequantise).
The per-channel lo and 1/step are precomputed once per tensor and loaded once per program as a
row vector broadcast over the BLOCK_M rows. Packing uses reshape + split (interleave via join on
the way back), which stays in registers. Row offsets are int64 so tensors beyond 2^31 elements
work.

FP contraction is disabled on GPU (``enable_fp_fusion=False``): an FMA would round
``(x - lo) * inv_step + 0.5`` once instead of twice and could flip a code at an exact tie,
breaking bit-equality with the torch reference. The kernels are memory bound, so it costs nothing.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .core import packed_width

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _quant_pack_kernel(
    x_ptr, lo_ptr, inv_ptr, out_ptr,
    M, N, NB, stride_xm, n_groups,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    E: tl.constexpr = 8 // BITS
    BLOCK_B: tl.constexpr = BLOCK_N // E
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_b * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if GROUP == 0:
        # per channel: one vector of parameters, broadcast over the rows
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)[None, :]
        inv = tl.load(inv_ptr + cols, mask=cmask, other=0.0)[None, :]
    else:
        poff = rows[:, None] * n_groups + (cols // GROUP)[None, :]
        lo = tl.load(lo_ptr + poff, mask=mask, other=0.0)
        inv = tl.load(inv_ptr + poff, mask=mask, other=0.0)
    v = (x - lo) * inv
    c = tl.floor(v + 0.5)
    c = tl.minimum(tl.maximum(c, 0.0), QMAX)
    # padding columns of the last byte must be 0, as in the reference
    c = tl.where(mask, c, 0.0).to(tl.int32)
    if E == 1:
        packed = c
    elif E == 2:
        a, b = tl.split(tl.reshape(c, (BLOCK_M, BLOCK_B, 2)))
        packed = a | (b << 4)
    else:
        # column 4*byte + 2*i + j  ->  split on j, then on i
        even, odd = tl.split(tl.reshape(c, (BLOCK_M, BLOCK_B, 2, 2)))
        e0, e2 = tl.split(even)
        e1, e3 = tl.split(odd)
        packed = e0 | (e1 << 2) | (e2 << 4) | (e3 << 6)
    bcols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    omask = rmask[:, None] & (bcols < NB)[None, :]
    tl.store(out_ptr + rows[:, None] * NB + bcols[None, :], packed.to(tl.uint8), mask=omask)


@triton.jit
def _unpack_dequant_kernel(
    codes_ptr, lo_ptr, step_ptr, out_ptr,
    M, N, NB, stride_om, n_groups,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr,
):
    E: tl.constexpr = 8 // BITS
    BLOCK_B: tl.constexpr = BLOCK_N // E
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    bcols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rmask[:, None] & (bcols < NB)[None, :]
    p = tl.load(codes_ptr + rows[:, None] * NB + bcols[None, :], mask=bmask, other=0).to(tl.int32)
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
    cols = pid_b * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    if GROUP == 0:
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)[None, :]
        step = tl.load(step_ptr + cols, mask=cmask, other=0.0)[None, :]
    else:
        poff = rows[:, None] * n_groups + (cols // GROUP)[None, :]
        lo = tl.load(lo_ptr + poff, mask=mask, other=0.0)
        step = tl.load(step_ptr + poff, mask=mask, other=0.0)
    y = c.to(tl.float32) * step + lo
    if EMULATE_BF16_RNE:
        # The interpreter casts fp32 -> bf16 by truncation; round to nearest even by hand so the
        # interpreted kernel matches torch (the GPU's cvt.rn already does this).
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out, mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Tiles (BLOCK_M rows, BLOCK_N columns, warps). On GPU the launch is autotuned over these, per
# (N, bits, granularity); the winner is cached for the process. Why these: with 8 elements per
# thread (BLOCK_M * BLOCK_N = 256 * warps) and BLOCK_N <= 128 Triton keeps the loads, the
# pack/unpack, the per-channel parameters and the store in one register layout (16-byte accesses
# of bf16, no shared-memory round trip; checked on the sm_90 TTGIR); a tall tile (BLOCK_M >= 16)
# amortises the parameter loads (8 bytes per column) over many rows. The larger tiles put more
# bytes in flight per program but stage through shared memory. Which wins depends on the GPU,
# hence the tuning (benchmarks/bench_quant.py prints a sweep).
GPU_CONFIGS = [(16, 128, 8), (32, 64, 8), (8, 128, 4), (8, 256, 8), (4, 512, 8), (16, 512, 8),
               (32, 256, 8)]
_AUTOTUNE = os.environ.get("HYCLORA_QUANT_AUTOTUNE", "1") != "0"


def _interpret_blocks(m: int, n: int):
    # the interpreter pays per program, not per element: few, large tiles
    return min(_next_pow2(m), 64), max(8, min(_next_pow2(n), 256)), 4


def _fixed_blocks(m: int, n: int):
    """Heuristic when autotuning is off (HYCLORA_QUANT_AUTOTUNE=0): (16, 128, 8)-like tiles."""
    block_n = max(8, min(_next_pow2(n), 128))
    return max(1, 2048 // block_n), block_n, 8


def _launch_opts(num_warps: int) -> dict:
    if _INTERPRET:
        return {}
    return dict(num_warps=num_warps, enable_fp_fusion=False)


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    kernel = {"quant": _quant_pack_kernel, "dequant": _unpack_dequant_kernel}[kernel_name]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w) for bm, bn, w in GPU_CONFIGS]
    return triton.autotune(configs=configs, key=["N", "BITS", "GROUP"])(kernel)


def _launch(kernel_name: str, m: int, n: int, args: tuple, consts: dict, config) -> None:
    kernel = {"quant": _quant_pack_kernel, "dequant": _unpack_dequant_kernel}[kernel_name]
    if config is None and not _INTERPRET and _AUTOTUNE:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        _tuned(kernel_name)[grid](*args, **consts, enable_fp_fusion=False)
        return
    if config is not None:
        bm, bn, warps = config
        bn = max(8, bn)
    elif _INTERPRET:
        bm, bn, warps = _interpret_blocks(m, n)
    else:
        bm, bn, warps = _fixed_blocks(m, n)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, **_launch_opts(warps))


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not _INTERPRET:
            raise RuntimeError(
                "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before Python "
                "starts); use backend='torch' for CPU tensors."
            )


def quantize_pack(x2d: torch.Tensor, lo: torch.Tensor, inv_step: torch.Tensor, bits: int,
                  group_size: Optional[int] = None, *, config=None) -> torch.Tensor:
    """(rows, N) bf16/fp16/fp32 -> (rows, ceil(N*bits/8)) uint8 codes.

    ``config`` = (BLOCK_M, BLOCK_N columns, num_warps) overrides the autotuner (benchmark sweeps).
    """
    _check_device(x2d)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, n = x2d.shape
    nb = packed_width(n, bits)
    out = torch.empty((m, nb), dtype=torch.uint8, device=x2d.device)
    lo = lo.contiguous()
    inv_step = inv_step.contiguous()
    n_groups = 1 if group_size is None else lo.shape[-1]
    _launch("quant", m, n, (x2d, lo, inv_step, out, m, n, nb, x2d.stride(0), n_groups),
            dict(BITS=bits, GROUP=0 if group_size is None else group_size), config)
    return out


def unpack_dequantize(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int,
                      n: int, dtype: torch.dtype, group_size: Optional[int] = None, *,
                      config=None) -> torch.Tensor:
    """(rows, NB) uint8 -> (rows, n) ``dtype``. ``config`` as in :func:`quantize_pack`."""
    _check_device(codes)
    codes = codes.contiguous()
    m, nb = codes.shape
    if nb != packed_width(n, bits):
        raise ValueError(f"codes have {nb} bytes per row; {n} columns at {bits} bits need "
                         f"{packed_width(n, bits)}.")
    out = torch.empty((m, n), dtype=dtype, device=codes.device)
    lo = lo.contiguous()
    step = step.contiguous()
    n_groups = 1 if group_size is None else lo.shape[-1]
    _launch("dequant", m, n, (codes, lo, step, out, m, n, nb, out.stride(0), n_groups),
            dict(BITS=bits, GROUP=0 if group_size is None else group_size,
                 EMULATE_BF16_RNE=_INTERPRET and dtype == torch.bfloat16), config)
    return out
