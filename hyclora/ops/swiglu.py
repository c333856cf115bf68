"""SwiGLU element-wise part: ``D = SiLU(G) * U`` and its exact backward."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def silu_mul_forward(g: torch.Tensor, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(S, D)`` with ``S = SiLU(g)`` and ``D = S * u`` (same ops as transformers)."""
    s = F.silu(g)
    return s, s * u


def silu_grad(g: torch.Tensor) -> torch.Tensor:
    """SiLU'(g) = sigma(g) * (1 + g * (1 - sigma(g))), in fp32."""
    gf = g.to(torch.float32)
    sig = torch.sigmoid(gf)
    return sig * (1.0 + gf * (1.0 - sig))


def silu_mul_backward(
    dd: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    s: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dG, dU)`` of ``D = SiLU(g) * u`` given ``dD``.

    ``s`` (``SiLU(g)``) may be passed when it was stored instead of recomputed (``intra``);
    otherwise it is recomputed from ``g``.
    """
    if s is None:
        s = F.silu(g)
    du = dd * s
    ds = dd * u
    # autograd's silu backward computes in fp32 (opmath) from the rounded dS; so do we.
    dg = (ds.to(torch.float32) * silu_grad(g)).to(g.dtype)
    return dg, du


__all__ = ["silu_mul_forward", "silu_mul_backward", "silu_grad"]
