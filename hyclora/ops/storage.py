"""How a block keeps each buffered tensor: the storage policy of a ``layer_type``.

One code path for every layer type: the blocks call ``policy.keep(...)`` for each tensor they
need in the backward, and ``load.get(name)`` in the backward returns it (dequantised /
densified). Which tensors are kept at all (e.g. ``Q(X W)`` instead of ``Q(Y)`` and no SiLU
output for ``intra_inter``) is read from the policy's flags by the blocks.

Everything goes through a single ``ctx.save_for_backward`` call, so saved-tensor hooks
(memory measurement, offloading, non-reentrant checkpointing) see every byte; only non-tensor
metadata (shapes, bit widths, an index of names) sits on ``ctx``.
"""

from __future__ import annotations

import math
from collections import UserList
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from hyclora.ops import lora as _lora

COMPRESSING_TYPES = ("intra", "intra_inter", "intra_inter_full_fuse")
LAYER_TYPES = ("baseline",) + COMPRESSING_TYPES
PROBS_MODES = ("auto", "dense", "sparse", "recompute")


_QUANT = None


def _quant():
    global _QUANT
    if _QUANT is None:  # imported on first use (hyclora.quant imports nothing from ops)
        from hyclora import quant

        _QUANT = quant
    return _QUANT


# Storage layout of the compressed layer types, chosen by LoRA-gradient cosine on SmolLM2-135M
# (benchmarks/bench_fidelity.py; numbers in BENCHMARKS.md): each of the three below measurably
# raised the cosine, and together far more than their bytes would suggest.
#
# * Outlier ROWS: a few tokens (attention sinks, BOS) carry activations orders of magnitude
#   above the others; a per-channel range covering them leaves the other tokens a handful of
#   levels. The ``ceil(rows / ROW_OUTLIER_EVERY)`` rows of largest |x| are kept exactly and
#   swapped for an ordinary row before the range is taken (+1.6% bytes at 4 bits in bf16).
#   gate/up are exempt: the fused SwiGLU kernels (intra_inter_full_fuse) read their codes
#   directly and must see the same numerics as intra_inter.
# * Per-row groups of GROUP_SIZE for V, O and D (hyclora/quant/core.py docstring: more
#   accurate than per-channel ranges for these tensors; +1 bit per element on them).
# * The inputs of the NON-LINEAR operators at twice the bits (at most 8): the RMSNorm inputs
#   x_in / x_mid, Q and K (softmax) and G (SiLU). An error in what a non-linear backward reads
#   is propagated to every earlier layer, while the inputs of linear maps (V: the attention
#   output is linear in V; U: D = SiLU(G) * U is linear in U; the linears' own inputs) only
#   perturb their own layer's weight gradients (the paper's Fig. 2d makes the same split on
#   GSM8K accuracy). Measured on SmolLM2-135M, intra_inter, sdpa (LoRA-gradient cosine mean /
#   min): 4 bits 0.9789 / 0.8627 with only K doubled -> 0.9951 / 0.9561 with this set; 2 bits
#   0.448 -> 0.859. Together with renormalising x_in / x_mid instead of keeping the q/k/v and
#   gate/up inputs, the bytes per token grow by about a quarter (BENCHMARKS.md).
ROW_OUTLIER_EVERY = 256
ROW_OUTLIER_EXEMPT = frozenset({"gate", "up"})
GROUPED_TENSORS = frozenset({"v", "o", "hidden"})
GROUP_SIZE = 64
DOUBLE_BIT_TENSORS = frozenset({"x_in", "x_mid", "q", "k", "gate"})


class OutlierRows:
    """A quantised tensor plus a few rows kept exactly (``split`` picks them).

    ``tensors()``: the ``QuantizedTensor``'s entries, then the row indices (k,) int64 and the
    exact rows (k, N) in the input dtype."""

    __slots__ = ("quant", "idx", "vals", "cleaned")

    def __init__(self, quant, idx: torch.Tensor, vals: torch.Tensor, cleaned=None):
        self.quant, self.idx, self.vals, self.cleaned = quant, idx, vals, cleaned

    @staticmethod
    def split(x: torch.Tensor, clean: bool = True) -> Optional["OutlierRows"]:
        """Pick the rows of largest max |x|; ``cleaned`` is ``x`` with them replaced by the row
        of smallest max |x| (inside every channel's range, so they stop stretching it), or None
        with ``clean=False`` (frozen ranges: the rows cannot stretch them, their codes are
        clamped and never read since dequantisation overwrites them).
        None when there are too few rows for it to pay off."""
        x2d = x.detach().reshape(-1, x.shape[-1])
        n = x2d.shape[0]
        k = -(-n // ROW_OUTLIER_EVERY)
        if n < 2 * k + 1 or n < 16:
            return None
        with (_QUANT or _quant()).core.no_grad():
            lo, hi = torch.aminmax(x2d, dim=1)  # max |x| per row in one read, no |x| temporary
            score = torch.maximum(hi, lo.neg())
            idx = score.topk(k).indices
            if not clean:
                return OutlierRows(None, idx, x2d.index_select(0, idx), None)
            # index_select with a 1-element index tensor: x2d[score.argmin()] would read the 0-d
            # index on the host (one device sync per kept tensor)
            fill = x2d.index_select(0, score.argmin().view(1)).expand(k, -1)
            cleaned = x2d.index_copy(0, idx, fill)
        return OutlierRows(None, idx, x2d.index_select(0, idx), cleaned.reshape(x.shape))

    def tensors(self):
        return tuple(self.quant.tensors()) + (self.idx, self.vals)

    def meta(self):
        return self.quant.meta()

    @property
    def nbytes(self) -> int:
        return self.quant.nbytes + _nbytes(self.idx) + _nbytes(self.vals)

    @staticmethod
    def restore(tensors, meta) -> "OutlierRows":
        qt = _quant().QuantizedTensor.restore(tensors[:-2], meta)
        return OutlierRows(qt, tensors[-2], tensors[-1])

    def dequantize(self, backend: str = "auto") -> torch.Tensor:
        out = _quant().dequantize(self.quant, backend=backend)
        flat = out.reshape(-1, out.shape[-1]).index_copy(0, self.idx, self.vals.to(out.dtype))
        return flat.reshape(out.shape)


@dataclass(frozen=True)
class StoragePolicy:
    """Decides the storage of every buffered tensor of a block.

    * ``baseline``: everything as is (exact gradients).
    * ``intra``: every buffered activation quantised at ``bits`` (per channel; the norm inputs
      with exact outlier channels, via their ``ChannelStats``; plus exact outlier rows, per-row
      groups for V/O/D and 2x bits for the non-linear operators' inputs: see
      ``DOUBLE_BIT_TENSORS`` above), the eager softmax map
      recomputed (``probs_mode``);
      SiLU(G) and the Hadamard product D are stored quantised.
    * ``intra_inter`` (and ``intra_inter_full_fuse``, same numerics): as ``intra``, but the
      outputs of q/k/v and gate/up are kept as ``Q(X W)`` only and rebuilt as
      ``deq + s (X A) B`` in the backward; SiLU(G) and D are recomputed, never stored.
    """

    layer_type: str = "baseline"
    bits: int = 4
    softmax_ratio: float = 0.05
    backend: str = "auto"
    probs: str = "auto"
    double_bits: frozenset = DOUBLE_BIT_TENSORS  # names kept at 2 x bits (the decoder's set)

    def __post_init__(self):
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(
                f"hyclora: unknown layer_type {self.layer_type!r}; expected one of {', '.join(LAYER_TYPES)}"
            )
        if self.probs not in PROBS_MODES:
            raise ValueError(f"hyclora: probs={self.probs!r} is invalid; expected one of {', '.join(PROBS_MODES)}")
        # the flags below are read several times per block call: derive them once (host time)
        compress = self.layer_type != "baseline"
        flags = {
            "_compress": compress,
            "_reconstruct": self.layer_type.startswith("intra_inter"),
            "_fused": self.layer_type == "intra_inter_full_fuse",
            "_probs_mode": self.probs if self.probs != "auto" else ("recompute" if compress else "dense"),
            "_double": min(8, 2 * self.bits),
        }
        for key, value in flags.items():
            object.__setattr__(self, key, value)

    @property
    def probs_mode(self) -> str:
        """How the eager path keeps the attention map: ``dense`` (as is), ``sparse`` (top
        ``softmax_ratio`` of each row) or ``recompute`` (nothing; the backward recomputes it
        from the rebuilt Q/K, like the sdpa path). ``auto``: dense for baseline, recompute
        when compressing: measured on SmolLM2-135M (BENCHMARKS.md), the paper's 5% sparse map
        alone drops the worst LoRA-gradient cosine to 0.03 even at 8 bits, while recomputing
        costs one QK^T and softmax per layer in the backward and keeps no map at all."""
        return self._probs_mode

    @property
    def compress(self) -> bool:
        return self._compress

    @property
    def reconstruct(self) -> bool:
        """Keep only the base part of q/k/v/gate/up outputs and rebuild the LoRA part."""
        return self._reconstruct

    @property
    def fused(self) -> bool:
        """Run the SwiGLU epilogue through the fused kernels of ``hyclora.ops.fused_swiglu``
        (``intra_inter_full_fuse``: same numerics as ``intra_inter``, fewer passes)."""
        return self._fused

    @property
    def fused_backend(self) -> str:
        """Backend of the one-pass kernels that ``intra_inter_full_fuse`` runs where the other
        layer types run op-by-op torch code (RoPE, the RMSNorm renormalisation and dense-input
        backward): the policy's backend under full_fuse, ``"torch"`` (the reference ops) else."""
        return self.backend if self._fused else "torch"

    @property
    def lora_fused_backend(self) -> Optional[str]:
        """How the LoRA linears compute their rank-r terms: ``None`` op by op (PEFT's roundings;
        every layer type but full_fuse), else the backend of the fused LoRA ops
        (``intra_inter_full_fuse``: the one-rounding epilogue, and the kernels that read 16-bit
        activations with fp32 adapters; ``hyclora.ops.lora``). Unlike :attr:`fused_backend`,
        ``"torch"`` here still means the fused path (``addmm``), so the two differ.
        ``hyclora.ops.lora.FUSED_LORA_OPS = False`` turns the fused LoRA ops off everywhere."""
        return self.backend if self._fused and _lora.FUSED_LORA_OPS else None

    @property
    def store_elementwise(self) -> bool:
        """Store SiLU(G) and D (``intra``) instead of recomputing them from G and U."""
        return self.layer_type == "intra"

    def keep(self, store: "TensorStore", name: str, x: torch.Tensor, stats=None, update: bool = False,
             replay: bool = False):
        """Keep ``x`` for the backward.

        ``replay``: this is a checkpoint recompute of a forward that quantised ``x`` while its
        statistics were still calibrating; quantise it the same way (its own range, the outlier
        channels that forward chose) even if that forward has frozen the statistics since.
        """
        if not self._compress:
            store.plain(name, x)
            return
        q = _QUANT or _quant()
        bits = self.bits_for(name)
        rows = None
        if name not in ROW_OUTLIER_EXEMPT:
            # ranges taken from this tensor (groups, no or calibrating statistics, a replay)
            # need the rows out of the way; frozen per-channel ranges do not (fewer launches)
            own_range = name in GROUPED_TENSORS or stats is None or replay or not stats.frozen
            rows = OutlierRows.split(x, clean=own_range)
            if rows is not None and rows.cleaned is not None:
                x = rows.cleaned
        if name in GROUPED_TENSORS:
            # per-row groups: ranges come from the tensor itself, the channel stats are unused
            qt = q.quantize(x, bits, group_size=GROUP_SIZE, backend=self.backend)
        elif replay and stats is not None:
            idx = stats.outlier_idx.clone() if stats.num_outliers > 0 else None
            qt = q.quantize(x, bits, outlier_idx=idx, backend=self.backend)
        else:
            qt = q.quantize(x, bits, stats=stats, update=update, backend=self.backend)
        if rows is None:
            store.packed(name, "quant", qt)
        else:
            rows.quant = qt
            store.packed(name, "quant_rows", rows)

    def bits_for(self, name: str) -> int:
        """Code width of ``name``: ``bits``, doubled (at most 8) for the tensors of
        ``double_bits`` (``DOUBLE_BIT_TENSORS`` for the decoder blocks)."""
        return self._double if name in self.double_bits else self.bits

    def keep_probs(self, store: "TensorStore", name: str, probs: torch.Tensor):
        if self.probs_mode == "dense":
            store.plain(name, probs)
            return
        q = _quant()
        store.packed(name, "sparse", q.sparsify_probs(probs, self.softmax_ratio))


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Manifest(UserList):
    """What a block kept (one dict per kept name: ``name``, ``kind``, ``parts`` = ``(shape,
    dtype)`` of each stored tensor, ``nbytes``), built only when read.

    The block records the shapes and dtypes of what it saves (no tensor references, so nothing
    is kept alive); the dicts are made on first access, not on every training forward."""

    def __init__(self, initlist=None):  # as UserList (slicing, copy, + make new ones this way)
        self._raw, self._data = (), (list(initlist) if initlist is not None else [])

    @classmethod
    def lazy(cls, entries) -> "Manifest":
        """From ``[(name, kind, ((torch.Size, dtype), ...)), ...]``; dicts are made when read."""
        m = cls.__new__(cls)
        m._raw, m._data = entries, None
        return m

    @classmethod
    def joined(cls, manifests) -> "Manifest":
        """One manifest of several blocks' (the row chunks of one block), still lazy if they are."""
        manifests = list(manifests)
        if all(m._data is None for m in manifests):
            return cls.lazy([entry for m in manifests for entry in m._raw])
        return cls([entry for m in manifests for entry in m])

    @property
    def data(self):
        if self._data is None:
            self._data = [
                {"name": name, "kind": kind, "parts": [(tuple(shape), dtype) for shape, dtype in parts],
                 "nbytes": sum(math.prod(shape) * dtype.itemsize for shape, dtype in parts)}
                for name, kind, parts in self._raw
            ]
            self._raw = ()
        return self._data

    @data.setter
    def data(self, value):
        self._data, self._raw = value, ()


_PARAM_NAMES = tuple(f"p{i}" for i in range(64))  # "p<i>": the i-th Function input the backward reads


class TensorStore:
    """Collects what a block keeps, then saves it with one ``ctx.save_for_backward``."""

    __slots__ = ("_tensors", "_index", "_described")

    def __init__(self):
        self._tensors: List[Optional[torch.Tensor]] = []
        self._index: Dict[str, Tuple[str, int, int, object]] = {}
        self._described: list = []

    @property
    def manifest(self) -> Manifest:
        """Names, shapes, dtypes and bytes of what was kept (see :class:`Manifest`)."""
        return Manifest.lazy(self._described)

    def _add(self, name: str, kind: str, tensors, meta, describe: bool):
        index = self._index
        if name in index:
            raise RuntimeError(f"hyclora internal error: {name!r} saved twice")
        start = len(self._tensors)
        self._tensors.extend(tensors)
        index[name] = (kind, start, len(tensors), meta)
        if describe:
            self._described.append((name, kind, [(t.shape, t.dtype) for t in tensors if t is not None]))

    def plain(self, name: str, t: Optional[torch.Tensor], describe: bool = True):
        if name in self._index:
            raise RuntimeError(f"hyclora internal error: {name!r} saved twice")
        self._index[name] = ("plain", len(self._tensors), 1, None)
        self._tensors.append(t)
        if describe and t is not None:
            self._described.append((name, "plain", ((t.shape, t.dtype),)))

    def params(self, tensors, offset: int = 0):
        """Parameters and other inputs the backward reads (not activations; not described):
        ``tensors[j]`` under the name ``p<offset + j>``; :meth:`TensorLoad.param` reads them back
        by number."""
        index, start = self._index, len(self._tensors)
        for j in range(len(tensors)):
            name = _PARAM_NAMES[offset + j]
            if name in index:
                raise RuntimeError(f"hyclora internal error: {name!r} saved twice")
            index[name] = ("plain", start + j, 1, None)
        self._tensors.extend(tensors)

    def packed(self, name: str, kind: str, obj):
        self._add(name, kind, obj.tensors(), obj.meta(), True)

    def save(self, ctx):
        ctx.save_for_backward(*self._tensors)
        ctx.hyclora_index = self._index


class TensorLoad:
    """Backward-side view of a :class:`TensorStore`: ``get(name)`` restores one tensor."""

    __slots__ = ("_saved", "_index", "_backend")

    def __init__(self, ctx, backend: str = "auto"):
        self._saved = ctx.saved_tensors
        self._index = ctx.hyclora_index
        self._backend = backend

    def has(self, name: str) -> bool:
        return name in self._index

    def param(self, i: int) -> Optional[torch.Tensor]:
        """The tensor stored as ``p<i>`` (:meth:`TensorStore.params`)."""
        return self._saved[self._index[_PARAM_NAMES[i]][1]]

    def get_quantized(self, name: str):
        """The stored ``QuantizedTensor`` of ``name`` as is (codes, not dequantised), or its
        :class:`OutlierRows` when kept with exact rows, for fused kernels that read the codes."""
        kind, start, n, meta = self._index[name]
        tensors = self._saved[start : start + n]
        if kind == "quant":
            return _quant().QuantizedTensor.restore(tensors, meta)
        if kind == "quant_rows":
            return OutlierRows.restore(tensors, meta)
        raise RuntimeError(f"hyclora internal error: {name!r} was stored as {kind!r}, not quantised")

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` shares memory with a saved tensor (then it must not be written to)."""
        ptr = t.untyped_storage().data_ptr()
        return any(s is not None and s.untyped_storage().data_ptr() == ptr for s in self._saved)

    def get(self, name: str) -> Optional[torch.Tensor]:
        entry = self._index.get(name)
        if entry is None:
            return None
        kind, start, n, meta = entry
        if kind == "plain":
            return self._saved[start]
        tensors = self._saved[start : start + n]
        q = _QUANT or _quant()
        if kind == "quant":
            return q.dequantize(q.QuantizedTensor.restore(tensors, meta), backend=self._backend)
        if kind == "quant_rows":
            return OutlierRows.restore(tensors, meta).dequantize(self._backend)
        if kind == "sparse":
            return q.densify_probs(q.SparseProbs.restore(tensors, meta))
        raise RuntimeError(f"hyclora internal error: unknown storage kind {kind!r}")


__all__ = ["StoragePolicy", "TensorStore", "TensorLoad", "Manifest", "LAYER_TYPES", "COMPRESSING_TYPES"]
