"""The LoRA term added to a linear's base output in one pass: ``y = y_w + s * (xa @ B^T)``.

Why a kernel: PEFT keeps the adapters in fp32 on a bf16/fp16 base by default
(``autocast_adapter_dtype``), so the op-by-op LoRA term of each linear is an fp32
``(tokens, out)`` product, an fp32 sum with ``y_w`` and a cast back: about 20 bytes of memory
traffic per output element, where reading ``y_w`` and writing ``y`` take 4. cuBLAS's ``addmm``
cannot take fp32 operands with a bf16 ``C``, so ``intra_inter_full_fuse`` used to run these
linears op by op (the benchmarks' models all have fp32 adapters). The kernel reads ``y_w``, the
rank-``r`` factors ``xa`` ``(tokens, r)`` and ``B`` ``(out, r)``, forms the product in fp32 with
IEEE products (no TF32), scales it, adds ``y_w`` in fp32 and rounds once to ``y_w``'s dtype:
the op-by-op result's operations (``xa @ B^T`` in fp32, ``* s``, ``+ y_w``, one rounding) up to
the summation order of the rank-``r`` dot. No fp32 ``(tokens, out)`` temporary exists.

:func:`lora_epilogue_torch` is the reference (the op-by-op expression). The Triton path takes
2-D-able contiguous ``y_w`` of a 16/32-bit float dtype with float factors, outside autograd
recording; anything else goes the torch way. Not timed on a GPU yet (BENCHMARKS.md run 7).
"""

from __future__ import annotations

import torch

from hyclora.quant.core import resolve_backend

from . import fused_swiglu as _fs
from .lora import lora_term_added as lora_epilogue_torch  # the reference: PEFT's op-by-op expression

triton = _fs.triton
if triton is not None:
    import triton.language as tl

    _cast_out = _fs._cast_out

_INTERPRET = _fs._INTERPRET
EPILOGUE_BACKENDS = ("torch", "triton", "auto")


if triton is not None:

    @triton.jit
    def _lora_epilogue_kernel(
        yw_ptr, xa_ptr, b_ptr, y_ptr,
        M, N, R, stride_ym, stride_xm, stride_xr, stride_bn, stride_br, stride_om, scale,
        SCALE_ONE: tl.constexpr, RNE: tl.constexpr, R_CHUNKS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for chunk in tl.static_range(R_CHUNKS):  # the rank in BLOCK_R slices (a few at most)
            rr = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_r = rr < R
            xa = tl.load(xa_ptr + rm[:, None] * stride_xm + rr[None, :] * stride_xr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(xa, bt, input_precision="ieee")
        mask = mask_m[:, None] & mask_n[None, :]
        yw = tl.load(yw_ptr + rm[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        if not SCALE_ONE:
            acc = acc * scale  # rounded before the add (no FMA contraction), as the torch ops
        y = yw + acc
        tl.store(y_ptr + rm[:, None] * stride_om + rn[None, :], _cast_out(y, y_ptr, RNE), mask=mask)


def _blocks(m: int, n: int, r: int, interpret: bool = _INTERPRET):
    """``(BLOCK_M, BLOCK_N, BLOCK_R, num_warps)``."""
    if interpret:  # the interpreter pays per program (~5 ms): few, large ones
        return (max(16, min(_fs._next_pow2(m), 128)), max(16, min(_fs._next_pow2(n), 256)),
                max(16, min(_fs._next_pow2(r), 32)), 4)
    # a memory-bound pass (4 bytes per element at 16 bits) with an fp32 FMA dot of depth r. The
    # 64 x 128 tile at 8 warps with the rank in slices of 16 compiles for sm_90 without spills up
    # to r = 128 (255 registers; 4 warps or slices of 32 spill: tests/ops/test_lora_epilogue.py).
    # Not timed on a GPU yet.
    return 64, 128, 16, 8


def _triton_takes(y_w: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor) -> bool:
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


def _lora_epilogue_triton(y_w: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    _fs._check_triton_device(y_w, xa, lora_b)
    n, r = y_w.shape[-1], xa.shape[-1]
    yw2 = y_w.view(-1, n)
    xa2 = xa.reshape(-1, r)  # any strides, as lora_b's (the backward passes A^T as a view)
    m = yw2.shape[0]
    out = torch.empty_like(yw2)
    if m == 0 or n == 0:
        return out.view(y_w.shape)
    if r == 0:
        out.copy_(yw2)
        return out.view(y_w.shape)
    block_m, block_n, block_r, warps = _blocks(m, n, r)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _lora_epilogue_kernel[grid](
        yw2, xa2, lora_b, out, m, n, r, yw2.stride(0), *xa2.stride(), *lora_b.stride(), out.stride(0),
        float(scaling), SCALE_ONE=scaling == 1.0, RNE=_INTERPRET and out.dtype == torch.bfloat16,
        R_CHUNKS=triton.cdiv(r, block_r),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        **({} if _INTERPRET else dict(num_warps=warps, enable_fp_fusion=False)))
    return out.view(y_w.shape)


def lora_epilogue(y_w: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  backend: str = "torch") -> torch.Tensor:
    """``y_w + scaling * (xa @ lora_b^T)`` in ``y_w``'s dtype: ``y_w`` ``(..., out)``, ``xa``
    ``(..., r)``, ``lora_b`` ``(out, r)``. ``backend``: ``"torch"`` (:func:`lora_epilogue_torch`),
    ``"triton"`` (one pass, see the module docstring) or ``"auto"`` (Triton for CUDA tensors);
    inputs the kernel does not take run the torch ops."""
    if backend not in EPILOGUE_BACKENDS:
        raise ValueError(f"hyclora LoRA epilogue: backend={backend!r} is invalid; use one of {EPILOGUE_BACKENDS}.")
    if (backend != "torch" and triton is not None and resolve_backend(backend, y_w.device) == "triton"
            and _triton_takes(y_w, xa, lora_b)):
        return _lora_epilogue_triton(y_w, xa, lora_b, scaling)
    return lora_epilogue_torch(y_w, xa, lora_b, scaling)


__all__ = ["lora_epilogue", "lora_epilogue_torch", "EPILOGUE_BACKENDS"]
