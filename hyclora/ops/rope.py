"""Rotary position embedding and its backward (rotation by -theta).

``cos``/``sin`` are the per-token tables the model computes from ``position_ids``
(shape ``(b, s, d_h)``), so packed sequences and left padding are honoured for free.
"""

from __future__ import annotations

import torch


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


def _in_token_chunks(fn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``fn(x, cos, sin)`` (elementwise over tokens) in chunks of tokens; the result is a
    ``(b, heads, s, d_h)`` view of a ``(b, s, heads, d_h)`` tensor (``.transpose(1, 2)`` of it is
    contiguous, so a caller reshaping to ``(b, s, heads * d_h)`` copies nothing)."""
    b, h, s, d = x.shape
    out = torch.empty(b, s, h, d, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device).transpose(1, 2)
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``(b, heads, s, d_h)``; ``cos``/``sin``: ``(b, s, d_h)``. Same ops as transformers
    (long inputs outside autograd in chunks of tokens: the same values)."""
    return _in_token_chunks(_rope, x, cos, sin) if _chunked(x, cos) else _rope(x, cos, sin)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`apply_rope` w.r.t. its input: the inverse rotation applied to ``dy``."""
    return _in_token_chunks(_rope_backward, dy, cos, sin) if _chunked(dy, cos) else _rope_backward(dy, cos, sin)


__all__ = ["apply_rope", "rope_backward", "rotate_half", "rotate_half_transpose"]
