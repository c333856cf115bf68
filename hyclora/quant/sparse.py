"""Sparse storage of attention probabilities for the eager attention backward.

Kept: the ``k = ceil(ratio * s_k)`` largest probabilities of EVERY query row (fixed k per row),
values in the input dtype and column indices as int16 (int32 when s_k > 32767). Dropped entries
come back as exact zeros; the backward uses the pruned map for both grad_V and the softmax
backward. Cost per kept entry: 4 bytes (bf16 + int16) against the reference's 10 (bf16 + int64
COO) — at ratio 0.05 about 0.2 byte per map element, 10x less than the dense bf16 map.

Per row with masked entries counted in s_k is the provisional choice (fixed shapes, no host
sync); the measurement deciding it is ``benchmarks/quant_fidelity.py --sparse``.

No host sync, fixed shapes: ``torch.topk`` along the last dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import SUPPORTED_DTYPES


def _index_dtype(s_k: int) -> torch.dtype:
    return torch.int16 if s_k <= torch.iinfo(torch.int16).max else torch.int32


def keep_per_row(s_k: int, ratio: float) -> int:
    """How many entries of a row of length ``s_k`` are kept at ``ratio``."""
    return min(s_k, math.ceil(ratio * s_k - 1e-9))


class SparseProbs:
    """Top-k per row of a (b, h, s_q, s_k) probability map: values + compact column indices."""

    NUM_TENSORS = 2
    __slots__ = ("values", "indices", "shape")

    def __init__(self, values: Tensor, indices: Tensor, shape):
        self.values = values
        self.indices = indices
        self.shape = torch.Size(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def tensors(self):
        return (self.values, self.indices)

    def meta(self):
        return tuple(self.shape)

    @staticmethod
    def restore(tensors, meta) -> "SparseProbs":
        tensors = tuple(tensors)
        if len(tensors) != SparseProbs.NUM_TENSORS:
            raise ValueError(f"SparseProbs.restore needs (values, indices), got {len(tensors)} tensors.")
        return SparseProbs(tensors[0], tensors[1], meta)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __repr__(self) -> str:
        return (f"SparseProbs(shape={tuple(self.shape)}, kept/row={self.values.shape[-1]}, "
                f"dtype={self.dtype}, nbytes={self.nbytes})")


def sparsify_probs(p: Tensor, ratio: float) -> SparseProbs:
    """Keep the ``ceil(ratio * s_k)`` largest entries of every row of ``p`` (b, h, s_q, s_k)."""
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
            f"ratio={ratio!r} is invalid: use the fraction of entries to keep per row, in [0, 1] "
            f"(HyCLoRAConfig.softmax_outlier_ratio)."
        )
    s_k = p.shape[-1]
    k = keep_per_row(s_k, float(ratio))
    with torch.no_grad():
        p = p.detach()
        if k == 0:
            values = p.new_empty(*p.shape[:-1], 0)
            idx = torch.empty(*p.shape[:-1], 0, dtype=_index_dtype(s_k), device=p.device)
        else:
            values, idx = torch.topk(p, k, dim=-1, sorted=False)
            idx = idx.to(_index_dtype(s_k))
    return SparseProbs(values, idx, p.shape)


def densify_probs(sp: SparseProbs) -> Tensor:
    """Dense (b, h, s_q, s_k) map in the stored dtype; dropped entries are 0."""
    if not isinstance(sp, SparseProbs):
        raise TypeError(f"densify_probs expects a SparseProbs, got {type(sp).__name__}.")
    out = sp.values.new_zeros(sp.shape)
    if sp.values.shape[-1] > 0:
        out.scatter_(-1, sp.indices.long(), sp.values)
    return out
