"""Rotary position embedding and its backward (rotation by -theta): torch ops and a Triton kernel.

``cos``/``sin`` are the per-token tables the model computes from ``position_ids``
(shape ``(b, s, d_h)``), so packed sequences and left padding are honoured for free.

Two backends: ``"torch"`` (the default; the op-by-op expression transformers uses, and the
reference) and ``"triton"`` (one kernel pass: read x, cos, sin once, write the result), with
``"auto"`` picking Triton for CUDA tensors. The torch expression makes several full passes over
q and k (multiply, negate, concatenate, multiply, add); its concatenations alone are a visible
share of a long-context step's device time (BENCHMARKS.md).
The kernel rounds the two products to the output dtype before adding them, as torch's op-by-op
evaluation does, so both backends give the same bits (fp32 and bf16; checked under the
interpreter). Layouts the kernel does not take (odd ``d_h``, ``cos``/``sin`` other than
``(b or 1, s, d_h)``, non-float tensors) and calls that autograd must record go the torch way.
No autograd here: the attention blocks call :func:`apply_rope` / :func:`rope_backward` themselves.
"""

from __future__ import annotations

import torch

from .common import INTERPRET, cast_out, check_triton_device, launch_opts, next_pow2, resolve_backend, tl, triton

ROPE_BACKENDS = ("torch", "triton", "auto")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_transpose(g: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`rotate_half`: ``cat(g2, -g1)``."""
    half = g.shape[-1] // 2
    return torch.cat((g[..., half:], -g[..., :half]), dim=-1)


# Long inputs (more elements than this) outside autograd are rotated in chunks of tokens written
# into one token-major output: the expression's three temporaries (x*cos, the rotated half, its
# product with sin) then exist for one chunk, not for the whole (b, heads, s, d_h) tensor (at 7B
# and 600k tokens each is 4.75 GiB; they were the peak of a checkpointed layer's recompute).
_CHUNK_ELEMENTS = 1 << 24


def _token_major_out(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, s, d = x.shape
    return torch.empty(b, s, h, d, dtype=dtype, device=x.device).transpose(1, 2)


def _in_token_chunks(fn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``fn(x, cos, sin)`` (elementwise over tokens) in chunks of tokens; the result is a
    ``(b, heads, s, d_h)`` view of a ``(b, s, heads, d_h)`` tensor (``.transpose(1, 2)`` of it is
    contiguous, so a caller reshaping to ``(b, s, heads * d_h)`` copies nothing)."""
    b, h, s, d = x.shape
    out = _token_major_out(x, torch.promote_types(x.dtype, cos.dtype))
    step = max(1, _CHUNK_ELEMENTS // max(1, b * h * d))
    for t0 in range(0, s, step):
        t = slice(t0, min(s, t0 + step))
        out[:, :, t] = fn(x[:, :, t], cos[:, t], sin[:, t])
    return out


def _chunked(x: torch.Tensor, cos: torch.Tensor) -> bool:
    return x.numel() > _CHUNK_ELEMENTS and not (torch.is_grad_enabled() and x.requires_grad) and cos.dim() == 3


def _rope(x, cos, sin):
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


def _rope_backward(dy, cos, sin):
    return (dy * cos.unsqueeze(1)) + rotate_half_transpose(dy * sin.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# Triton: one pass
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rope_kernel(
        x_ptr, cos_ptr, sin_ptr, out_ptr,
        M, S, H, HALF, sxb, sxh, sxs, sxd, scb, scs,
        BACKWARD: tl.constexpr, RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # One row = one (batch, token, head): the output is (b, s, heads, d_h) contiguous, and in
        # practice so is x behind its transposed view, so consecutive rows are consecutive memory
        # on both sides (a (token block, head) grid would stride by heads * d_h between rows).
        # int64: at 600k tokens, 32 heads and d_h 128 the offsets pass 2**31.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        hi = rows % H
        tok = rows // H
        si = tok % S
        bi = tok // S
        t = tl.arange(0, BLOCK_H)
        mask = rmask[:, None] & (t < HALF)[None, :]
        xoff = (bi * sxb + hi * sxh + si * sxs)[:, None] + t[None, :] * sxd
        x1 = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + xoff + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
        # cos/sin: (b or 1, s, d_h), last dim contiguous; a batch of 1 broadcasts (scb = 0)
        coff = (bi * scb + si * scs)[:, None] + t[None, :]
        c1 = tl.load(cos_ptr + coff, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + coff + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + coff, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + coff + HALF, mask=mask, other=0.0).to(tl.float32)
        # torch evaluates op by op in the output dtype: each product is rounded before the sum
        # (and negation commutes with round-to-nearest-even, so a - b is a + (-b) bit for bit)
        p11 = cast_out(x1 * c1, out_ptr, RNE).to(tl.float32)
        p22 = cast_out(x2 * c2, out_ptr, RNE).to(tl.float32)
        if BACKWARD:
            # dy*cos + cat((dy*sin)_2, -(dy*sin)_1)
            o1 = p11 + cast_out(x2 * s2, out_ptr, RNE).to(tl.float32)
            o2 = p22 - cast_out(x1 * s1, out_ptr, RNE).to(tl.float32)
        else:
            # x*cos + cat(-x2, x1)*sin
            o1 = p11 - cast_out(x2 * s1, out_ptr, RNE).to(tl.float32)
            o2 = p22 + cast_out(x1 * s2, out_ptr, RNE).to(tl.float32)
        ooff = rows[:, None] * (2 * HALF) + t[None, :]
        tl.store(out_ptr + ooff, cast_out(o1, out_ptr, RNE), mask=mask)
        tl.store(out_ptr + ooff + HALF, cast_out(o2, out_ptr, RNE), mask=mask)


def _blocks(m: int, half: int):
    block_h = max(16, next_pow2(half))
    if INTERPRET:  # the interpreter pays per program (~5 ms): few, large ones
        return max(1, min(next_pow2(m), 16384 // block_h)), block_h
    # 8 values per thread per half-tile at 4 warps, as rope_rebuild: about 48 fp32 values live per
    # thread (x, cos, sin, results). Not tuned on a GPU yet.
    return max(1, (4 * 32 * 8) // block_h), block_h


def _triton_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if x.dim() != 4 or x.shape[-1] % 2 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    b, _, s, d = x.shape
    if cos.shape[0] not in (1, b) or cos.shape[1:] != (s, d):
        return False
    if not (x.is_floating_point() and cos.is_floating_point() and sin.dtype == cos.dtype):
        return False
    if x.dtype == torch.float64 or cos.dtype == torch.float64:
        return False  # the kernel computes in fp32
    # the kernel is not differentiable: a call autograd must record keeps the torch ops
    return not (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad))


def _rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    check_triton_device("RoPE", x, cos, sin)
    b, h, s, d = x.shape
    dtype = torch.promote_types(x.dtype, cos.dtype)
    out = _token_major_out(x, dtype)
    m = b * s * h
    if m == 0 or d == 0:
        return out
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    block_m, block_h = _blocks(m, d // 2)
    _rope_kernel[(triton.cdiv(m, block_m),)](
        x, cos, sin, out, m, s, h, d // 2, *x.stride(),
        cos.stride(0) if cos.shape[0] == b and b > 1 else 0, cos.stride(1),
        BACKWARD=backward, RNE=INTERPRET and dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_H=block_h,
        **launch_opts(4))
    return out


def _use_triton(backend: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if backend not in ROPE_BACKENDS:
        raise ValueError(f"hyclora RoPE: backend={backend!r} is invalid; use one of {ROPE_BACKENDS}.")
    if backend == "torch":
        return False
    return resolve_backend(backend, x.device) == "triton" and _triton_takes(x, cos, sin)


def _rotary_part(x: torch.Tensor, cos: torch.Tensor):
    """``None`` when the tables cover all of ``x``'s last dim, else the rotated width: partial
    rotary (Phi-3 / Phi-4-mini's ``partial_rotary_factor``: tables of ``rot < d_h`` channels rotate
    the first ``rot`` channels of every head and pass the rest through, as transformers does)."""
    rot, d = cos.shape[-1], x.shape[-1]
    if rot == d:
        return None
    if rot > d or rot % 2:
        raise ValueError(f"hyclora: RoPE tables of width {rot} for heads of width {d}; expected an even width "
                         f"of at most {d} (partial rotary rotates the first channels of each head).")
    return rot


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """``x``: ``(b, heads, s, d_h)``; ``cos``/``sin``: ``(b, s, d_h)``, or ``(b, s, rot)`` with
    ``rot < d_h`` (partial rotary: the first ``rot`` channels rotated, the rest passed through).
    Same ops as transformers (long inputs outside autograd in chunks of tokens: the same values).

    ``backend``: ``"torch"``, ``"triton"`` (one kernel; the same bits) or ``"auto"`` (Triton on
    CUDA). The Triton result, like the chunked one, is a ``(b, heads, s, d_h)`` view of a
    contiguous ``(b, s, heads, d_h)`` tensor; layouts it does not take run the torch ops."""
    rot = _rotary_part(x, cos)
    if rot is not None:
        return torch.cat((apply_rope(x[..., :rot], cos, sin, backend), x[..., rot:]), dim=-1)
    if _use_triton(backend, x, cos, sin):
        return _rope_triton(x, cos, sin, backward=False)
    return _in_token_chunks(_rope, x, cos, sin) if _chunked(x, cos) else _rope(x, cos, sin)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Gradient of :func:`apply_rope` w.r.t. its input: the inverse rotation applied to ``dy``
    (partial rotary: to its first ``rot`` channels, the rest as is; ``backend`` as for
    :func:`apply_rope`)."""
    rot = _rotary_part(dy, cos)
    if rot is not None:
        return torch.cat((rope_backward(dy[..., :rot], cos, sin, backend), dy[..., rot:]), dim=-1)
    if _use_triton(backend, dy, cos, sin):
        return _rope_triton(dy, cos, sin, backward=True)
    return _in_token_chunks(_rope_backward, dy, cos, sin) if _chunked(dy, cos) else _rope_backward(dy, cos, sin)


__all__ = ["apply_rope", "rope_backward", "rotate_half", "rotate_half_transpose", "ROPE_BACKENDS"]
