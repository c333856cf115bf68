"""Sparse storage of attention probabilities for the eager attention backward.

``sparsify_probs(p, ratio)`` keeps ``K = ceil(ratio * p.numel())`` entries of the
(b, h, s_q, s_k) probability map: the K largest of the WHOLE map (``scope="global"``, the
default), and drops the rest, which the backward then treats as exact zeros (in grad_V and in
the softmax backward). Masked (upper-triangle) entries count in ``numel``, as in the reference:
with a causal mask ``ratio = 0.05`` keeps about 10% of the valid entries. The masked entries are
exact zeros, so they are never chosen before a valid one.

Storage: compressed rows, not int64 COO (the reference's 10 bytes per kept entry): kept values in
the input dtype, sorted by position, their column indices as int16 (int32 when s_k > 32767) and
the number kept per row (same integer type). About 4 bytes per kept entry + 2 per row: at
ratio 0.05, s = 512, about 0.21 byte per map element against 2 for the dense bf16 map.
All shapes are fixed by ``ratio`` and ``p.shape``: no host sync (top-k, sort, scatter-add only).

Why global: it spends the budget where the probability mass is (sharp rows keep few entries,
diffuse rows many) and gave the best LoRA-gradient cosine of the selections tried
(``benchmarks/quant_fidelity.py``; BENCHMARKS.md, "Design measurements"). ``scope="head"`` (a
sample's storage does not depend on the rest of the batch) and ``scope="row"`` (fixed k per row;
cheapest top-k) store the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import SUPPORTED_DTYPES

SCOPES = ("global", "head", "row")


def _index_dtype(s_k: int) -> torch.dtype:
    return torch.int16 if s_k <= torch.iinfo(torch.int16).max else torch.int32


def _ceil_frac(ratio: float, n: int) -> int:
    # 1e-9 keeps e.g. 0.1 * 30 = 3.0000000000000004 at 3
    return min(n, math.ceil(ratio * n - 1e-9))


def keep_count(shape, ratio: float, scope: str = "global") -> int:
    """Entries kept in total for a map of ``shape`` (b, h, s_q, s_k)."""
    b, h, s_q, s_k = shape
    if scope == "global":
        return _ceil_frac(ratio, b * h * s_q * s_k)
    if scope == "head":
        return b * h * _ceil_frac(ratio, s_q * s_k)
    return b * h * s_q * _ceil_frac(ratio, s_k)


class SparseProbs:
    """Kept entries of a (b, h, s_q, s_k) probability map.

    ``values`` (K,) in the map's dtype and ``cols`` (K,) int16/int32, sorted by (row, column);
    ``counts`` (b*h*s_q,) how many entries each row keeps. For ``scope="row"`` every row keeps
    the same k, so ``values``/``cols`` are (b, h, s_q, k) and ``counts`` is None.
    """

    NUM_TENSORS = 3
    __slots__ = ("values", "cols", "counts", "shape", "scope")

    def __init__(self, values: Tensor, cols: Tensor, counts, shape, scope: str = "global"):
        self.values = values
        self.cols = cols
        self.counts = counts
        self.shape = torch.Size(shape)
        self.scope = scope

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def kept(self) -> int:
        return self.values.numel()

    def tensors(self):
        return (self.values, self.cols, self.counts)

    def meta(self):
        return (tuple(self.shape), self.scope)

    @staticmethod
    def restore(tensors, meta) -> "SparseProbs":
        tensors = tuple(tensors)
        if len(tensors) != SparseProbs.NUM_TENSORS:
            raise ValueError(
                f"SparseProbs.restore needs the {SparseProbs.NUM_TENSORS} entries of tensors(), "
                f"got {len(tensors)}."
            )
        shape, scope = meta
        return SparseProbs(*tensors, shape, scope)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def __repr__(self) -> str:
        return (f"SparseProbs(shape={tuple(self.shape)}, scope={self.scope}, kept={self.kept}, "
                f"dtype={self.dtype}, nbytes={self.nbytes})")


def sparsify_probs(p: Tensor, ratio: float, *, scope: str = "global") -> SparseProbs:
    """Keep ``ceil(ratio * p.numel())`` entries of ``p`` (b, h, s_q, s_k): the largest of the
    whole map (``scope="global"``), of each (batch, head) (``"head"``) or of each row (``"row"``,
    ``ceil(ratio * s_k)`` per row)."""
    if not isinstance(p, Tensor):
        raise TypeError(f"sparsify_probs expects a torch.Tensor, got {type(p).__name__}.")
    if p.dim() != 4:
        raise ValueError(
            f"sparsify_probs expects attention probabilities of shape (batch, heads, s_q, s_k), "
            f"got shape {tuple(p.shape)}."
        )
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"sparsify_probs takes bf16/fp16/fp32 probabilities, got {p.dtype}.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(
            f"ratio={ratio!r} is invalid: use the fraction of the map's entries to keep, in [0, 1] "
            f"(HyCLoRAConfig.softmax_outlier_ratio)."
        )
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is invalid: use one of {SCOPES}.")
    b, h, s_q, s_k = p.shape
    idt = _index_dtype(s_k)
    ratio = float(ratio)
    with torch.no_grad():
        p = p.detach()
        if scope == "row":
            k = _ceil_frac(ratio, s_k)
            values, idx = torch.topk(p, k, dim=-1, sorted=False)
            return SparseProbs(values, idx.to(idt), None, p.shape, scope)
        if scope == "global":
            k = _ceil_frac(ratio, p.numel())
            values, flat = torch.topk(p.reshape(-1), k, sorted=False)
        else:
            k = _ceil_frac(ratio, s_q * s_k)
            values, flat = torch.topk(p.reshape(b * h, s_q * s_k), k, dim=-1, sorted=False)
            # positions within a head -> positions within the whole map
            flat = flat + (torch.arange(b * h, device=p.device) * (s_q * s_k)).unsqueeze(1)
            values, flat = values.reshape(-1), flat.reshape(-1)
        flat, order = torch.sort(flat)
        values = values[order]
        rows = flat // s_k
        counts = torch.zeros(b * h * s_q, dtype=torch.int64, device=p.device)
        counts.scatter_add_(0, rows, torch.ones_like(rows))
        return SparseProbs(values, (flat - rows * s_k).to(idt), counts.to(idt), p.shape, scope)


def densify_probs(sp: SparseProbs) -> Tensor:
    """Dense (b, h, s_q, s_k) map in the stored dtype; dropped entries are 0."""
    if not isinstance(sp, SparseProbs):
        raise TypeError(f"densify_probs expects a SparseProbs, got {type(sp).__name__}.")
    out = sp.values.new_zeros(sp.shape)
    if sp.kept == 0:
        return out
    if sp.counts is None:
        return out.scatter_(-1, sp.cols.long(), sp.values)
    s_k = sp.shape[-1]
    # row of every kept entry from the row counts: fixed shapes, no host sync (searchsorted on
    # the running count; repeat_interleave was ~1000x slower on CPU for small maps)
    ends = torch.cumsum(sp.counts.long(), 0)
    rows = torch.searchsorted(ends, torch.arange(sp.kept, device=ends.device), right=True)
    out.view(-1).index_put_((rows * s_k + sp.cols.long(),), sp.values)
    return out
