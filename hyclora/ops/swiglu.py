"""The element-wise part of a gated MLP: ``D = act(G) * U`` and its exact backward, op by op
as transformers computes it. ``act``: SiLU (Llama's SwiGLU, ``hidden_act`` ``"silu"`` /
``"swish"``), exact GELU (``"gelu"``) or tanh-GELU (Gemma's GeGLU, ``"gelu_pytorch_tanh"``),
the activations transformers runs through ``F.silu`` / ``F.gelu``: forward outputs are
bit-identical, and the backward is autograd's (``gelu_backward`` / SiLU' in fp32 from the rounded
``dS``), so gradients equal HF's to rounding."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# transformers activation name -> F.gelu's ``approximate`` (None: SiLU)
_GATED_ACTIVATIONS = {"silu": None, "swish": None, "gelu": "none", "gelu_pytorch_tanh": "tanh"}
GATED_ACTIVATIONS = tuple(_GATED_ACTIVATIONS)


def _gelu_mode(act: str) -> Optional[str]:
    try:
        return _GATED_ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"hyclora: the gated MLP activation {act!r} is not implemented; supported: "
                         f"{', '.join(GATED_ACTIVATIONS)}") from None


def gated_act(g: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(g)`` as transformers computes it (``F.silu`` / ``F.gelu``)."""
    mode = _gelu_mode(act)
    return F.silu(g) if mode is None else F.gelu(g, approximate=mode)


def silu_mul_forward(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(S, D)`` with ``S = act(g)`` (SiLU by default) and ``D = S * u`` (same ops as
    transformers)."""
    s = gated_act(g, act)
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
    act: str = "silu",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dG, dU)`` of ``D = act(g) * u`` (SiLU by default) given ``dD``.

    ``s`` (``act(g)``) may be passed when it was stored instead of recomputed (``intra``);
    otherwise it is recomputed from ``g``. Computed in chunks of rows, so the fp32 temporaries
    are chunk-sized. ``inplace=True`` writes ``dU`` into ``dd`` and ``dG`` into ``g`` (for
    callers that own those buffers and need them no more: two fewer ``(tokens, d_ff)`` tensors);
    ``u`` and ``s`` are only read. Results are bit-identical either way.
    """
    mode = _gelu_mode(act)
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
        s_c = gated_act(g_c, act) if s2 is None else s2[a:b]
        ds = dd2[a:b] * u2[a:b]
        if mode is None:
            # autograd's silu backward computes in fp32 (opmath) from the rounded dS; so do we.
            dg_c = (ds.to(torch.float32) * silu_grad(g_c)).to(g.dtype)
        else:  # autograd's own GELU backward op
            dg_c = torch.ops.aten.gelu_backward(ds.to(g_c.dtype), g_c, approximate=mode)
        du[a:b] = dd2[a:b] * s_c  # after dS: in place, this overwrites these rows of dd
        dg[a:b] = dg_c
        del s_c, ds, dg_c
    return dg.view(g.shape), du.view(dd.shape)


__all__ = ["silu_mul_forward", "silu_mul_backward", "silu_grad", "gated_act", "GATED_ACTIVATIONS"]
