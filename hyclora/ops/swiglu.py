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


# Rows per chunk of the backward's element-wise work: its fp32 temporaries (SiLU'(g), the
# upcast dS) exist for one chunk of about 2**22 elements (16 MiB in fp32) at a time instead of
# for the whole (tokens, d_ff) tensor. Llama-2-7B at 32k tokens: 5 fp32 + 6 bf16 (s, d_ff)
# temporaries = 10.7 GiB unchunked, the largest transient of a training step under gradient
# checkpointing. Element-wise results do not depend on the chunking (bit-identical).
_CHUNK_ELEMENTS = 1 << 22


def silu_mul_backward(
    dd: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    s: Optional[torch.Tensor] = None,
    *,
    inplace: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dG, dU)`` of ``D = SiLU(g) * u`` given ``dD``.

    ``s`` (``SiLU(g)``) may be passed when it was stored instead of recomputed (``intra``);
    otherwise it is recomputed from ``g``. Computed in chunks of rows, so the fp32 temporaries
    are chunk-sized. ``inplace=True`` writes ``dU`` into ``dd`` and ``dG`` into ``g`` (for
    callers that own those buffers and need them no more: two fewer ``(tokens, d_ff)`` tensors);
    ``u`` and ``s`` are only read. Results are bit-identical either way.
    """
    du_dtype = torch.promote_types(dd.dtype, (g if s is None else s).dtype)
    if g.numel() == 0:
        return torch.empty_like(g), torch.empty(dd.shape, dtype=du_dtype, device=dd.device)
    f = g.shape[-1]
    g2, u2, dd2 = g.reshape(-1, f), u.reshape(-1, f), dd.reshape(-1, f)
    s2 = None if s is None else s.reshape(-1, f)
    # in place only into contiguous buffers of the result's dtype (reshape then returns views)
    du = dd2 if inplace and dd.is_contiguous() and du_dtype == dd.dtype else torch.empty(
        dd2.shape, dtype=du_dtype, device=dd.device)
    dg = g2 if inplace and g.is_contiguous() else torch.empty_like(g2)
    rows = max(1, _CHUNK_ELEMENTS // f)
    for a in range(0, g2.shape[0], rows):
        b = min(g2.shape[0], a + rows)
        g_c = g2[a:b]
        s_c = F.silu(g_c) if s2 is None else s2[a:b]
        ds = dd2[a:b] * u2[a:b]
        # autograd's silu backward computes in fp32 (opmath) from the rounded dS; so do we.
        dg_c = (ds.to(torch.float32) * silu_grad(g_c)).to(g.dtype)
        du[a:b] = dd2[a:b] * s_c  # after dS: in place, this overwrites these rows of dd
        dg[a:b] = dg_c
        del s_c, ds, dg_c
    return dg.view(g.shape), du.view(dd.shape)


__all__ = ["silu_mul_forward", "silu_mul_backward", "silu_grad"]
