"""Attention core (after RoPE, before o_proj) for the two supported implementations.

* ``eager``: materialises the probability map like transformers' eager attention (softmax in
  fp32, cast to the compute dtype). The map is the tensor the backward keeps (dense for
  ``baseline``, sparse for the compressed layer types). Grouped-query attention: only the KV
  heads are kept; the backward stacks the query heads of each KV head along the rows, so the
  K/V gradients are summed over their query heads without repeating K/V.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the arguments
  transformers uses. Nothing but Q/K/V is kept; the backward recomputes the attention forward
  from the (reconstructed) Q/K/V under autograd and differentiates it. Reusing the forward's
  logsumexp with perturbed Q/K is not normalised and blows up at low bits (see
  fidelity-findings.md), so the logsumexp is never stored.

Masks: ``None`` (causal), a boolean mask (True = attend) or an additive float mask, of shape
``(b or 1, 1 or heads, q, kv)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")


def check_implementation(impl: str, where: str = "") -> None:
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"hyclora{(' (' + where + ')') if where else ''}: attn_implementation={impl!r} is not "
            f"supported; use one of {', '.join(SUPPORTED_IMPLEMENTATIONS)} (e.g. "
            "from_pretrained(..., attn_implementation='sdpa') or model.set_attn_implementation('sdpa'))."
        )


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, hkv, s, d = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


def additive_mask(
    mask: Optional[torch.Tensor], dtype: torch.dtype, q_len: int, kv_len: int, device, is_causal: bool
) -> Optional[torch.Tensor]:
    """Turn any accepted mask into the additive form the eager path adds to the scores."""
    if mask is None:
        if not is_causal or q_len == 1:
            return None
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        mask = keep[None, None]
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return mask


def eager_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scaling: float,
    is_causal: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``q``: ``(b, h, s, d)``; ``k``/``v``: ``(b, hkv, kv, d)``.

    Returns ``(o, probs)`` with ``o``: ``(b, s, h*d)`` (the o_proj input) and ``probs``:
    ``(b, h, s, kv)`` in ``q.dtype``. The forward uses transformers' exact formulation
    (K/V repeated transiently for the matmuls) so that outputs are bit-identical to the
    unpatched model; the repeated K/V are never kept.
    """
    b, h, s, d = q.shape
    groups = h // k.shape[1]
    scores = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * scaling
    amask = additive_mask(mask, scores.dtype, s, k.shape[2], q.device, is_causal)
    if amask is not None:
        scores = scores + amask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    del scores
    o = torch.matmul(probs, repeat_kv(v, groups))
    return o.transpose(1, 2).reshape(b, s, h * d), probs


def eager_attention_backward(
    do: torch.Tensor,
    probs: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (post-RoPE) ``q``, ``k`` and ``v`` given ``do``: ``(b, h, s, d)``.

    ``probs`` may be a pruned reconstruction; pruned entries act as exact zeros in both the
    value gradient and the softmax backward (the HyC-LoRA rule).
    """
    b, h, s, d = q.shape
    hkv, kv = k.shape[1], k.shape[2]
    groups = h // hkv
    pg = probs.reshape(b, hkv, groups * s, kv)
    dog = do.reshape(b, hkv, groups * s, d)
    dv = torch.matmul(pg.transpose(2, 3), dog)  # sums over the query heads of each KV head
    dp = torch.matmul(dog, v.transpose(2, 3)).to(torch.float32)
    p32 = pg.to(torch.float32)
    ds = p32 * (dp - (p32 * dp).sum(-1, keepdim=True))
    del dp, p32
    ds = ds.to(q.dtype) * scaling
    dq = torch.matmul(ds, k).view(b, h, s, d)
    dk = torch.matmul(ds.transpose(2, 3), q.reshape(b, hkv, groups * s, d))
    return dq, dk, dv


def sdpa_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scaling: float,
    is_causal: bool = True,
) -> torch.Tensor:
    """Same call as transformers' sdpa integration; returns ``(b, s, h*d)``."""
    b, h, s, d = q.shape
    extra = {}
    if k.shape[1] != h:
        # transformers lets sdpa handle GQA natively only without a mask; mirror that choice so
        # the kernel (and its rounding) is the one the unpatched model uses.
        if mask is None and d <= 256:
            extra["enable_gqa"] = True
        else:
            k = repeat_kv(k, h // k.shape[1])
            v = repeat_kv(v, h // v.shape[1])
    causal = bool(is_causal and mask is None and s > 1)
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=0.0, scale=scaling, is_causal=causal, **extra
    )
    return o.transpose(1, 2).reshape(b, s, h * d)


def sdpa_attention_recompute(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scaling: float,
    is_causal: bool = True,
):
    """Recompute the attention forward under autograd (for the backward).

    Returns ``(o, inputs)``: ``o`` is the ``(b, s, h*d)`` output (also the o_proj input the
    LoRA-A gradient of o_proj uses) and ``inputs`` the leaf tensors to differentiate, for
    ``torch.autograd.grad(o, inputs, do)``.
    """
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        o = sdpa_attention_forward(*leaves, mask, scaling, is_causal)
    return o, leaves


__all__ = [
    "SUPPORTED_IMPLEMENTATIONS",
    "check_implementation",
    "repeat_kv",
    "additive_mask",
    "eager_attention_forward",
    "eager_attention_backward",
    "sdpa_attention_forward",
    "sdpa_attention_recompute",
]
