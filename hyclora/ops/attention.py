"""Attention core (after RoPE, before o_proj) for the supported implementations.

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

* ``hyclora_s2attn`` (:data:`~hyclora.ops.s2attn.S2ATTN_NAME`): LongLoRA's shifted sparse attention
  (:func:`hyclora.ops.s2attn.s2_attention`), the name ``hyclora.integrations.longseq.enable_s2attn``
  gives the model. It is handled like ``sdpa`` (nothing of the map is kept; the backward recomputes
  S²-Attn from the rebuilt Q/K/V), so the compressed block trains with the same sparse pattern as
  plain PEFT + S²-Attn. The compressed block only runs in training forwards with grad, so it is
  always S² here; eval forwards go through the model's own attention function (full attention).

The blocks call :func:`attention_forward` / :func:`attention_recompute`, which dispatch on the
implementation name, and the model adapters pass the mask a layer received through
:func:`block_attention_mask` first.

Masks: ``None`` (causal), a boolean mask (True = attend) or an additive float mask, of shape
``(b or 1, 1 or heads, q, kv)``; for S²-Attn also a ``(b, s)`` key-padding mask (True = token).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .s2attn import S2ATTN_NAME, IndexMask, simplify_mask, s2_attention

S2_IMPLEMENTATIONS = (S2ATTN_NAME,)
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa") + S2_IMPLEMENTATIONS


def check_implementation(impl: str, where: str = "") -> None:
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"hyclora{(' (' + where + ')') if where else ''}: attn_implementation={impl!r} is not "
            f"supported; use one of {', '.join(SUPPORTED_IMPLEMENTATIONS)} (e.g. "
            "from_pretrained(..., attn_implementation='sdpa') or model.set_attn_implementation('sdpa'))."
        )


def is_s2(impl: str) -> bool:
    """Whether ``impl`` names LongLoRA's shifted sparse attention."""
    return impl in S2_IMPLEMENTATIONS


def block_attention_mask(impl: str, mask, where: str = ""):
    """Check the mask a decoder layer received and return the form the attention block keeps.

    ``eager``/``sdpa``: ``None`` or the 4-D mask transformers builds, returned as is.

    S²-Attn: its mask function (``hyclora.integrations.longseq.s2attn_mask``) hands the layers
    ``None`` or a lazy :class:`~hyclora.ops.s2attn.IndexMask`. The block saves its mask with
    ``save_for_backward`` (for the recompute), which takes tensors only, so the lazy mask becomes:

    * the ``(b, s)`` key-padding mask when it is "causal and not padding" (padded batches; small),
      or ``None`` when that padding is all on the right (S²-Attn then needs no mask, see
      ``simplify_mask``);
    * otherwise (packed documents from ``position_ids``, sliding windows, ...) the dense
      ``(b, 1, s, s)`` bool mask, built once per forward and shared by every layer, as the
      ``sdpa`` implementation would hold it.
    """
    tag = f" ({where})" if where else ""
    if is_s2(impl) and isinstance(mask, IndexMask):
        if mask.key_padding is not None:
            return simplify_mask(mask)
        return mask.dense()
    if is_s2(impl) and torch.is_tensor(mask) and mask.dim() == 2:
        return mask
    if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 4):
        raise ValueError(
            f"hyclora{tag}: got an attention mask of type {type(mask).__name__} "
            f"{tuple(mask.shape) if torch.is_tensor(mask) else ''}; expected None or the 4-D mask "
            "transformers builds for eager/sdpa attention"
            + (" (or the lazy mask of hyclora_s2attn)." if is_s2(impl) else ".")
        )
    return mask


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
    softcap: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``q``: ``(b, h, s, d)``; ``k``/``v``: ``(b, hkv, kv, d)``.

    Returns ``(o, probs)`` with ``o``: ``(b, s, h*d)`` (the o_proj input) and ``probs``:
    ``(b, h, s, kv)`` in ``q.dtype``. The forward uses transformers' exact formulation
    (K/V repeated transiently for the matmuls) so that outputs are bit-identical to the
    unpatched model; the repeated K/V are never kept. ``softcap``: Gemma 2's attention logit
    soft-capping, ``softcap * tanh(scores / softcap)`` before the mask (transformers' eager order).
    """
    b, h, s, d = q.shape
    groups = h // k.shape[1]
    scores = _capped_scores(q, k, groups, scaling, softcap)
    amask = additive_mask(mask, scores.dtype, s, k.shape[2], q.device, is_causal)
    if amask is not None:
        scores = scores + amask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    del scores
    o = torch.matmul(probs, repeat_kv(v, groups))
    return o.transpose(1, 2).reshape(b, s, h * d), probs


def _capped_scores(q, k, groups: int, scaling: float, softcap: Optional[float], tanh_only: bool = False):
    """``q k^T * scaling`` (then ``softcap * tanh(. / softcap)``), op by op as transformers'
    eager attention; ``tanh_only``: return ``tanh(scores / softcap)`` (what the backward needs)."""
    scores = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * scaling
    if softcap is None:
        return scores
    scores = torch.tanh(scores / softcap)
    return scores if tanh_only else scores * softcap


def eager_attention_backward(
    do: torch.Tensor,
    probs: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    softcap: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (post-RoPE) ``q``, ``k`` and ``v`` given ``do``: ``(b, h, s, d)``.

    ``probs`` may be a pruned reconstruction; pruned entries act as exact zeros in both the
    value gradient and the softmax backward (the HyC-LoRA rule). With ``softcap``, the tanh of
    the scores is recomputed from ``q``/``k`` (one more ``q k^T``; nothing of it is kept) and the
    score gradient goes through autograd's ops in transformers' order (``* softcap``,
    ``tanh_backward``, ``/ softcap``, ``* scaling``).
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
    if softcap is not None:
        t = _capped_scores(q, k, groups, scaling, softcap, tanh_only=True).reshape(b, hkv, groups * s, kv)
        ds = torch.ops.aten.tanh_backward(ds.to(q.dtype) * softcap, t) / softcap
        del t
        ds = ds * scaling
    else:
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


def attention_forward(
    impl: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask,
    scaling: float,
    is_causal: bool = True,
    group_ratio: Optional[float] = None,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """The attention output ``(b, s, h*d)`` (the o_proj input) for implementation ``impl``.

    ``q``: ``(b, h, s, d)``, ``k``/``v``: ``(b, hkv, s, d)`` after RoPE. ``group_ratio`` /
    ``group_size``: S²-Attn's group (``None``: LongLoRA's quarter of the sequence); ignored by the
    other implementations. ``eager`` returns the output only (the block that keeps the map calls
    :func:`eager_attention_forward` itself).
    """
    if impl == "sdpa":
        return sdpa_attention_forward(q, k, v, mask, scaling, is_causal)
    if is_s2(impl):
        if not is_causal:
            raise ValueError(
                "hyclora: S²-Attn is causal attention; a non-causal attention layer cannot use "
                f"attn_implementation={impl!r} (use sdpa for it)."
            )
        b, h, s, d = q.shape
        if k.shape[2] != s:
            raise ValueError(
                f"hyclora: S²-Attn got {s} queries for {k.shape[2]} keys; it runs on whole sequences "
                "in training only (no KV cache). Call model.eval() for generation."
            )
        o = s2_attention(
            q, k, v, group_ratio=group_ratio, group_size=group_size, attention_mask=mask, scaling=scaling,
        )
        return o.transpose(1, 2).reshape(b, s, h * o.shape[-1])
    if impl == "eager":
        return eager_attention_forward(q, k, v, mask, scaling, is_causal)[0]
    check_implementation(impl)
    raise AssertionError(f"hyclora internal error: no attention forward for {impl!r}")


def attention_recompute(
    impl: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask,
    scaling: float,
    is_causal: bool = True,
    group_ratio: Optional[float] = None,
    group_size: Optional[int] = None,
):
    """:func:`attention_forward` recomputed under autograd (for the backward).

    Returns ``(o, leaves)`` like :func:`sdpa_attention_recompute`: differentiate with
    ``torch.autograd.grad(o, leaves, do)``. The forward is re-run exactly (same group size, shift and
    mask), so the gradient is that of the attention the forward computed.
    """
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        o = attention_forward(impl, *leaves, mask, scaling, is_causal, group_ratio, group_size)
    return o, leaves


__all__ = [
    "SUPPORTED_IMPLEMENTATIONS",
    "S2_IMPLEMENTATIONS",
    "attention_forward",
    "attention_recompute",
    "block_attention_mask",
    "is_s2",
    "check_implementation",
    "repeat_kv",
    "additive_mask",
    "eager_attention_forward",
    "eager_attention_backward",
    "sdpa_attention_forward",
    "sdpa_attention_recompute",
]
