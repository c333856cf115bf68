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
from typing import Optional

import torch

from hyclora.kernels.common import INTERPRET, check_triton_device, launch_opts, launch_tuned, next_pow2, tl, triton
from hyclora.kernels.common import AUTOTUNE, cast_out

from .format import packed_width

# -- the codec's @triton.jit pieces: every fused kernel that writes or reads codes uses these -------


@triton.jit
def quant_codes(y, lo, inv, mask, BITS: tl.constexpr):
    """Codes of an fp32 tile, exactly :func:`hyclora.quant.core.quantize_codes_torch`:
    ``floor((y - lo) * inv + 0.5)`` clamped (FMA off at launch); masked elements get code 0 (the
    padding columns of the last byte must be 0, as in the reference)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    c = tl.floor((y - lo) * inv + 0.5)
    c = tl.minimum(tl.maximum(c, 0.0), QMAX)
    return tl.where(mask, c, 0.0).to(tl.int32)


@triton.jit
def pack_tile(c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)`` int32 codes -> ``(BLOCK_M, BLOCK_N * BITS / 8)`` uint8: adjacent
    columns share a byte, least significant first (the layout of :func:`hyclora.quant.core.pack_codes`)."""
    E: tl.constexpr = 8 // BITS
    BLOCK_B: tl.constexpr = BLOCK_N // E
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
    return packed.to(tl.uint8)


@triton.jit
def unpack_tile(p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr):
    """The inverse of :func:`pack_tile`: packed bytes -> fp32 codes ``(BLOCK_M, BLOCK_N)``."""
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
def _quant_pack_kernel(
    x_ptr, lo_ptr, inv_ptr, out_ptr,
    M, N, NB, stride_xm, n_groups,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ITERS: tl.constexpr,
):
    E: tl.constexpr = 8 // BITS
    BLOCK_B: tl.constexpr = BLOCK_N // E
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    cols = pid_b * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    bcols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    if GROUP == 0:
        # per channel: one vector of parameters, loaded once and reused for all the
        # BLOCK_M * ROW_ITERS rows of this program
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)[None, :]
        inv = tl.load(inv_ptr + cols, mask=cmask, other=0.0)[None, :]
    for r in tl.static_range(ROW_ITERS):
        rows = ((pid_m * ROW_ITERS + r) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if GROUP != 0:
            poff = rows[:, None] * n_groups + (cols // GROUP)[None, :]
            lo = tl.load(lo_ptr + poff, mask=mask, other=0.0)
            inv = tl.load(inv_ptr + poff, mask=mask, other=0.0)
        packed = pack_tile(quant_codes(x, lo, inv, mask, BITS), BLOCK_M, BLOCK_N, BITS)
        omask = rmask[:, None] & (bcols < NB)[None, :]
        tl.store(out_ptr + rows[:, None] * NB + bcols[None, :], packed, mask=omask)


@triton.jit
def _unpack_dequant_kernel(
    codes_ptr, lo_ptr, step_ptr, out_ptr,
    M, N, NB, stride_om, n_groups,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ITERS: tl.constexpr,
    EMULATE_BF16_RNE: tl.constexpr,
):
    E: tl.constexpr = 8 // BITS
    BLOCK_B: tl.constexpr = BLOCK_N // E
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    bcols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_b * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if GROUP == 0:
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)[None, :]
        step = tl.load(step_ptr + cols, mask=cmask, other=0.0)[None, :]
    for r in tl.static_range(ROW_ITERS):
        rows = ((pid_m * ROW_ITERS + r) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        bmask = rmask[:, None] & (bcols < NB)[None, :]
        p = tl.load(codes_ptr + rows[:, None] * NB + bcols[None, :], mask=bmask, other=0)
        c = unpack_tile(p, BLOCK_M, BLOCK_N, BITS)
        mask = rmask[:, None] & cmask[None, :]
        if GROUP != 0:
            poff = rows[:, None] * n_groups + (cols // GROUP)[None, :]
            lo = tl.load(lo_ptr + poff, mask=mask, other=0.0)
            step = tl.load(step_ptr + poff, mask=mask, other=0.0)
        y = c * step + lo
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], cast_out(y, out_ptr, EMULATE_BF16_RNE), mask=mask)


@triton.jit
def _col_minmax_kernel(
    x_ptr, min_ptr, max_ptr, M, N, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr,
):
    # partial per-column min/max over rows [pid_m * rows_per_prog, +rows_per_prog): elementwise
    # running min/max in a (BLOCK_M, BLOCK_N) accumulator, one cross-thread reduction at the end
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc_min = tl.full((BLOCK_M, BLOCK_N), float("inf"), tl.float32)
    acc_max = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    # a constexpr trip count (a power of two, so few variants get compiled): the interpreter
    # cannot take loop bounds from kernel arguments
    for t in range(ROW_TILES):
        rows = ((pid_m * ROW_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        acc_min = tl.minimum(acc_min, tl.where(mask, x, float("inf")))
        acc_max = tl.maximum(acc_max, tl.where(mask, x, float("-inf")))
    tl.store(min_ptr + pid_m * N + cols, tl.min(acc_min, axis=0), mask=cmask)
    tl.store(max_ptr + pid_m * N + cols, tl.max(acc_max, axis=0), mask=cmask)


def column_minmax(x2d: torch.Tensor, *, programs_per_column_block: Optional[int] = None):
    """Per-column (lo, hi) fp32 of a (rows, N) tensor: Triton partials over row chunks, then a
    small torch reduction. Exact (min/max do not round); torch.aminmax(dim=0) is several times
    slower than a read of the tensor."""
    check_triton_device("quantisation", x2d)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, n = x2d.shape
    if INTERPRET:
        block_m, block_n, warps = min(next_pow2(m), 64), max(8, min(next_pow2(n), 256)), 4
    else:
        block_m, block_n, warps = 32, 128, 8
    col_blocks = triton.cdiv(n, block_n)
    # enough programs to fill the GPU (~4 per SM), each reducing whole BLOCK_M row tiles
    want = programs_per_column_block
    if want is None:
        want = 1 if INTERPRET else max(1, (4 * _sm_count(x2d.device)) // col_blocks)
    row_tiles = triton.cdiv(m, block_m)
    row_tiles_per_prog = next_pow2(triton.cdiv(row_tiles, max(1, min(want, row_tiles))))
    chunks = triton.cdiv(row_tiles, row_tiles_per_prog)
    pmin = torch.empty((chunks, n), dtype=torch.float32, device=x2d.device)
    pmax = torch.empty((chunks, n), dtype=torch.float32, device=x2d.device)
    _col_minmax_kernel[(chunks, col_blocks)](
        x2d, pmin, pmax, m, n, x2d.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, ROW_TILES=row_tiles_per_prog, **launch_opts(warps),
    )
    if chunks == 1:
        return pmin[0], pmax[0]
    return pmin.amin(0), pmax.amax(0)


@triton.jit
def _col_observe_kernel(
    x_ptr, flag_ptr, lo_ptr, hi_ptr, score_ptr, skip_ptr, M, N, K, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr, K_PAD: tl.constexpr,
):
    # merges this program's rows into the running per-column min / max / sum of squares with
    # atomics, skipping the K rows listed at skip_ptr; returns at once while the flag is 0 (a
    # captured graph launches it every step, it reads x only while statistics are gathered)
    if tl.load(flag_ptr) == 0:
        return
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, K_PAD)
    skip = tl.load(skip_ptr + ks, mask=ks < K, other=-1)
    acc_min = tl.full((BLOCK_M, BLOCK_N), float("inf"), tl.float32)
    acc_max = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    acc_sq = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(ROW_TILES):
        rows = ((pid_m * ROW_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        skipped = tl.sum((rows[:, None] == skip[None, :]).to(tl.int32), axis=1) > 0
        mask = ((rows < M) & ~skipped)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_min = tl.minimum(acc_min, tl.where(mask, x, float("inf")))
        acc_max = tl.maximum(acc_max, tl.where(mask, x, float("-inf")))
        acc_sq += x * x
    tl.atomic_min(lo_ptr + cols, tl.min(acc_min, axis=0), mask=cmask)
    tl.atomic_max(hi_ptr + cols, tl.max(acc_max, axis=0), mask=cmask)
    tl.atomic_add(score_ptr + cols, tl.sum(acc_sq, axis=0), mask=cmask)


def observe_columns(x2d: torch.Tensor, flag: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    score: torch.Tensor, skip_rows: Optional[torch.Tensor] = None) -> None:
    """While ``flag`` (an int32 device scalar) is non-zero, merge ``x2d``'s per-column min, max
    and sum of squares over all rows but ``skip_rows`` into ``lo``/``hi``/``score`` (fp32, in
    place); launches and returns at once while it is 0 (graph-capturable, no host read)."""
    check_triton_device("quantisation", x2d, flag, lo, hi, score)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, n = x2d.shape
    if skip_rows is None or skip_rows.numel() == 0:
        skip_rows = torch.full((1,), -1, dtype=torch.long, device=x2d.device)
    k = skip_rows.numel()
    if INTERPRET:
        block_m, block_n, warps = min(next_pow2(m), 64), max(8, min(next_pow2(n), 256)), 4
    else:
        block_m, block_n, warps = 32, 128, 8
    col_blocks = triton.cdiv(n, block_n)
    want = 1 if INTERPRET else max(1, (4 * _sm_count(x2d.device)) // col_blocks)
    row_tiles = triton.cdiv(m, block_m)
    row_tiles_per_prog = next_pow2(triton.cdiv(row_tiles, max(1, min(want, row_tiles))))
    chunks = triton.cdiv(row_tiles, row_tiles_per_prog)
    _col_observe_kernel[(chunks, col_blocks)](
        x2d, flag, lo, hi, score, skip_rows, m, n, k, x2d.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, ROW_TILES=row_tiles_per_prog, K_PAD=next_pow2(k), **launch_opts(warps),
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------
# Tiles (BLOCK_M rows, BLOCK_N columns, warps, ROW_ITERS sub-tiles of BLOCK_M rows per program).
# On GPU each kernel is autotuned over its list, per (N, bits, granularity, dtypes, token bucket);
# the winner is kept for the process and on disk (kernels.common.launch_tuned). Why these: with 8
# elements per thread (BLOCK_M * BLOCK_N = 256 * warps) and BLOCK_N <= 128, Triton keeps the
# loads, the pack/unpack and the store in one register layout (16-byte accesses of bf16, no
# shared-memory round trip; checked on the sm_90 TTGIR), and
# ROW_ITERS > 1 reuses the per-channel parameters (8 bytes per column, which otherwise cost as
# much load traffic as the data) over more rows. Larger tiles put more bytes in flight but stage
# through shared memory; they won some sweeps (dequantise, 8-bit codes: BENCHMARKS.md), so they stay
# in the lists. benchmarks/bench_quant.py prints a sweep and the configurations the tuner picked.
QUANT_CONFIGS = [(16, 128, 8, 1), (16, 128, 8, 4), (16, 128, 8, 8), (8, 128, 4, 4),
                 (32, 64, 8, 4), (32, 256, 8, 1), (16, 256, 4, 1)]
DEQUANT_CONFIGS = [(16, 1024, 4, 1), (32, 512, 4, 1), (8, 1024, 4, 1), (32, 256, 4, 1),
                   (16, 128, 8, 4), (16, 256, 4, 2)]


def _interpret_blocks(m: int, n: int):
    # the interpreter pays per program, not per element: few, large tiles
    return min(next_pow2(m), 64), max(8, min(next_pow2(n), 256)), 4, 1


def _fixed_blocks(kernel_name: str, m: int, n: int):
    """Tiles when autotuning is off (HYCLORA_QUANT_AUTOTUNE=0): the best of the first sweep."""
    if kernel_name == "quant":
        block_n = max(8, min(next_pow2(n), 128))
        return max(1, 2048 // block_n), block_n, 8, 4
    block_n = max(8, min(next_pow2(n), 512))
    return max(1, 16384 // block_n), block_n, 4, 1


_KERNELS = {"quant": _quant_pack_kernel, "dequant": _unpack_dequant_kernel}


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    table = QUANT_CONFIGS if kernel_name == "quant" else DEQUANT_CONFIGS
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "ROW_ITERS": ri}, num_warps=w)
               for bm, bn, w, ri in table]
    return triton.autotune(configs=configs, key=["N", "BITS", "GROUP"])(_KERNELS[kernel_name])


def _launch(kernel_name: str, m: int, n: int, args: tuple, consts: dict, config) -> None:
    if config is None and not INTERPRET and AUTOTUNE:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_ITERS"]), triton.cdiv(n, meta["BLOCK_N"]))
        launch_tuned(_tuned(kernel_name), grid, args, dict(consts, enable_fp_fusion=False), tokens=m)
        return
    if config is not None:
        bm, bn, warps, ri = tuple(config) + (1,) * (4 - len(config))
        bn = max(8, bn)
    elif INTERPRET:
        bm, bn, warps, ri = _interpret_blocks(m, n)
    else:
        bm, bn, warps, ri = _fixed_blocks(kernel_name, m, n)
    grid = (triton.cdiv(m, bm * ri), triton.cdiv(n, bn))
    _KERNELS[kernel_name][grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, ROW_ITERS=ri,
                                **launch_opts(warps))


def quantize_pack(x2d: torch.Tensor, lo: torch.Tensor, inv_step: torch.Tensor, bits: int,
                  group_size: Optional[int] = None, *, config=None) -> torch.Tensor:
    """(rows, N) bf16/fp16/fp32 -> (rows, ceil(N*bits/8)) uint8 codes.

    ``config`` = (BLOCK_M, BLOCK_N columns, num_warps[, ROW_ITERS]) overrides the autotuner
    (benchmark sweeps, tests).
    """
    check_triton_device("quantisation", x2d)
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
    check_triton_device("quantisation", codes)
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
                 EMULATE_BF16_RNE=INTERPRET and dtype == torch.bfloat16), config)
    return out
