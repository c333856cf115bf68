"""RMSNorm forward and its hand-written backward.

The forward reproduces transformers' Llama/Mistral RMSNorm op by op (statistics in fp32, the
normalised value cast back to the input dtype before the weight multiply) so that the block
outputs are bit-identical to the unpatched model. The backward is the correct RMSNorm
gradient, dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w; the HyC-LoRA reference
added a LayerNorm mean term here (its bug 8.1), which we do not.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def rmsnorm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, rstd)``; ``rstd`` is fp32 with shape ``x.shape[:-1] + (1,)``. Long inputs
    outside autograd run in row chunks (see ``_CHUNK_ELEMENTS``; row-wise, so the values do not
    depend on it)."""
    d = x.shape[-1]
    recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.numel() <= _CHUNK_ELEMENTS or d == 0 or recording:  # under autograd: one differentiable piece
        return _rms(x, weight, eps)
    x2 = x.reshape(-1, d)
    rstd = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    for rows in _row_chunks(x2.shape[0], d):
        y[rows], rstd[rows] = _rms(x2[rows], weight, eps)
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


def rmsnorm_from_rstd(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The forward's output rebuilt from its input ``x`` (or a reconstruction of it) and the
    exact ``rstd``, op by op as :func:`rmsnorm_forward` computes it (bit-identical for the exact
    input), in row chunks."""
    d = x.shape[-1]
    x2, r2 = x.reshape(-1, d), rstd.reshape(-1, 1)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    for rows in _row_chunks(x2.shape[0], d):
        out[rows] = weight * (x2[rows].to(torch.float32) * r2[rows]).to(x.dtype)
    return out.view(x.shape)


def rmsnorm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    need_dx: bool = True,
    need_dweight: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`rmsnorm_forward` w.r.t. ``x`` and ``weight``, in row chunks.

    ``x`` may be a reconstruction of the forward input (dequantised); ``rstd`` is the exact
    statistic saved by the forward, so the scale of the gradient stays exact.
    """
    d = x.shape[-1]
    x2, dy2, r2 = x.reshape(-1, d), dy.reshape(-1, d), rstd.reshape(-1, 1)
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dweight = torch.zeros(d, dtype=torch.float32, device=x.device) if need_dweight else None
    for rows in _row_chunks(x2.shape[0], d):
        x_hat = x2[rows].to(torch.float32) * r2[rows]
        if need_dx:
            # autograd multiplies dy * w in the output dtype before upcasting; do the same.
            g = (dy2[rows] * weight).to(torch.float32)
            dx[rows] = (r2[rows] * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)
            del g
        if need_dweight:
            # fp32 accumulation over all tokens (autograd sums in the grad dtype).
            dweight += (dy2[rows].to(torch.float32) * x_hat.to(x.dtype).to(torch.float32)).sum(0)
        del x_hat
    return (None if dx is None else dx.view(x.shape)), (None if dweight is None else dweight.to(weight.dtype))


class RMSNormFn(torch.autograd.Function):
    """A whole RMSNorm under autograd that keeps the input as it is (not the fp32 upcast
    transformers' RMSNorm saves) plus the fp32 ``rstd``, and runs forward and backward in row
    chunks: for the final norm of a checkpointed long-context step, whose fp32 upcast and five fp32
    backward temporaries (6 GiB at 7B/64k) were the step's peak."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        if weight.shape != (x.shape[-1],):
            raise ValueError(
                f"hyclora RMSNorm: weight of shape {tuple(weight.shape)} for inputs of width {x.shape[-1]}; "
                "under DeepSpeed ZeRO-3 the norm must run inside its module's forward (parameters "
                "gathered), e.g. through model(...), not on a detached weight.")
        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = rmsnorm_backward(dy, x, rstd, weight, need_dx=need_dx, need_dweight=need_dw)
        return dx, dw, None


__all__ = ["rmsnorm_forward", "rmsnorm_backward", "rmsnorm_from_rstd", "RMSNormFn"]
