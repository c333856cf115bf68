"""Shifted sparse attention (S²-Attn, LongLoRA) in pure torch over ``scaled_dot_product_attention``.

S²-Attn splits the sequence into groups of ``G = ceil(group_ratio * s)`` tokens and attends causally
inside each group only. The first half of the heads uses groups starting at token 0; the second
half (heads ``h // 2 .. h - 1``, as in LongLoRA) uses groups shifted by ``G // 2`` tokens, so
information flows between neighbouring groups through those heads. It is a training-time
approximation: evaluation and generation use full causal attention.

Shift choice (documented because LongLoRA has two variants that differ):

* LongLoRA's non-flash code *rolls* the shifted heads by ``-G/2`` with wrap-around. Its last group
  then holds the last ``G/2`` and the first ``G/2`` tokens of the sequence, and the causal mask in
  rolled order lets tokens ``0 .. G/2-1`` attend to the end of the sequence: a leak from the future.
* LongLoRA's flash (varlen) code offsets the segment boundaries instead: the shifted heads see
  segments ``[0, G - G//2)``, ``[G - G//2, 2G - G//2)``, ... with a partial first and last segment and
  no wrap-around.

We implement the second (non-wrapping) form: it is strictly causal, and it needs no special case
when ``s`` is not a multiple of ``G``: the last segment of either half is simply shorter (we pad it
at the end, which causal attention makes invisible to real tokens, and drop the padded rows).

Implementation: groups become a batch dimension (``(b, h, s, d) -> (b * n_groups, h, G, d)``) so
one ``sdpa`` call with ``is_causal=True`` covers every group of a half. That keeps PyTorch's flash
/ memory-efficient kernels usable on GPU when no mask is needed (the packed-rows training case).
With a padding/packing mask we evaluate the mask only on the diagonal blocks that S²-Attn reads,
so a long-context mask never has to exist as an ``s x s`` tensor (see :class:`IndexMask`).

GQA: K/V may have fewer heads than Q; a half whose query heads map onto whole KV heads reads the
matching KV slice and uses ``sdpa(enable_gqa=True)``; otherwise (e.g. MQA, odd head splits) the
needed KV heads are gathered for that half only.

This module imports torch only (lower layer: no transformers/peft/deepspeed).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

DEFAULT_GROUP_RATIO = 0.25
# The attn_implementation name under which S²-Attn is registered in transformers (by
# hyclora.integrations.longseq) and recognised by hyclora's compressed attention block. Defined in
# this lower layer so that both sides share one spelling without ops importing integrations.
S2ATTN_NAME = "hyclora_s2attn"

MaskLike = Union[None, torch.Tensor, "IndexMask"]


class IndexMask:
    """An attention mask described by an index predicate, materialised only where it is read.

    ``predicate(batch_idx, head_idx, q_idx, kv_idx)`` takes broadcastable integer tensors and returns
    a broadcastable bool tensor (True = may attend). This is the convention of transformers'
    ``mask_function`` s, so a padding/packing/sliding-window mask built by the model can be handed
    over without ever building the ``(b, 1, s, s)`` tensor: S²-Attn only evaluates the diagonal
    blocks of its groups (``n * G * G`` entries instead of ``s * s``).

    Indices outside ``[0, length)`` are never passed to the predicate (they are clamped and the
    result masked out), so predicates may index tensors of length ``length`` directly.

    ``key_padding``: optional ``(batch, length)`` bool tensor, given when the predicate is exactly
    "causal and key is not padding"; S²-Attn then uses the cheaper 2-D path (and the unmasked
    fast path when the padding is on the right).
    """

    def __init__(
        self,
        predicate: Callable[..., torch.Tensor],
        batch_size: int,
        length: int,
        device: Union[torch.device, str] = "cpu",
        key_padding: Optional[torch.Tensor] = None,
    ) -> None:
        if not callable(predicate):
            raise TypeError(f"IndexMask needs a callable predicate, got {type(predicate).__name__}.")
        self.predicate = predicate
        self.batch_size = int(batch_size)
        self.length = int(length)
        self.device = torch.device(device)
        self.key_padding = key_padding

    def blocks(self, start: int, n: int, size: int) -> torch.Tensor:
        """Bool mask of the ``n`` diagonal blocks ``[start + i*size, start + (i+1)*size)``.

        Returns shape ``(batch, 1, n, size, size)``; rows/columns past ``length`` are False.
        """
        pos = start + torch.arange(n * size, device=self.device).view(n, size)
        valid = (pos >= 0) & (pos < self.length)
        pos = pos.clamp(0, max(self.length - 1, 0))
        b_idx = torch.arange(self.batch_size, device=self.device).view(-1, 1, 1, 1)
        h_idx = torch.zeros((), dtype=torch.long, device=self.device)
        q_idx = pos.view(1, n, size, 1)
        kv_idx = pos.view(1, n, 1, size)
        allowed = self.predicate(b_idx, h_idx, q_idx, kv_idx).to(torch.bool)
        allowed = allowed & valid.view(1, n, size, 1) & valid.view(1, n, 1, size)
        return allowed.expand(self.batch_size, n, size, size).unsqueeze(1)

    def dense(self) -> Optional[torch.Tensor]:
        """The full ``(batch, 1, length, length)`` bool mask (for full attention at eval).

        Cached: one mask object serves every layer of a forward, so it is built once.
        """
        if getattr(self, "_dense", None) is None:
            self._dense = self.blocks(0, 1, self.length)[:, :, 0]
        return self._dense


def resolve_group_size(seq_len: int, group_ratio: Optional[float] = None, group_size: Optional[int] = None) -> int:
    """Group size ``G`` for a sequence of ``seq_len`` tokens.

    ``group_size`` wins when given; otherwise ``G = ceil(group_ratio * seq_len)`` (LongLoRA uses
    ``int(ratio * s)`` and requires divisibility; ceil gives the same G when it divides and at most
    ``1 / ratio`` groups otherwise). G is at least 2 (so the shifted half differs from the plain
    one) and at most ``seq_len``.
    """
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"S²-Attn group_size={group_size!r} is invalid: expected an integer >= 1.")
        g = group_size
    else:
        if group_ratio is None:
            group_ratio = DEFAULT_GROUP_RATIO
        if (
            isinstance(group_ratio, bool)
            or not isinstance(group_ratio, (int, float))
            or not math.isfinite(group_ratio)
            or not 0.0 < group_ratio <= 1.0
        ):
            raise ValueError(
                f"S²-Attn group_ratio={group_ratio!r} is invalid: expected a number in (0, 1] "
                "(LongLoRA uses 0.25)."
            )
        g = max(2, math.ceil(group_ratio * seq_len))
    return max(1, min(g, seq_len))


# -- masks ------------------------------------------------------------------------------------------
def _block_positions(start: int, n: int, size: int, length: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    pos = start + torch.arange(n * size, device=device).view(n, size)
    valid = (pos >= 0) & (pos < length)
    return pos.clamp(0, max(length - 1, 0)), valid


def _mask_blocks(mask: MaskLike, length: int, start: int, n: int, size: int, device) -> Optional[torch.Tensor]:
    """Diagonal blocks of ``mask`` as ``(B, H, n, size, size)`` (bool, or float additive), or None."""
    if mask is None:
        return None
    if isinstance(mask, IndexMask):
        return mask.blocks(start, n, size)
    pos, valid = _block_positions(start, n, size, length, device)
    if mask.dim() == 2:
        # (b, s) key-padding mask, 1/True = real token.
        keys = mask.to(torch.bool)[:, pos.view(-1)].view(mask.shape[0], n, 1, size)
        blk = keys & valid.view(1, n, size, 1) & valid.view(1, n, 1, size)
        return blk.expand(mask.shape[0], n, size, size).unsqueeze(1)
    # (B, H, s, s) dense mask: gather only the diagonal blocks.
    qi = pos.view(n, size, 1)
    ki = pos.view(n, 1, size)
    blk = mask[:, :, qi, ki]
    inside = valid.view(n, size, 1) & valid.view(n, 1, size)
    if blk.dtype == torch.bool:
        return blk & inside
    neg = torch.finfo(blk.dtype).min
    # -inf rows would turn into NaN in softmax; the most negative finite value keeps them finite.
    return torch.where(inside, blk, neg).clamp(min=neg)


def _check_mask(mask: MaskLike, b: int, h: int, s: int) -> None:
    if mask is None or isinstance(mask, IndexMask):
        if isinstance(mask, IndexMask) and (mask.length != s or mask.batch_size not in (1, b)):
            raise ValueError(
                f"S²-Attn: IndexMask is for batch {mask.batch_size} x length {mask.length}, but the "
                f"input has batch {b} x length {s}."
            )
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            "S²-Attn attention_mask must be None, a (b, s) padding mask, a (b|1, 1|h, s, s) mask "
            f"or an IndexMask; got {type(mask).__name__}."
        )
    if mask.dim() == 2:
        if mask.shape != (b, s):
            raise ValueError(
                f"S²-Attn: 2-D attention_mask must be (batch, seq) = ({b}, {s}), got {tuple(mask.shape)}."
            )
        return
    if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, h) or mask.shape[2:] != (s, s):
        raise ValueError(
            f"S²-Attn: 4-D attention_mask must be (batch|1, 1|heads, seq, seq) = "
            f"({b}|1, 1|{h}, {s}, {s}), got {tuple(mask.shape)}. (S²-Attn is for training on whole "
            "sequences: no KV cache, query length == key length.)"
        )


def simplify_mask(mask: MaskLike) -> MaskLike:
    """Drop masks that causal attention already implies.

    A key-padding mask whose padding sits at the end of every row (right padding, the usual
    training layout) hides nothing from a real token that causality does not hide already: real
    tokens come first. So the unmasked ``is_causal`` fast path gives the same outputs for every
    real token (padding rows then get finite, meaningless outputs instead of zeros; no real token
    and no loss reads them). This keeps padded batches on the flash/efficient sdpa kernels.
    """
    if isinstance(mask, IndexMask) and mask.key_padding is not None:
        # One mask object serves every layer of a forward: decide (and sync) once.
        if not hasattr(mask, "_s2_simplified"):
            mask._s2_simplified = simplify_mask(mask.key_padding)
        return mask._s2_simplified
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        keep = mask.to(torch.bool)
        if bool((keep[:, 1:] <= keep[:, :-1]).all()):  # every row: valid prefix, then padding
            return None
        return keep
    return mask


# -- core ---------------------------------------------------------------------------------------------
def _kv_heads(t: torch.Tensor, h0: int, h1: int, n_rep: int) -> torch.Tensor:
    """KV heads serving query heads [h0, h1): a slice when the split is aligned, else a gather."""
    if h0 % n_rep == 0 and h1 % n_rep == 0:
        return t[:, h0 // n_rep: h1 // n_rep]
    idx = torch.arange(h0, h1, device=t.device) // n_rep
    return t.index_select(1, idx)


def _to_blocks(t: torch.Tensor, start: int, n: int, size: int) -> torch.Tensor:
    """(b, hh, s, d) tokens [start, start + n*size) -> (b*n, hh, size, d), zero-padded at the end."""
    b, hh, s, d = t.shape
    t = t[:, :, start:]
    pad = n * size - t.shape[2]
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.reshape(b, hh, n, size, d).transpose(1, 2).reshape(b * n, hh, size, d)


def _from_blocks(o: torch.Tensor, b: int, n: int, keep: int) -> torch.Tensor:
    _, hh, size, d = o.shape
    return o.reshape(b, n, hh, size, d).transpose(1, 2).reshape(b, hh, n * size, d)[:, :, :keep]


def _attend_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    size: int,
    mask: MaskLike,
    mask_heads: Tuple[int, int],
    scaling: Optional[float],
    dropout_p: float,
) -> torch.Tensor:
    """Causal attention inside consecutive blocks of ``size`` tokens starting at ``start``.

    Returns the output for tokens ``[start, s)`` as ``(b, hq, s - start, dv)``.
    """
    b, hq, s, _ = q.shape
    n = -(-(s - start) // size)
    qb, kb, vb = (_to_blocks(t, start, n, size) for t in (q, k, v))
    gqa = qb.shape[1] != kb.shape[1]
    blk = _mask_blocks(mask, s, start, n, size, q.device)
    if blk is None:
        out = F.scaled_dot_product_attention(
            qb, kb, vb, dropout_p=dropout_p, is_causal=True, scale=scaling, enable_gqa=gqa
        )
        return _from_blocks(out, b, n, s - start)

    if blk.shape[1] > 1:  # per-head mask: keep the heads of this half
        blk = blk[:, mask_heads[0]: mask_heads[1]]
    hm = blk.shape[1]
    blk = blk.transpose(1, 2).expand(b, n, hm, size, size).reshape(b * n, hm, size, size)
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    row_ok = None
    if blk.dtype == torch.bool:
        blk = blk & causal
        # A query row with no visible key (a padding token in a group of padding) gives NaN in
        # some sdpa backends; let it see itself and zero its output instead (it is padding).
        row_ok = blk.any(-1, keepdim=True)
        blk = blk | (~row_ok & torch.eye(size, dtype=torch.bool, device=q.device))
    else:
        blk = blk.masked_fill(~causal, torch.finfo(blk.dtype).min).to(q.dtype)
    out = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=blk, dropout_p=dropout_p, scale=scaling, enable_gqa=gqa
    )
    if row_ok is not None:
        out = out * row_ok.to(out.dtype)
    return _from_blocks(out, b, n, s - start)


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_ratio: Optional[float] = DEFAULT_GROUP_RATIO,
    attention_mask: MaskLike = None,
    scaling: Optional[float] = None,
    group_size: Optional[int] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Shifted sparse attention on ``(batch, heads, seq, head_dim)`` tensors; returns ``(b, h, s, dv)``.

    Args:
        q: queries ``(b, h, s, d)`` (RoPE already applied).
        k, v: keys/values ``(b, h_kv, s, d)`` / ``(b, h_kv, s, dv)``; ``h % h_kv == 0`` (GQA/MQA).
        group_ratio: group size as a fraction of ``s`` (LongLoRA: 1/4). Ignored if ``group_size``.
        attention_mask: None (causal only), a ``(b, s)`` key-padding mask (True/1 = token), a
            ``(b|1, 1|h, s, s)`` bool (True = attend) or additive float mask, or an
            :class:`IndexMask`. It further restricts S²-Attn, which is always causal.
        scaling: softmax scale (default ``d ** -0.5``).
        group_size: explicit group size in tokens (overrides ``group_ratio``).
        dropout_p: attention dropout probability (pass 0 at eval).

    Outputs at padding positions are not meaningful: rows that can see no key return zeros, and
    with right padding (the fast path, see ``simplify_mask``) padding rows attend like real
    tokens. Real tokens are exact in every case.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "s2_attention expects (batch, heads, seq, head_dim) tensors; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    b, h, s, d = q.shape
    hk = k.shape[1]
    if k.shape[0] != b or v.shape[0] != b or k.shape[2] != s or v.shape[2] != s or v.shape[1] != hk:
        raise ValueError(
            f"s2_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree; "
            "K/V need the batch and sequence length of Q (no KV cache: S²-Attn is training-only)."
        )
    if k.shape[3] != d:
        raise ValueError(f"s2_attention: q head_dim {d} != k head_dim {k.shape[3]}.")
    if hk == 0 or h % hk:
        raise ValueError(f"s2_attention: query heads ({h}) must be a multiple of key/value heads ({hk}).")
    if h < 2:
        raise ValueError("s2_attention needs at least 2 query heads (half of them are shifted).")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"s2_attention: dropout_p={dropout_p!r} must be in [0, 1).")
    _check_mask(attention_mask, b, h, s)
    attention_mask = simplify_mask(attention_mask)

    g = resolve_group_size(s, group_ratio, group_size)
    shift = g // 2
    n_rep = h // hk
    split = h // 2  # heads [0, split) plain, [split, h) shifted (LongLoRA shifts the second half)

    q0 = q[:, :split]
    out_plain = _attend_blocks(
        q0, _kv_heads(k, 0, split, n_rep), _kv_heads(v, 0, split, n_rep),
        0, g, attention_mask, (0, split), scaling, dropout_p,
    )

    q1 = q[:, split:]
    k1, v1 = _kv_heads(k, split, h, n_rep), _kv_heads(v, split, h, n_rep)
    # Non-wrapping shift: the first segment is [0, g - shift), then full groups of g tokens.
    first = min(g - shift, s)
    parts = [
        _attend_blocks(
            q1[:, :, :first], k1[:, :, :first], v1[:, :, :first], 0, first,
            _sub_mask(attention_mask, first), (split, h), scaling, dropout_p,
        )
    ]
    if first < s:
        parts.append(
            _attend_blocks(q1, k1, v1, first, g, attention_mask, (split, h), scaling, dropout_p)
        )
    out_shift = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return torch.cat([out_plain, out_shift], dim=1)


def _sub_mask(mask: MaskLike, length: int) -> MaskLike:
    """The mask restricted to the leading ``length`` tokens."""
    if mask is None:
        return None
    if isinstance(mask, IndexMask):
        return IndexMask(mask.predicate, mask.batch_size, length, mask.device)
    if mask.dim() == 2:
        return mask[:, :length]
    return mask[:, :, :length, :length]


def s2_attention_reference_mask(seq_len: int, num_heads: int, group_size: int, device=None) -> torch.Tensor:
    """The ``(heads, s, s)`` bool pattern S²-Attn allows (before any padding mask).

    Head ``i < h//2``: same group ``t // G`` and causal; head ``i >= h//2``: same group
    ``(t + G//2) // G`` and causal. Useful for tests and for explaining the pattern.
    """
    t = torch.arange(seq_len, device=device)
    shift = group_size // 2
    plain = (t[:, None] // group_size) == (t[None, :] // group_size)
    shifted = ((t[:, None] + shift) // group_size) == ((t[None, :] + shift) // group_size)
    causal = t[None, :] <= t[:, None]
    split = num_heads // 2
    pattern = torch.stack([plain] * split + [shifted] * (num_heads - split))
    return pattern & causal


__all__ = [
    "DEFAULT_GROUP_RATIO",
    "S2ATTN_NAME",
    "IndexMask",
    "resolve_group_size",
    "s2_attention",
    "s2_attention_reference_mask",
]


# -- S²-Attn forward + backward by flash-attention calls on views (no copies) -------------------
#
# ``s2_attention`` under autograd copies q/k/v into group-major blocks and, in the backward,
# builds every gradient from full-size ``slice_backward`` zeros added together: at 7B/64k tokens
# about a dozen (tokens, hidden) tensors were alive in the attention backward, the peak of a
# checkpointed hyclora step. The functions below run the same attention as a list of causal
# blocks, each a strided VIEW of the (b, h, s, d) tensors handed to the attention kernels directly
# (``HyCLoRAConfig.s2_block_kernels``: PyTorch's sdpa dispatch, or the aten flash ops),
# and write every block's gradient into the memory of the q/k/v it came from (the blocks are
# disjoint in (batch, head, token)), so the backward holds q/k/v (turning into dq/dk/dv), o, dO
# and one block's temporaries. Used by the decoder block's backward when eligible
# (:func:`s2_flash_eligible`); the generic path stays for masks, GQA, dropout and other dtypes.

# Elements of q per flash call at most: heads are split over several calls only when a span of the
# sequence is long (at 7B: all 16 heads of a half up to 32k tokens, one head at 512k), so one call's
# temporaries (dq/dk/dv and the kernel's fp32 dq accumulator) stay near 2**26 elements each while
# short sequences keep one launch per span.
_FLASH_CALL_ELEMENTS = 1 << 26


def s2_flash_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float = 0.0) -> bool:
    """The view-based path applies: no mask, no dropout, as many key/value heads as query heads,
    last dimension contiguous, and a flash kernel for the device and dtype (CUDA: fp16/bf16 with
    head_dim <= 256; CPU: any float)."""
    if mask is not None or dropout_p or q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return False
    if q.shape[1] < 2 or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    return q.device.type == "cpu" and q.is_floating_point()


def _s2_blocks(h: int, s: int, g: int, d: int = 1) -> List[Tuple[int, int, int, int, int]]:
    """``(h0, h1, start, n, size)``: causal attention inside ``n`` consecutive blocks of ``size``
    tokens from ``start`` for heads ``[h0, h1)``; together exactly :func:`s2_attention`'s groups
    (plain heads: groups of ``g`` from 0; shifted heads: ``[0, g - g/2)`` then groups of ``g``),
    a short last group as a block of its own (causal: padding it would change nothing)."""
    split, shift = h // 2, g // 2
    first = min(g - shift, s)
    spans = [(0, split, 0, s, g), (split, h, 0, first, first)] + ([(split, h, first, s, g)] if first < s else [])
    blocks = []
    for h0, h1, start, end, size in spans:
        size = min(size, end - start)
        n_full, rest = divmod(end - start, size)
        per_call = max(1, _FLASH_CALL_ELEMENTS // ((end - start) * d))
        for c0 in range(h0, h1, per_call):
            c1 = min(h1, c0 + per_call)
            if n_full:
                blocks.append((c0, c1, start, n_full, size))
            if rest:
                blocks.append((c0, c1, start + n_full * size, 1, rest))
    return blocks


def _block_view(t: torch.Tensor, bi: int, h0: int, h1: int, start: int, n: int, size: int) -> torch.Tensor:
    """(n, h1 - h0, size, d) view of ``t[bi, h0:h1, start:start + n*size]`` (``t``: (b, h, s, d))."""
    return t[bi, h0:h1, start:start + n * size].unflatten(1, (n, size)).transpose(0, 1)


def _flash_forward(q, k, v, scale):
    if q.is_cuda:
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)
        return out, (lse, cq, ck, mq, mk, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, (lse,)


def _flash_backward(do, q, k, v, out, saved, scale):
    if q.is_cuda:
        lse, cq, ck, mq, mk, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, saved[0], 0.0, True, scale=scale)


def _each_block(q: torch.Tensor, group: int):
    """``(batch index, block)`` of every block of :func:`_s2_blocks` for ``q`` ``(b, h, s, d)``."""
    b, h, s, d = q.shape
    for bi in range(b):
        for blk in _s2_blocks(h, s, group, d):
            yield bi, blk


def _write_block(dsts, block_tensors, bi: int, blk) -> None:
    """Copy each block result into its block of the matching full-size tensor."""
    with torch.no_grad():
        for dst, t in zip(dsts, block_tensors):
            _block_view(dst, bi, *blk).copy_(t)


def _blockwise_output(q, k, v, group, attend):
    """``(o, kept)``: ``o`` the ``(b, s, h, d)`` contiguous output written block by block from
    ``attend(q_view, k_view, v_view) -> (out, keep)``, ``kept`` the blocks' ``keep`` in order."""
    b, h, s, d = q.shape
    o = q.new_empty(b, s, h, d)
    o_heads = o.transpose(1, 2)  # (b, h, s, d) view
    kept = []
    with torch.no_grad():
        for bi, blk in _each_block(q, group):
            out, keep = attend(*(_block_view(t, bi, *blk) for t in (q, k, v)))
            _block_view(o_heads, bi, *blk).copy_(out)
            kept.append(keep)
    return o, kept


def s2_flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                     scaling: Optional[float] = None):
    """S²-Attn output without autograd: ``(o, saved)`` with ``o`` a ``(b, s, h, d)`` contiguous
    tensor (``o.view(b, s, h*d)`` is the o_proj input) and ``saved`` what
    :func:`s2_flash_backward` needs per block (log-sum-exp, fp32, ``b*h*s`` values in all)."""
    return _blockwise_output(q, k, v, group, lambda qv, kv, vv: _flash_forward(qv, kv, vv, scaling))


# The block kernels: "sdpa" calls F.scaled_dot_product_attention on each block's views (PyTorch
# picks the backend; the backward differentiates each block's recompute); "flash" calls the aten
# FA2 ops directly and keeps each block's log-sum-exp. "auto" takes sdpa from S2_SDPA_MIN_BLOCK
# tokens per block and flash below, where sdpa measured slower (BENCHMARKS.md).
S2_SDPA_MIN_BLOCK = 4096


def s2_block_kernels(group: int, choice: str = "auto") -> str:
    """``"sdpa"`` or ``"flash"``: the block kernels for S²-Attn groups of ``group`` tokens
    (``choice``: ``HyCLoRAConfig.s2_block_kernels``)."""
    if choice == "auto":
        return "sdpa" if group >= S2_SDPA_MIN_BLOCK else "flash"
    if choice not in ("sdpa", "flash"):
        raise ValueError(f"hyclora: s2_block_kernels={choice!r} is invalid: use 'auto', 'sdpa' or 'flash'")
    return choice


def s2_sdpa_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                   scaling: Optional[float] = None) -> torch.Tensor:
    """S²-Attn output without autograd as a ``(b, s, h, d)`` contiguous tensor, one
    ``F.scaled_dot_product_attention`` call per block of views."""
    return _blockwise_output(
        q, k, v, group, lambda qv, kv, vv: (F.scaled_dot_product_attention(qv, kv, vv, is_causal=True,
                                                                           scale=scaling), None))[0]


def s2_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
              scaling: Optional[float] = None, kernels: str = "auto") -> torch.Tensor:
    """The S²-Attn output by the block kernels :func:`s2_block_kernels` picks."""
    if s2_block_kernels(group, kernels) == "sdpa":
        return s2_sdpa_output(q, k, v, group, scaling)
    return s2_flash_forward(q, k, v, group, scaling)[0]


def s2_sdpa_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, group: int,
                     scaling: Optional[float] = None, overwrite: Tuple[bool, bool, bool] = (False, False, False),
                     out: Optional[torch.Tensor] = None):
    """Gradients ``(dq, dk, dv)`` of S²-Attn's output for the output gradient ``do`` (``(b, s, h, d)``
    shaped, any strides), recomputing each block's attention under autograd through
    ``F.scaled_dot_product_attention`` and differentiating it. ``out`` (``(b, s, h, d)``, optional)
    receives the recomputed output (the o_proj input the caller's LoRA gradient needs).
    ``overwrite`` as in :func:`s2_flash_backward`: each block's gradient is written over the
    block's own values once its recompute is done."""
    do_heads = do.transpose(1, 2)
    out_heads = None if out is None else out.transpose(1, 2)
    grads = tuple(t if own else torch.empty_like(t) for t, own in zip((q, k, v), overwrite))
    for bi, blk in _each_block(q, group):
        leaves = [_block_view(t, bi, *blk).detach().requires_grad_(True) for t in (q, k, v)]
        with torch.enable_grad():
            block_out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scaling)
        if out_heads is not None:
            _block_view(out_heads, bi, *blk).copy_(block_out.detach())
        # the output gradient in the output's own layout, a precaution (not checked on a GPU yet)
        # for fused backward kernels that may assume dO strided like O; one block-sized copy
        grad_out = torch.empty_like(block_out).copy_(_block_view(do_heads, bi, *blk))
        block_grads = torch.autograd.grad(block_out, leaves, grad_out)
        del block_out, leaves, grad_out
        _write_block(grads, block_grads, bi, blk)
        del block_grads
    return grads


def s2_flash_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                      saved, group: int, scaling: Optional[float] = None,
                      overwrite: Tuple[bool, bool, bool] = (False, False, False)):
    """Gradients ``(dq, dk, dv)`` (``(b, h, s, d)``) of :func:`s2_flash_forward`'s output.

    ``o`` and ``do``: ``(b, s, h, d)``-shaped (any strides, last dim contiguous). ``overwrite``
    (per q, k, v): the tensor is the caller's own and not needed afterwards, so each block's
    gradient is written over the block's values and the tensor itself is returned as its
    gradient (no new full-size tensor).
    """
    o_heads, do_heads = o.transpose(1, 2), do.transpose(1, 2)
    grads = tuple(t if own else torch.empty_like(t) for t, own in zip((q, k, v), overwrite))
    it = iter(saved)
    with torch.no_grad():
        for bi, blk in _each_block(q, group):
            qv, kv, vv = (_block_view(t, bi, *blk) for t in (q, k, v))
            block_grads = _flash_backward(_block_view(do_heads, bi, *blk), qv, kv, vv,
                                          _block_view(o_heads, bi, *blk), next(it), scaling)
            _write_block(grads, block_grads, bi, blk)
            del block_grads
    return grads
