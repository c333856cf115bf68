"""LoRA's rank-r products for PEFT's fp32 adapters on a 16-bit base, one pass each.

PEFT keeps the adapters in fp32 on a bf16/fp16 base by default (``autocast_adapter_dtype``;
every model in the benchmarks has them). cuBLAS takes one dtype for both GEMM operands, so op by
op each LoRA linear casts its whole 16-bit input to fp32 before ``x A^T`` (6 bytes per input
element written and read back), and its output is an fp32 ``(tokens, out)`` product, an fp32 sum
with ``y_w`` and a cast back (about 20 bytes per output element where reading ``y_w`` and writing
``y`` take 4); ``intra_inter_full_fuse``'s one-dtype ``addmm`` epilogue did not apply. The two
kernels here read the 16-bit tensors as they are and form the rank-``r`` products in fp32 with
IEEE products (no TF32):

* :func:`lora_epilogue`: ``y = y_w + s * (xa @ B^T)`` (also the LoRA part of an input gradient,
  ``dx + dxa @ A``), the product scaled, added to ``y_w`` in fp32, rounded once to ``y_w``'s dtype:
  the op-by-op operations up to the summation order of the rank-``r`` dot;
* :func:`lora_down`: ``xa = x @ A^T`` in fp32 from a 16-bit ``x``: the op-by-op
  ``F.linear(x.to(fp32), A)`` up to the summation order; :func:`token_reduced_product` (``x^T y``
  over the tokens, the weight gradients) likewise. For a bf16 ``x`` both run on bf16 tensor cores
  with the fp32 factor split into three bf16 parts (exact products, fp32 sums: ``_bf16x3_dot``);
  fp16 inputs take fp32 FMA dots (their split parts could underflow fp16's range).

The torch references are the op-by-op expressions. The Triton paths take what is described per
function, outside autograd recording, and only where launching pays (``min_tokens``, and CUDA
graph capture); anything else goes the torch way.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import INTERPRET, cast_out, check_triton_device, next_pow2, resolve_backend, tl, triton


def _triton(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` (``"torch"``, ``"triton"``, ``"auto"``; others raise naming them) runs
    the Triton kernels for tensors on ``device``."""
    return resolve_backend(backend, device) == "triton" and triton is not None


if triton is not None:

    @triton.jit
    def _fp32_product(acc, a_ptr, b_ptr, rows, cols, mask_rows, mask_cols, stride_a_row, stride_a_k,
                      stride_b_col, stride_b_k, K, ITERS: tl.constexpr, BLOCK_K: tl.constexpr):
        """``acc + a[rows, :K] @ b[cols, :K]^T`` in fp32 (IEEE products), ``K`` in ``ITERS``
        slices of ``BLOCK_K`` (a loop; the count is a constexpr: one compile per width)."""
        for it in range(ITERS):
            rk = (it * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = rk < K
            a = tl.load(a_ptr + rows[:, None] * stride_a_row + rk[None, :] * stride_a_k,
                        mask=mask_rows[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            bt = tl.load(b_ptr + cols[None, :] * stride_b_col + rk[:, None] * stride_b_k,
                         mask=mask_k[:, None] & mask_cols[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(a, bt, input_precision="ieee")
        return acc

    @triton.jit
    def _bf16x3_dot(acc, a, b, UPCAST: tl.constexpr):
        """``acc + a @ b`` for a bf16 ``a`` and an fp32 ``b`` on bf16 tensor cores: ``b`` is split
        into three bf16 parts (``hi + mid + lo``: 24 significant bits, all of fp32's), each product
        with the exact bf16 ``a`` is exact in fp32 and accumulates in fp32, so the result is the
        fp32 product up to summation order. ``UPCAST``: the same parts dotted in fp32 (the Triton
        interpreter's bf16 dot is wrong)."""
        hi = b.to(tl.bfloat16)
        rest = b - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        if UPCAST:
            a32 = a.to(tl.float32)
            acc = tl.dot(a32, lo.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(a32, mid.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(a32, hi.to(tl.float32), acc, input_precision="ieee")
        else:  # the small parts first
            acc = tl.dot(a, lo, acc)
            acc = tl.dot(a, mid, acc)
            acc = tl.dot(a, hi, acc)
        return acc

    @triton.jit
    def _rank_product_kernel(
        a_ptr, b_ptr, out_ptr,
        ROWS, COLS, K, stride_a_row, stride_a_k, stride_b_col, stride_b_k, stride_o_split, stride_o_row,
        ITERS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_COLS: tl.constexpr,
        SPLIT_BF16: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # out[s, i, j] = sum over the s-th slice of ITERS * BLOCK_K of a[i, k] b[j, k] (fp32) for a
        # 16-bit a and an fp32 b: the down-projection (rows = tokens, k = features) and the
        # token-reduced weight gradients (rows = features, k = tokens); partial sums per slice.
        # SPLIT_BF16 (a is bf16): tensor-core dots of the split b (_bf16x3_dot); else fp32 FMA dots
        # int64 offsets: at 600k tokens x 11008 features they pass 2**31
        rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        split = tl.program_id(2)
        k0 = split.to(tl.int64) * (ITERS * BLOCK_K)
        mask_rows = rows < ROWS
        mask_cols = cols < COLS
        acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for it in range(ITERS):
            rk = k0 + (it * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = rk < K
            a = tl.load(a_ptr + rows[:, None] * stride_a_row + rk[None, :] * stride_a_k,
                        mask=mask_rows[:, None] & mask_k[None, :], other=0.0)
            bt = tl.load(b_ptr + cols[None, :] * stride_b_col + rk[:, None] * stride_b_k,
                         mask=mask_k[:, None] & mask_cols[None, :], other=0.0).to(tl.float32)
            if SPLIT_BF16:
                acc = _bf16x3_dot(acc, a, bt, UPCAST)
            else:
                acc += tl.dot(a.to(tl.float32), bt, input_precision="ieee")
        tl.store(out_ptr + split * stride_o_split + rows[:, None] * stride_o_row + cols[None, :], acc,
                 mask=mask_rows[:, None] & mask_cols[None, :])

    @triton.jit
    def _lora_epilogue_kernel(
        yw_ptr, xa_ptr, b_ptr, y_ptr,
        M, N, R, stride_ym, stride_xm, stride_xr, stride_bn, stride_br, stride_om, scale,
        SCALE_ONE: tl.constexpr, RNE: tl.constexpr, R_CHUNKS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: see above
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        acc = _fp32_product(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), xa_ptr, b_ptr, rm, rn, mask_m, mask_n,
                            stride_xm, stride_xr, stride_bn, stride_br, R, R_CHUNKS, BLOCK_R)
        mask = mask_m[:, None] & mask_n[None, :]
        yw = tl.load(yw_ptr + rm[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        if not SCALE_ONE:
            acc = acc * scale  # rounded before the add (no FMA contraction), as the torch ops
        y = yw + acc
        tl.store(y_ptr + rm[:, None] * stride_om + rn[None, :], cast_out(y, y_ptr, RNE), mask=mask)


def _blocks(m: int, n: int, r: int, interpret: bool = INTERPRET):
    """``(BLOCK_M, BLOCK_N, BLOCK_R, num_warps)``."""
    if interpret:  # the interpreter pays per program (~5 ms): few, large ones
        return (max(16, min(next_pow2(m), 128)), max(16, min(next_pow2(n), 256)),
                max(16, min(next_pow2(r), 32)), 4)
    # a memory-bound pass (4 bytes per element at 16 bits) with an fp32 FMA dot of depth r. The
    # 64 x 128 tile at 8 warps with the rank in slices of 16 compiles for sm_90 without spills up
    # to r = 128 (tests/ops/test_lora_kernels.py compiles it ahead of time); not swept
    return 64, 128, 16, 8


def _epilogue_takes(y_w: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor) -> bool:
    if y_w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not (xa.is_floating_point() and lora_b.is_floating_point()) or torch.float64 in (xa.dtype, lora_b.dtype):
        return False
    if y_w.dim() < 1 or xa.shape[:-1] != y_w.shape[:-1] or lora_b.dim() != 2 or lora_b.shape != (y_w.shape[-1], xa.shape[-1]):
        return False
    if not y_w.is_contiguous() or y_w.device != xa.device or y_w.device != lora_b.device:
        return False
    # not differentiable: a call autograd must record keeps the torch ops
    return not (torch.is_grad_enabled() and (y_w.requires_grad or xa.requires_grad or lora_b.requires_grad))


def _lora_epilogue_triton(y_w: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                          in_place: bool = False) -> torch.Tensor:
    check_triton_device("LoRA kernels", y_w, xa, lora_b)
    n, r = y_w.shape[-1], xa.shape[-1]
    yw2 = y_w.view(-1, n)
    xa2 = xa.reshape(-1, r)  # any strides, as lora_b's (the backward passes A^T as a view)
    m = yw2.shape[0]
    # in place: each program reads its y_w tile before it writes the same tile
    out = yw2 if in_place else torch.empty_like(yw2)
    if m == 0 or n == 0:
        return out.view(y_w.shape)
    if r == 0:
        if not in_place:
            out.copy_(yw2)
        return out.view(y_w.shape)
    block_m, block_n, block_r, warps = _blocks(m, n, r)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _lora_epilogue_kernel[grid](
        yw2, xa2, lora_b, out, m, n, r, yw2.stride(0), *xa2.stride(), *lora_b.stride(), out.stride(0),
        float(scaling), SCALE_ONE=scaling == 1.0, RNE=INTERPRET and out.dtype == torch.bfloat16,
        R_CHUNKS=triton.cdiv(r, block_r),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        **({} if INTERPRET else dict(num_warps=warps, enable_fp_fusion=False)))
    return out.view(y_w.shape)


# -- when to launch ------------------------------------------------------------------------------
# A Triton launch costs tens of microseconds of host time, a cast or a cuBLAS GEMM a few, and
# eager hyclora steps are host-bound: by default the kernels run only under CUDA graph capture,
# whose replays launch nothing from the host (``min_tokens=None``); ``min_tokens=n`` also launches
# them eagerly from n tokens per call.
def _worth_launching(tokens: int, device: torch.device, min_tokens: Optional[int]) -> bool:
    if INTERPRET or (min_tokens is not None and tokens >= min_tokens):
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def kernels_run(backend: str, x: torch.Tensor, min_tokens: Optional[int] = None) -> bool:
    """Whether the Triton kernels here run for ``x`` (``(..., features)``): the backend resolves
    to Triton on its device and launching pays at its token count (``min_tokens``)."""
    # the launch test first: by default it says no eagerly, and it is the cheaper one (host time)
    return _worth_launching(x.numel() // max(1, x.shape[-1]), x.device, min_tokens) and _triton(backend, x.device)


# -- the rank-r products -----------------------------------------------------------------------------
def _down_tiles(m: int, k: int, r: int, interpret: bool = INTERPRET):
    """``(BLOCK_M, BLOCK_K, BLOCK_R, num_warps, k_per_slice)`` of the down-projection."""
    block_r = max(16, min(next_pow2(r), 32))
    if interpret:  # the interpreter pays per program (~5 ms): few, large ones
        bk = max(16, min(next_pow2(k), 512))
        return max(16, min(next_pow2(m), 128)), bk, block_r, 4, triton.cdiv(k, bk) * bk
    # bf16 tensor cores (the split fp32 factor, 3 dots), the features in slices of 1024 (fp32
    # partial sums added by torch): enough programs at a few thousand tokens; the sweep that chose
    # it is `bench_fused --only lora --sweep` (BENCHMARKS.md, run 8)
    return 64, 64, block_r, 4, 1024


def _reduce_tiles(t: int, n: int, r: int, interpret: bool = INTERPRET):
    """``(BLOCK_N, BLOCK_T, BLOCK_R, num_warps, tokens_per_slice)`` of the token-reduced product."""
    block_r = max(16, min(next_pow2(r), 32))
    if interpret:
        return max(16, min(next_pow2(n), 256)), 64, block_r, 4, max(64, min(next_pow2(t), 1024))
    # slices of tokens per program (fp32 partial sums added by torch): about 4 programs per SM of
    # an H100/H200 (132) over the feature tiles and the slices; a power of two (a constexpr)
    slices = max(1, 528 // triton.cdiv(n, 64))
    per_slice = max(256, min(65536, next_pow2(triton.cdiv(t, slices))))
    return 64, 64, block_r, 4, per_slice


def _rank_product(a2, a_strides, b, b_strides, rows, cols, k, tiles, out_dtype=torch.float32):
    """``sum_k a[i, k] b[j, k]`` (``rows x cols``, fp32) by :func:`_rank_product_kernel` with
    ``tiles = (BLOCK_ROWS, BLOCK_K, BLOCK_COLS, num_warps, k_per_slice)``; ``a`` 16-bit, ``b``
    fp32 (any strides given as ``(row/col, k)``)."""
    block_rows, block_k, block_cols, warps, per_slice = tiles
    per_slice = max(block_k, per_slice - per_slice % block_k)
    slices = triton.cdiv(k, per_slice)
    out = torch.empty(slices, rows, cols, dtype=torch.float32, device=a2.device)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols), slices)
    _rank_product_kernel[grid](a2, b, out, rows, cols, k, *a_strides, *b_strides, rows * cols, cols,
                               ITERS=per_slice // block_k, BLOCK_ROWS=block_rows, BLOCK_K=block_k,
                               BLOCK_COLS=block_cols, SPLIT_BF16=a2.dtype == torch.bfloat16, UPCAST=INTERPRET,
                               **({} if INTERPRET else dict(num_warps=warps)))
    return out[0] if slices == 1 else out.sum(0)


def _down_takes(x: torch.Tensor, lora_a: torch.Tensor) -> bool:
    if x.dtype not in (torch.float16, torch.bfloat16) or lora_a.dtype != torch.float32:
        return False  # one dtype: cuBLAS's own GEMM needs no cast
    if lora_a.dim() != 2 or x.dim() < 1 or x.shape[-1] != lora_a.shape[1] or x.device != lora_a.device:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad))


def lora_down_torch(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``F.linear(x.to(A's dtype), A)``: the op-by-op reference."""
    return torch.nn.functional.linear(x if x.dtype == lora_a.dtype else x.to(lora_a.dtype), lora_a)


def lora_down(x: torch.Tensor, lora_a: torch.Tensor, backend: str = "torch", *, min_tokens: Optional[int] = None,
              tiles=None) -> torch.Tensor:
    """``xa = x @ A^T`` in ``A``'s dtype for ``x`` ``(..., in)`` and ``A`` ``(r, in)``.
    ``backend`` as for :func:`lora_epilogue`; the Triton path takes a 16-bit ``x`` with fp32 ``A``
    (it reads ``x`` once, 2 bytes per element, instead of casting it). ``tiles`` overrides the
    tile choice (benchmark sweeps)."""
    tokens = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    if not (_triton(backend, x.device) and _down_takes(x, lora_a) and _worth_launching(tokens, x.device, min_tokens)):
        return lora_down_torch(x, lora_a)
    check_triton_device("LoRA kernels", x, lora_a)
    k, r = x.shape[-1], lora_a.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or r == 0 or k == 0:
        return torch.zeros(*x.shape[:-1], r, dtype=torch.float32, device=x.device)
    # A is read as the (k, r) factor through its strides (the backward passes B^T as a view)
    out = _rank_product(x2, (x2.stride(0), 1), lora_a, lora_a.stride(), m, r, k,
                        tiles or _down_tiles(m, k, r))
    return out.view(*x.shape[:-1], r)


def token_reduced_product_torch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x^T y`` over all tokens in fp32: ``x`` ``(..., N)``, ``y`` ``(..., r)`` -> ``(N, r)``."""
    return x.reshape(-1, x.shape[-1]).float().t().mm(y.reshape(-1, y.shape[-1]).float())


def token_reduced_product(x: torch.Tensor, y: torch.Tensor, backend: str = "torch", *,
                          min_tokens: Optional[int] = None, tiles=None) -> torch.Tensor:
    """``x^T y`` summed over all tokens, in fp32, for a 16-bit ``x`` ``(..., N)`` and an fp32 ``y``
    ``(..., r)``: the LoRA weight gradients ``dB = dy^T (x A^T)`` and ``dA^T = x^T (dy B)`` without
    an fp32 copy of ``x``. The Triton path reads ``x`` once (slices of tokens per program, fp32
    partial sums added by torch); else the torch reference (an fp32 copy, one matmul)."""
    if (not _triton(backend, x.device) or x.dtype not in (torch.float16, torch.bfloat16) or y.dtype != torch.float32
            or x.shape[:-1] != y.shape[:-1] or x.device != y.device
            or (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
            or not _worth_launching(y.numel() // max(1, y.shape[-1]), x.device, min_tokens)):
        return token_reduced_product_torch(x, y)
    check_triton_device("LoRA kernels", x, y)
    n, r = x.shape[-1], y.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y2 = y.reshape(-1, r)
    t = x2.shape[0]
    if t == 0 or n == 0 or r == 0:
        return torch.zeros(n, r, dtype=torch.float32, device=x.device)
    # rows = features (stride 1 in x), k = tokens; y read as the (r, tokens) factor
    return _rank_product(x2, (1, x2.stride(0)), y2, (y2.stride(1), y2.stride(0)), n, r, t,
                         tiles or _reduce_tiles(t, n, r))


def cast_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without the dispatcher round trip of ``t.to`` when it already is (host
    time: these casts run several times per LoRA linear and pass)."""
    return t if t.dtype == dtype else t.to(dtype)


def scaled(t: torch.Tensor, scaling: float) -> torch.Tensor:
    """``t * scaling``, skipping the bit-exact ``* 1.0`` (one full-size kernel per linear)."""
    return t if scaling == 1.0 else t * scaling


def lora_epilogue_torch(y_w: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``y_w + scaling * (xa @ lora_b^T)`` op by op, the sum in the promoted dtype, cast to
    ``y_w``'s dtype: PEFT's expression, the reference of :func:`lora_epilogue`."""
    return cast_to(y_w + scaled(torch.nn.functional.linear(xa, lora_b), scaling), y_w.dtype)


def lora_epilogue(y_w: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  backend: str = "torch", *, min_tokens: Optional[int] = None, in_place: bool = False) -> torch.Tensor:
    """``y_w + scaling * (xa @ lora_b^T)`` in ``y_w``'s dtype: ``y_w`` ``(..., out)``, ``xa``
    ``(..., r)``, ``lora_b`` ``(out, r)``. ``backend``: ``"torch"`` (:func:`lora_epilogue_torch`),
    ``"triton"`` (one pass, see the module docstring) or ``"auto"`` (Triton for CUDA tensors);
    inputs the kernel does not take run the torch ops. ``in_place``: the caller owns ``y_w`` and
    lets the kernel write the result over it (no output allocation; the torch path still
    allocates)."""
    if (_triton(backend, y_w.device) and _epilogue_takes(y_w, xa, lora_b)
            and _worth_launching(y_w.numel() // max(1, y_w.shape[-1]), y_w.device, min_tokens)):
        return _lora_epilogue_triton(y_w, xa, lora_b, scaling, in_place)
    return lora_epilogue_torch(y_w, xa, lora_b, scaling)


__all__ = ["cast_to", "scaled", "kernels_run", "lora_epilogue", "lora_epilogue_torch", "lora_down",
           "lora_down_torch", "token_reduced_product", "token_reduced_product_torch"]
