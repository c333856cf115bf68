"""Block glue of the fused Q/K rebuild in the attention backward of ``intra_inter_full_fuse``.

The kernel, its launcher and its torch reference are :mod:`hyclora.kernels.rope_rebuild`; here
the saved tensors are read from the block's :class:`~hyclora.ops.storage.TensorLoad` and the
layouts the kernel does not take go the op-by-op way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hyclora.kernels.common import dot_dtype_for
from hyclora.kernels.rope import apply_rope
from hyclora.kernels.rope_rebuild import rebuild_rope, rebuild_rope_takes

from .lora import lora_reconstruct


def fused_rebuild_rope(plan, load, name: str, meta, lora_b: Optional[Tensor], heads: int, cos: Tensor,
                       sin: Tensor) -> Tensor:
    """Block glue: the rebuilt, rotated ``name`` (``q`` or ``k``) of the attention backward, i.e.
    ``apply_rope(lora_reconstruct(meta, load.get(name), xa, B).view(b, s, heads, d).transpose(1, 2))``.
    Layouts the kernel does not take (odd head_dim, per-group codes, exact columns, partial
    rotary tables) go op by op."""
    saved = load.get_quantized(name)
    xa = load.get(f"xa_{name}") if meta.has_lora else None
    bb = lora_b if meta.has_lora else None
    d = plan.head_dim
    if not rebuild_rope_takes(saved, d) or cos.shape[-1] != d:  # partial rotary: apply_rope's split
        val = lora_reconstruct(meta, load.get(name), xa, bb)
        b, s, _ = val.shape
        return apply_rope(val.view(b, s, heads, d).transpose(1, 2), cos, sin)
    dot = dot_dtype_for(xa, bb) if xa is not None else None
    with torch.no_grad():
        return rebuild_rope(saved, xa, bb, meta.scaling, cos, sin, heads, d, dot_dtype=dot,
                            backend=plan.policy.backend)


__all__ = ["fused_rebuild_rope"]
