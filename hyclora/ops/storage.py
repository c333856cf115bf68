"""How a block keeps each buffered tensor: the storage policy of a ``layer_type``.

One code path for every layer type: the blocks call ``policy.keep(...)`` for each tensor they
need in the backward, and ``load.get(name)`` in the backward returns it (dequantised /
densified). Which tensors are kept at all (e.g. ``Q(X W)`` instead of ``Q(Y)`` and no SiLU
output for ``intra_inter``) is read from the policy's flags by the blocks; how each tensor is
stored (bits, row groups, exact rows) is its row in :mod:`hyclora.ops.tensor_specs`.

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

from hyclora import quant as hq  # imports nothing from ops: no cycle
from hyclora.config import ATTENTION_PROBS as PROBS_MODES
from hyclora.config import LAYER_TYPES, S2_BLOCK_KERNELS
from hyclora.ops.lora import FusedLoRA
from hyclora.ops.tensor_specs import (DECODER, GROUP_SIZE, TensorSpec, double_bit_names, family_specs,
                                      outlier_row_count, tensor_spec)

COMPRESSING_TYPES = tuple(t for t in LAYER_TYPES if t != "baseline")


class OutlierRows:
    """A quantised tensor plus a few rows kept exactly (``split`` picks them).

    ``tensors()``: the ``QuantizedTensor``'s entries, then the row indices (k,) int64 and the
    exact rows (k, N) in the input dtype."""

    __slots__ = ("quant", "idx", "vals", "cleaned")

    def __init__(self, quant, idx: torch.Tensor, vals: torch.Tensor, cleaned=None):
        self.quant, self.idx, self.vals, self.cleaned = quant, idx, vals, cleaned

    @staticmethod
    def count(rows: int) -> int:
        """How many exact rows a tensor of ``rows`` rows keeps (the table's rule)."""
        return outlier_row_count(rows)

    @staticmethod
    def split(x: torch.Tensor, clean: bool = True) -> Optional["OutlierRows"]:
        """Pick the rows of largest max |x|; ``cleaned`` is ``x`` with them replaced by the row
        of smallest max |x| (inside every channel's range, so they stop stretching it), or None
        with ``clean=False`` (frozen ranges: the rows cannot stretch them, their codes are
        clamped and never read since dequantisation overwrites them).
        None when there are too few rows for it to pay off."""
        k = OutlierRows.count(x.numel() // x.shape[-1] if x.dim() else 1)
        if not k:
            return None
        with hq.core.no_grad():
            x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # no grad mode: no detach op needed
            # max |x| per row in one read and one kernel (the same values as max(hi, -lo) of aminmax)
            score = torch.linalg.vector_norm(x2d, ord=math.inf, dim=1)
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
        qt = hq.QuantizedTensor.restore(tensors[:-2], meta)
        return OutlierRows(qt, tensors[-2], tensors[-1])

    def dequantize(self, backend: str = "auto") -> torch.Tensor:
        out = hq.dequantize(self.quant, backend=backend)
        flat = out.reshape(-1, out.shape[-1]).index_copy(0, self.idx, self.vals.to(out.dtype))
        return flat.reshape(out.shape)


@dataclass(frozen=True)
class StoragePolicy:
    """Decides the storage of every buffered tensor of a block.

    * ``baseline``: everything as is (exact gradients).
    * ``intra``: every buffered activation quantised at ``bits`` (per channel, the norm inputs
      with exact outlier channels via their ``ChannelStats``; exact outlier rows, row groups and
      doubled bits as :mod:`hyclora.ops.tensor_specs` says for each tensor of ``family``), the
      eager softmax map recomputed (``probs_mode``); SiLU(G) and the Hadamard product D are
      stored quantised.
    * ``intra_inter`` (and ``intra_inter_full_fuse``, same numerics): as ``intra``, but the
      outputs of q/k/v and gate/up are kept as ``Q(X W)`` only and rebuilt as
      ``deq + s (X A) B`` in the backward; SiLU(G) and D are recomputed, never stored.
    """

    layer_type: str = "baseline"
    bits: int = 4
    softmax_ratio: float = 0.05
    backend: str = "auto"
    probs: str = "auto"
    family: str = DECODER  # whose rows of the tensor-spec table apply (decoder or encoder blocks)
    # kernel options: HyCLoRAConfig's fields of the same names
    fused_lora_ops: bool = True
    lora_kernels_min_tokens: Optional[int] = None
    s2_block_kernels: str = "auto"
    mlp_chunk_elements: int = 1 << 26
    # tensors an architecture keeps at twice the bits beyond its family's table rows
    # (ArchitectureSpec.double_bits: Gemma's up, measured on Gemma 3 270M)
    double_bits_extra: Tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config, under_graph_capture: bool = False, **overrides) -> "StoragePolicy":
        """The policy of a :class:`hyclora.config.HyCLoRAConfig`. ``under_graph_capture``: the
        layer is being warmed up / captured into a CUDA graph, whose replays launch nothing from
        the host, so the fused LoRA kernels run at any token count."""
        values = dict(
            layer_type=config.layer_type, bits=config.q_bit, softmax_ratio=config.softmax_outlier_ratio,
            backend=config.kernel_backend, probs=config.attention_probs, fused_lora_ops=config.fused_lora_ops,
            lora_kernels_min_tokens=0 if under_graph_capture else config.lora_kernels_min_tokens,
            s2_block_kernels=config.s2_block_kernels, mlp_chunk_elements=config.mlp_chunk_elements)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(
                f"hyclora: unknown layer_type {self.layer_type!r}; expected one of {', '.join(LAYER_TYPES)}"
            )
        if self.probs not in PROBS_MODES:
            raise ValueError(f"hyclora: probs={self.probs!r} is invalid; expected one of {', '.join(PROBS_MODES)}")
        if self.s2_block_kernels not in S2_BLOCK_KERNELS:
            raise ValueError(f"hyclora: s2_block_kernels={self.s2_block_kernels!r} is invalid; expected one of "
                             f"{', '.join(S2_BLOCK_KERNELS)}")
        specs = family_specs(self.family)
        for name in self.double_bits_extra:
            if name not in specs or not specs[name].quantised:
                raise ValueError(f"hyclora: double_bits_extra names {name!r}, which the {self.family} blocks do "
                                 "not quantise")
        # the flags below are read several times per block call: derive them once (host time)
        compress = self.layer_type != "baseline"
        flags = {
            "_specs": dict(specs),  # a dict: the policy is pickled with patched layers
            "_double_names": double_bit_names(self.family) | frozenset(self.double_bits_extra),
            "_compress": compress,
            "_reconstruct": self.layer_type.startswith("intra_inter"),
            "_fused": self.layer_type == "intra_inter_full_fuse",
            "_probs_mode": self.probs if self.probs != "auto" else ("recompute" if compress else "dense"),
            "_double": min(8, 2 * self.bits),
            "_fused_lora": (FusedLoRA(self.backend, self.lora_kernels_min_tokens)
                            if self.layer_type == "intra_inter_full_fuse" and self.fused_lora_ops else None),
        }
        for key, value in flags.items():
            object.__setattr__(self, key, value)

    @property
    def probs_mode(self) -> str:
        """How the eager path keeps the attention map: ``dense`` (as is), ``sparse`` (top
        ``softmax_ratio`` of each row) or ``recompute`` (nothing; the backward recomputes it
        from the rebuilt Q/K, like the sdpa path). ``auto``: dense for baseline, recompute
        when compressing: the paper's 5% sparse map alone ruins the worst LoRA gradients even at
        8 bits (BENCHMARKS.md), while recomputing costs one QK^T and softmax per layer in the
        backward and keeps no map at all."""
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
    def fused_lora(self) -> Optional[FusedLoRA]:
        """How the LoRA linears compute their rank-r terms: ``None`` op by op (PEFT's roundings;
        every layer type but full_fuse, or ``fused_lora_ops=False``), else the fused LoRA ops
        (``intra_inter_full_fuse``: the one-rounding epilogue, and the kernels that read 16-bit
        activations with fp32 adapters; :mod:`hyclora.ops.lora`)."""
        return self._fused_lora

    @property
    def store_elementwise(self) -> bool:
        """Store SiLU(G) and D (``intra``) instead of recomputing them from G and U."""
        return self.layer_type == "intra"

    def spec(self, name: str) -> TensorSpec:
        """The tensor-spec row of ``name`` for this policy's block family."""
        return self._specs.get(name) or tensor_spec(self.family, name)  # the latter raises, naming it

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
        spec = self.spec(name)
        bits = self._double if name in self._double_names else self.bits
        rows = None
        if spec.row_outliers:
            # ranges taken from this tensor (groups, no or calibrating statistics, a replay)
            # need the rows out of the way; frozen per-channel ranges do not (fewer launches)
            own_range = spec.grouped or stats is None or replay or not stats.frozen
            rows = OutlierRows.split(x, clean=own_range)
            if rows is not None and rows.cleaned is not None:
                x = rows.cleaned
        if spec.grouped:
            # per-row groups: ranges come from the tensor itself, the channel stats are unused
            qt = hq.quantize(x, bits, group_size=GROUP_SIZE, backend=self.backend)
        elif replay and stats is not None:
            idx = stats.outlier_idx.clone() if stats.num_outliers > 0 else None
            qt = hq.quantize(x, bits, outlier_idx=idx, backend=self.backend)
        else:
            # a refresh window gathers the next statistics (only ever with these flags: no view op else)
            if stats is not None and stats.frozen and update and stats.gathers:
                stats.observe(_rows(x), skip_rows=None if rows is None else rows.idx, update=update,
                              backend=self.backend)
            qt = hq.quantize(x, bits, stats=stats, update=update, backend=self.backend)
        if rows is None:
            store.packed(name, "quant", qt)
        else:
            rows.quant = qt
            store.packed(name, "quant_rows", rows)

    def bits_for(self, name: str) -> int:
        """Code width of ``name``: ``bits``, doubled (at most 8) where its tensor spec says so."""
        return self._double if name in self._double_names else self.bits

    def quant_params(self, x2d: torch.Tensor, stats, update: bool, replay: bool, name: Optional[str] = None,
                     observe: bool = True):
        """``(lo, step, inv_step, outlier_idx)`` that ``self.keep`` (i.e.
        :func:`hyclora.quant.quantize`) would use for ``x2d``, in the same order of statistics
        updates: frozen stats -> the cached parameters (and ``x2d`` observed by a refresh window,
        unless ``observe=False``: the caller observes it without its exact rows); calibrating ->
        outlier channels chosen (and
        scored) first, then this tensor's range, both merged into the stats when ``update``; a
        checkpoint replay of a calibrating forward -> the stored outlier set and this tensor's own
        range; no stats -> own range, no outliers. Outlier columns get lo = step = inv_step = 0."""
        bits = self.bits if name is None else self.bits_for(name)
        backend = self.backend
        with torch.no_grad():
            if stats is not None:
                stats.check_compatible(x2d)
                if stats.frozen and not replay:
                    if observe:
                        stats.observe(x2d, update=update, backend=backend)
                    return stats.frozen_params(bits)
            idx = None
            if stats is not None and stats.num_outliers > 0:
                idx = stats.outlier_idx.clone() if replay else stats.select_outliers(x2d, update=update)
            if stats is not None and not replay:
                lo, hi = stats.range_for(x2d, update=update, backend=backend)
            else:
                lo, hi = hq.core.column_minmax(x2d, backend)
            lo, step, inv = hq.core.affine_params(lo, hi, bits)
            if idx is not None:
                lo, step, inv = (t.index_fill(0, idx, 0.0) for t in (lo, step, inv))
            return lo, step, inv, idx

    def keep_probs(self, store: "TensorStore", name: str, probs: torch.Tensor):
        if self.probs_mode == "dense":
            store.plain(name, probs)
            return
        store.packed(name, "sparse", hq.sparsify_probs(probs, self.softmax_ratio))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(tokens, features)``, detached where grad mode is on (inside a block Function's
    forward it is off: no detach op)."""
    if torch.is_grad_enabled():
        x = x.detach()
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


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


# the index entry of TensorStore.params: ((offset, start, count, rows), ...), one span per call
# (one dict entry per block instead of one per parameter: host time on every block call)
_PARAMS = "p*"


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

    def params(self, tensors, offset: int = 0, rows: Optional[Dict[int, Tuple[int, int]]] = None):
        """Parameters and other inputs the backward reads (not activations; not described):
        ``tensors[j]`` under the name ``p<offset + j>``; :meth:`TensorLoad.param` reads them back
        by number. ``rows``: ``{offset + j: (start, stop)}`` of inputs the backward reads as those
        rows only (a fused linear's bias and ``B`` for one of its parts); the whole tensor is saved,
        so that it stays the Function's input (ZeRO-3 swaps ``param.data``)."""
        spans, count = self._index.get(_PARAMS, ()), len(tensors)
        for off, _, n, _ in spans:
            if off < offset + count and offset < off + n:
                raise RuntimeError(f"hyclora internal error: parameter p{max(off, offset)} saved twice")
        self._index[_PARAMS] = spans + ((offset, len(self._tensors), count, rows or None),)
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
        """The tensor stored as ``p<i>`` (:meth:`TensorStore.params`; its rows, if saved with some)."""
        spans = self._index[_PARAMS]
        off, start, n, rows = spans[0]  # one span per block: no loop in the common case
        if not off <= i < off + n:
            off, start, n, rows = next((sp for sp in spans if sp[0] <= i < sp[0] + sp[2]), (None,) * 4)
            if off is None:
                raise KeyError(f"p{i}")
        t = self._saved[start + i - off]
        part = rows.get(i) if rows is not None else None
        return t if part is None or t is None else t[part[0]:part[1]]

    def get_quantized(self, name: str):
        """The stored ``QuantizedTensor`` of ``name`` as is (codes, not dequantised), or its
        :class:`OutlierRows` when kept with exact rows, for fused kernels that read the codes."""
        kind, start, n, meta = self._index[name]
        tensors = self._saved[start : start + n]
        if kind == "quant":
            return hq.QuantizedTensor.restore(tensors, meta)
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
        if kind == "quant":
            return hq.dequantize(hq.QuantizedTensor.restore(tensors, meta), backend=self._backend)
        if kind == "quant_rows":
            return OutlierRows.restore(tensors, meta).dequantize(self._backend)
        if kind == "sparse":
            return hq.densify_probs(hq.SparseProbs.restore(tensors, meta))
        raise RuntimeError(f"hyclora internal error: unknown storage kind {kind!r}")


__all__ = ["StoragePolicy", "TensorStore", "TensorLoad", "Manifest", "OutlierRows", "LAYER_TYPES", "COMPRESSING_TYPES"]
