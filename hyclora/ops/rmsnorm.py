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


def rmsnorm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, rstd)``; ``rstd`` is fp32 with shape ``x.shape[:-1] + (1,)``."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + eps)
    y = weight * (xf * rstd).to(x.dtype)
    return y, rstd


def rmsnorm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    need_dx: bool = True,
    need_dweight: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`rmsnorm_forward` w.r.t. ``x`` and ``weight``.

    ``x`` may be a reconstruction of the forward input (dequantised); ``rstd`` is the exact
    statistic saved by the forward, so the scale of the gradient stays exact.
    """
    x_hat = x.to(torch.float32) * rstd
    dx = dweight = None
    if need_dx:
        # autograd multiplies dy * w in the output dtype before upcasting; do the same.
        g = (dy * weight).to(torch.float32)
        dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        dx = dx.to(x.dtype)
    if need_dweight:
        # fp32 accumulation over all tokens (autograd sums in the grad dtype).
        prod = dy.to(torch.float32) * x_hat.to(x.dtype).to(torch.float32)
        dweight = prod.reshape(-1, prod.shape[-1]).sum(0).to(weight.dtype)
    return dx, dweight


__all__ = ["rmsnorm_forward", "rmsnorm_backward"]
