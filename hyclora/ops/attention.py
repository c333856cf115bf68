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
``(b or 1, 1 or heads, q, kv)``; for S²-Attn also a ``(b, s)`` key-padding mask (True = token);
or the documents of a packed batch as ``cu_seqlens`` (see "Packed documents" below).

Packed documents: a packed (padding-free) batch concatenates documents into rows, and attention must
stay inside each one. The blocks get them as ``cu_seqlens``, a 1-D int32 tensor of document starts over
the flattened ``b * s`` tokens ending with ``b * s`` (flash-attention's varlen format; entries past the
last document may repeat ``b * s``: empty documents, so a fixed capacity gives every packed micro-batch
one shape). :func:`packed_documents` reads them from a layer call's ``cu_seq_lens_q`` (what TRL's
padding-free collator, ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` and
:class:`hyclora.data.packing.PackedBatchCollator` pass; transformers' flash-attention path follows it
too). Packed ``position_ids`` without ``cu_seq_lens_q`` go through transformers' mask as any mask
does, and transformers (5.17) builds the per-document mask from them only without a KV cache: called
with ``use_cache`` on (the training default), sdpa gets no mask at all and eager a plain causal one,
so the unpatched model and hyclora both attend across documents; pass ``use_cache=False`` (TRL does)
or ``cu_seq_lens_q``. On CUDA (fp16/bf16) the attention runs through a varlen kernel (``flash_attn``'s
``flash_attn_varlen_func``, else ``torch.nn.attention.varlen``; :func:`varlen_kernel`); otherwise through
the exact block-diagonal causal mask (:func:`document_mask`); S²-Attn evaluates the documents lazily
on its groups (:func:`document_index_mask`).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Callable, Optional, Tuple

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


# -- packed documents ------------------------------------------------------------------------------


class _OnePerTensor:
    """The answer of a host-reading check for the last tensor (or tensors) it was asked about: a
    forward hands every decoder layer the same mask / ``cu_seqlens`` objects,
    so the layers after the first reuse it (one host read per forward)."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, tensors, compute):
        key = tuple((id(t), t._version) if torch.is_tensor(t) else id(t) for t in tensors)
        alive = self.key is not None and all(r() is t for r, t in zip(self.key[1], tensors))
        if not alive or self.key[0] != key:
            value = compute()
            self.key = (key, tuple(weakref.ref(t) for t in tensors))
            self.value = value
        return self.value


_CHECKED_DOCUMENTS = _OnePerTensor()
_MASK_COVERS = _OnePerTensor()


def is_documents(mask) -> bool:
    """Whether ``mask`` is the ``cu_seqlens`` form of packed documents (a 1-D integer tensor)."""
    return torch.is_tensor(mask) and mask.dim() == 1 and not mask.is_floating_point() and mask.dtype != torch.bool


def document_ids(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``(batch, length)`` index of the document of every token (fixed shapes: graph-capturable)."""
    tokens = torch.arange(batch * length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).view(batch, length)


def document_mask(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The ``(batch, 1, length, length)`` bool mask: causal, and inside each document only."""
    ids = document_ids(cu_seqlens, batch, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
    return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]


def document_index_mask(cu_seqlens: torch.Tensor, batch: int, length: int) -> IndexMask:
    """The documents as a lazy :class:`IndexMask` (S²-Attn, causal itself, reads its groups only)."""
    ids = document_ids(cu_seqlens, batch, length)
    return IndexMask(lambda b, h, q, kv: ids[b, q] == ids[b, kv], batch, length, ids.device)


def check_documents(cu_seqlens, batch: int, length: int, device, where: str = "") -> None:
    """Refuse a ``cu_seqlens`` that does not describe ``batch`` rows of ``length`` tokens: 1-D
    int32 on the hidden states' device, from 0 up to ``batch * length`` (repeats allowed), every row
    start a document start (a document never runs into the next row). Values are read once per
    tensor (one host read per forward)."""
    tag = f" ({where})" if where else ""
    fix = ("pass cu_seq_lens_q as hyclora.data.PackedBatchCollator, TRL's padding-free collator or "
           "transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True) build it")
    if not torch.is_tensor(cu_seqlens) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        what = (f"{cu_seqlens.dtype} tensor of shape {tuple(cu_seqlens.shape)}" if torch.is_tensor(cu_seqlens)
                else type(cu_seqlens).__name__)
        raise ValueError(f"hyclora{tag}: cu_seq_lens_q must be a 1-D int32 tensor of document starts, got a "
                         f"{what}; {fix}.")
    if cu_seqlens.device != torch.device(device) or cu_seqlens.numel() < 2:
        raise ValueError(f"hyclora{tag}: cu_seq_lens_q ({cu_seqlens.numel()} entries on {cu_seqlens.device}) needs "
                         f"at least 2 entries on the model's device {device}; {fix}.")

    def compute():
        total = batch * length
        rows = torch.arange(0, total, length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        ok = ((cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens.diff() >= 0).all()
              & torch.isin(rows, cu_seqlens).all())
        return bool(ok)

    if not _CHECKED_DOCUMENTS.get((cu_seqlens,), compute):
        raise ValueError(
            f"hyclora{tag}: cu_seq_lens_q {cu_seqlens.tolist()[:16]}... does not describe {batch} packed row(s) of "
            f"{length} tokens: it must start at 0, never decrease, end at {batch * length} and contain every row "
            f"start (multiples of {length}); {fix}.")


def _mask_allows(mask) -> Optional[torch.Tensor]:
    """What a mask the layer received lets attend, as a bool tensor broadcastable to (b, 1, q, kv)."""
    if isinstance(mask, IndexMask):
        return mask.dense()
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _mask_covers(mask, cu_seqlens: torch.Tensor, batch: int, length: int) -> bool:
    """Whether ``mask`` lets every token see its whole document's past (so attending by the
    documents alone is attending by both). One host read per (mask, documents) pair."""
    if mask is None:
        return True

    def compute():
        docs = document_mask(cu_seqlens, batch, length)
        return not bool((docs & ~_mask_allows(mask)).any())

    return _MASK_COVERS.get((mask, cu_seqlens), compute)


def packed_documents(mask, cu_seq_lens, batch: int, length: int, device, where: str = "") -> Optional[torch.Tensor]:
    """The ``cu_seqlens`` of the documents a training call's attention must stay inside (the layer's
    ``cu_seq_lens_q``), or None (not packed). Checked (:func:`check_documents`) and refused together
    with a ``mask`` that hides a key inside a document (padding: a packed batch has none). One host
    read per forward of a packed batch, none otherwise. Packed ``position_ids`` alone are not read
    here (that would cost every step a host read): transformers' own mask carries them, but only
    when the model runs without a KV cache (``use_cache=False``; see the module docstring)."""
    if cu_seq_lens is None:
        return None
    tag = f" ({where})" if where else ""
    check_documents(cu_seq_lens, batch, length, device, where)
    if not _mask_covers(mask, cu_seq_lens, batch, length):
        raise ValueError(
            f"hyclora{tag}: got cu_seq_lens_q (packed documents) together with an attention_mask that hides "
            "tokens inside a document (padding); a packed batch needs no attention_mask: drop it (padding "
            "belongs in its own document at the end of a row, as hyclora.data.PackedBatchCollator puts it).")
    return cu_seq_lens


def layer_attention_mask(impl: str, arguments, hidden: torch.Tensor, where: str = ""):
    """The attention input of a decoder-layer call (``arguments``: its arguments by name): the
    packed documents (:func:`packed_documents`) in a training forward with grad, else the mask
    through :func:`block_attention_mask`."""
    mask = arguments.get("attention_mask")
    if hidden is not None and hidden.dim() == 3:
        docs = packed_documents(mask, arguments.get("cu_seq_lens_q"), hidden.shape[0], hidden.shape[1],
                                hidden.device, where)
        if docs is not None:
            return docs
    return block_attention_mask(impl, mask, where)


@functools.lru_cache(maxsize=None)
def _keywords(fn: Callable) -> frozenset:
    """The keyword names of ``fn`` (torch's varlen_attn changed them between releases)."""
    return frozenset(inspect.signature(fn).parameters)


def varlen_kernel(q: torch.Tensor) -> Optional[Callable]:
    """A varlen causal attention ``kernel(q, k, v, cu_seqlens, max_len, scale) -> o`` on
    ``(tokens, heads, d)`` tensors (k/v may have fewer heads) for ``q``'s device and dtype, or None:
    ``flash_attn.flash_attn_varlen_func`` when installed, else ``torch.nn.attention.varlen``; CUDA
    fp16/bf16 with head_dim <= 256 only (their kernels' range). None: the block-diagonal mask path."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        return lambda q, k, v, cu, n, scale: flash_attn_varlen_func(
            q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = _keywords(varlen_attn)
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

    def torch_varlen(q, k, v, cu, n, scale):
        gqa = {}
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                gqa = {"enable_gqa": True}
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, **causal, **gqa)

    return torch_varlen


def packed_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             scaling: float, kernel: Optional[Callable] = None) -> torch.Tensor:
    """Causal attention inside the documents of ``cu_seqlens``; returns ``(b, s, h*d)``.

    ``kernel``: a varlen kernel as :func:`varlen_kernel` returns (None: the one it picks, or the
    exact block-diagonal mask through sdpa when there is none). The varlen kernel reads every row as
    one stream of ``b * s`` tokens with ``s`` as the longest document (a static bound: no host read).
    """
    b, h, s, d = q.shape
    if kernel is None:
        kernel = varlen_kernel(q)
    if kernel is None:
        return sdpa_attention_forward(q, k, v, document_mask(cu_seqlens, b, s), scaling, True)
    tokens = lambda t: t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[-1])  # noqa: E731
    o = kernel(tokens(q), tokens(k), tokens(v), cu_seqlens, s, scaling)
    return o.reshape(b, s, h * o.shape[-1])


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
    if is_documents(mask):  # packed documents: their block-diagonal causal mask
        mask = document_mask(mask, b, s)
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
    if is_documents(mask):
        if not is_causal:
            raise ValueError("hyclora: packed documents (cu_seq_lens_q) need causal "
                             "attention; this attention layer is not causal: pad its batches instead.")
        if impl == "sdpa":
            return packed_attention_forward(q, k, v, mask, scaling)
        mask = document_index_mask(mask, q.shape[0], q.shape[2]) if is_s2(impl) else mask
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
    "layer_attention_mask",
    "packed_documents",
    "check_documents",
    "is_documents",
    "document_ids",
    "document_mask",
    "document_index_mask",
    "varlen_kernel",
    "packed_attention_forward",
    "is_s2",
    "check_implementation",
    "repeat_kv",
    "additive_mask",
    "eager_attention_forward",
    "eager_attention_backward",
    "sdpa_attention_forward",
    "sdpa_attention_recompute",
]
