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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``(b, heads, s, d_h)``; ``cos``/``sin``: ``(b, s, d_h)``. Same ops as transformers."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`apply_rope` w.r.t. its input: the inverse rotation applied to ``dy``."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (dy * cos) + rotate_half_transpose(dy * sin)


__all__ = ["apply_rope", "rope_backward", "rotate_half", "rotate_half_transpose"]
