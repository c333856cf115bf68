"""Buffered-activation accounting: what autograd keeps alive between forward and backward.

Two independent measurements, neither relying on hyclora's own bookkeeping:

* ``measure_saved_tensors`` wraps one forward in ``torch.autograd.graph.saved_tensors_hooks``
  and records every tensor autograd stores for the backward (built-in ops and custom Functions'
  ``save_for_backward`` alike). Storages are deduplicated (q/k/v all saving the same input
  count once), and parameters (frozen or trainable weights) are excluded: they are not
  activations. Each byte is attributed to the decoder layer that was running when it was saved.
* On CUDA, ``allocator_delta`` reads ``torch.cuda.memory_allocated`` before and after each
  decoder layer's forward; what a layer leaves allocated, minus its output, is what it buffers.

* ``measure_live_peak`` / ``track_live_tensors`` (any device, CPU included): a
  ``TorchDispatchMode`` that sees every tensor an aten op allocates during a forward+backward
  and follows each new storage until it is freed, giving the peak of *live* tensor bytes (what
  ``max_memory_allocated`` measures on CUDA, minus allocator rounding and workspaces) and a
  snapshot of the largest tensors alive at that peak, with the op, the phase (forward /
  backward) and the decoder layer that created them.

``theoretical_bytes_per_token`` gives the analytic count of the bytes a decoder layer keeps
per token for each layer_type and q_bit (the HyC-LoRA paper's Table 9 counting rule, extended
with the small tensors the paper leaves out).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch

OTHER = "other"


def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
        return (t.device.type, t.device.index, id(t)), t.numel() * t.element_size()


@dataclass
class SavedTensorReport:
    """Bytes of buffered activations per region (decoder layer index or ``"other"``)."""

    per_region: Dict[object, int] = field(default_factory=dict)
    tensors_per_region: Dict[object, int] = field(default_factory=dict)
    details: Dict[object, List[tuple]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.per_region.values())

    def layer_bytes(self) -> List[int]:
        return [v for k, v in sorted(
            ((k, v) for k, v in self.per_region.items() if k != OTHER), key=lambda kv: kv[0])]

    @property
    def mean_layer_bytes(self) -> float:
        layers = self.layer_bytes()
        return sum(layers) / max(len(layers), 1)


def find_decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The repeated blocks of a transformers model (``...layers`` / ``...layer`` ModuleList)."""
    best: List[torch.nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "layer", "h"):
            if len(module) > len(best):
                best = list(module)
    if not best:
        raise ValueError(
            "Could not find the decoder layers of this model (a ModuleList named 'layers', "
            "'layer' or 'h'); pass layers=... explicitly."
        )
    return best


@contextlib.contextmanager
def _region_tracker(layers: Iterable[torch.nn.Module]):
    current: List[object] = [OTHER]
    handles = []
    for index, layer in enumerate(layers):
        def pre(_module, _args, index=index):
            current.append(index)

        def post(_module, _args, _output):
            current.pop()

        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    try:
        yield current
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def count_saved_tensors(
    model: torch.nn.Module,
    layers: Optional[List[torch.nn.Module]] = None,
    keep_details: bool = False,
):
    """Context manager: every tensor autograd saves inside it is counted in the yielded report.

    Storages are counted once; parameters (and tensors sharing their storage) are skipped.
    Usable around any training step (e.g. from a Trainer callback).
    """
    layers = find_decoder_layers(model) if layers is None else layers
    param_storages = {_storage_key(p)[0] for p in model.parameters()}
    seen = set()
    report = SavedTensorReport()

    with _region_tracker(layers) as current:
        def pack(t: torch.Tensor):
            key, nbytes = _storage_key(t)
            if isinstance(t, torch.nn.Parameter) or key in param_storages or key in seen:
                return t
            seen.add(key)
            region = current[-1]
            report.per_region[region] = report.per_region.get(region, 0) + nbytes
            report.tensors_per_region[region] = report.tensors_per_region.get(region, 0) + 1
            if keep_details:
                report.details.setdefault(region, []).append((tuple(t.shape), t.dtype, nbytes))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield report
    for index in range(len(layers)):
        report.per_region.setdefault(index, 0)


def measure_saved_tensors(
    model: torch.nn.Module,
    run_forward: Callable[[], torch.Tensor],
    layers: Optional[List[torch.nn.Module]] = None,
    keep_details: bool = False,
):
    """Run ``run_forward()`` (which must return the loss) and count what autograd saved.

    Returns ``(loss, SavedTensorReport)``. The graph is alive when this returns: call
    ``loss.backward()`` afterwards if gradients are wanted.
    """
    with count_saved_tensors(model, layers, keep_details) as report:
        loss = run_forward()
    return loss, report


def allocator_delta(
    model: torch.nn.Module,
    run_forward: Callable[[], torch.Tensor],
    layers: Optional[List[torch.nn.Module]] = None,
):
    """CUDA only: bytes each decoder layer leaves allocated after its forward (minus its output).

    Returns ``(loss, {layer_index: bytes})``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("allocator_delta needs CUDA; use measure_saved_tensors on the CPU.")
    layers = find_decoder_layers(model) if layers is None else layers
    deltas: Dict[int, int] = {}
    before: Dict[int, int] = {}
    handles = []
    for index, layer in enumerate(layers):
        def pre(_module, _args, index=index):
            before[index] = torch.cuda.memory_allocated()

        def post(_module, _args, output, index=index):
            out = output[0] if isinstance(output, (tuple, list)) else output
            out_bytes = out.numel() * out.element_size() if torch.is_tensor(out) else 0
            deltas[index] = torch.cuda.memory_allocated() - before[index] - out_bytes

        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    try:
        loss = run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return loss, deltas


# -- live tensor bytes (peak memory on any device) ---------------------------------------------


@dataclass(frozen=True)
class LiveTensor:
    """One storage alive at the peak: bytes, the shape/dtype of the tensor that created it, the
    aten op, and where it was created (``phase``: ``fwd``/``bwd``; ``region``: decoder layer
    index or ``"other"``; ``tag``: the tracker's user tag at that moment)."""

    nbytes: int
    shape: tuple
    dtype: torch.dtype
    op: str
    phase: str
    region: object
    tag: Optional[str] = None


@dataclass
class LivePeakReport:
    """What :func:`track_live_tensors` saw. Bytes count only storages created inside the tracker
    (weights, parameters and anything allocated before it are the "static" part)."""

    peak_bytes: int = 0
    peak_op: str = ""
    peak_phase: str = ""
    peak_region: object = None
    peak_tag: Optional[str] = None
    end_bytes: int = 0
    ops: int = 0
    at_peak: List[LiveTensor] = field(default_factory=list)
    # storages created inside the tracker and still alive when it closed (leaks, gradients)
    at_end: List[LiveTensor] = field(default_factory=list)
    # max live bytes while ops of each (phase, region) ran
    per_phase_peak: Dict[tuple, int] = field(default_factory=dict)
    # max live bytes while ops ran under each tracker tag (None: untagged)
    per_tag_peak: Dict[Optional[str], int] = field(default_factory=dict)

    def top(self, n: int = 10) -> List[LiveTensor]:
        return sorted(self.at_peak, key=lambda t: -t.nbytes)[:n]

    def grouped(self, key: Callable[[LiveTensor], object] = lambda t: (t.phase, t.region)) -> Dict[object, int]:
        """Bytes alive at the peak, summed per ``key`` (default: creating phase and layer)."""
        out: Dict[object, int] = {}
        for t in self.at_peak:
            k = key(t)
            out[k] = out.get(k, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self, n: int = 12) -> str:
        lines = [f"peak {format_bytes(self.peak_bytes)} at {self.peak_op} ({self.peak_phase}, region "
                 f"{self.peak_region}{', ' + self.peak_tag if self.peak_tag else ''}); "
                 f"{len(self.at_peak)} storages alive; {format_bytes(self.end_bytes)} alive at the end"]
        lines.append("alive at the peak by (phase, region) of creation:")
        for k, v in list(self.grouped().items())[:n]:
            lines.append(f"  {str(k):24s} {format_bytes(v)}")
        lines.append("largest tensors alive at the peak:")
        for t in self.top(n):
            lines.append(f"  {format_bytes(t.nbytes):>10s} {str(tuple(t.shape)):22s} {str(t.dtype):15s} "
                         f"{t.op:40s} {t.phase} {t.region}{' ' + t.tag if t.tag else ''}")
        return "\n".join(lines)


def _live_dispatch_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _LiveTensorMode(TorchDispatchMode):
        def __init__(self, report: LivePeakReport, region: List[object], snapshot: bool):
            super().__init__()
            self.report = report
            self.region = region
            self.snapshot = snapshot
            self.tag: Optional[str] = None
            self.live: Dict[int, LiveTensor] = {}
            self.current = 0
            self._finalizers = []

        def _free(self, key: int) -> None:
            info = self.live.pop(key, None)
            if info is not None:
                self.current -= info.nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            report = self.report
            report.ops += 1
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if not outs:
                return out
            inputs = set()
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    try:
                        inputs.add(id(t.untyped_storage()))
                    except (RuntimeError, NotImplementedError):
                        pass
            phase = "bwd" if torch._C._current_graph_task_id() != -1 else "fwd"
            region = self.region[-1]
            grew = False
            for t in outs:
                if t.device.type == "meta":
                    continue
                try:
                    storage = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                key = id(storage)
                # views and in-place/out= results share an input's storage: not an allocation
                if key in inputs or key in self.live:
                    continue
                nbytes = storage.nbytes()
                if nbytes == 0:
                    continue
                self.live[key] = LiveTensor(nbytes, tuple(t.shape), t.dtype, str(func.overloadpacket.__name__),
                                            phase, region, self.tag)
                self.current += nbytes
                self._finalizers.append(weakref.finalize(storage, self._free, key))
                grew = True
            slot = (phase, region)
            if self.current > report.per_phase_peak.get(slot, -1):
                report.per_phase_peak[slot] = self.current
            if self.current > report.per_tag_peak.get(self.tag, -1):
                report.per_tag_peak[self.tag] = self.current
            if grew and self.current > report.peak_bytes:
                report.peak_bytes = self.current
                report.peak_op = str(func.overloadpacket.__name__)
                report.peak_phase, report.peak_region, report.peak_tag = phase, region, self.tag
                if self.snapshot:
                    report.at_peak = list(self.live.values())
            if len(self._finalizers) > 4096:
                self._finalizers = [f for f in self._finalizers if f.alive]
            return out

        def close(self) -> None:
            self.report.end_bytes = self.current
            self.report.at_end = list(self.live.values())
            for f in self._finalizers:
                f.detach()
            self._finalizers = []

    return _LiveTensorMode


@contextlib.contextmanager
def track_live_tensors(
    model: Optional[torch.nn.Module] = None,
    layers: Optional[List[torch.nn.Module]] = None,
    snapshot: bool = True,
):
    """Context manager yielding a tracker whose ``.report`` (:class:`LivePeakReport`) holds the
    peak of live tensor bytes allocated by aten ops inside the context, forward and backward.

    Every op output whose storage is new (not an input's: views, in-place and ``out=`` results
    are not allocations) is added once per storage, and subtracted when the storage is freed
    (``weakref.finalize`` on the storage). Storages created before the context are not counted.
    ``model`` (or ``layers``) attributes each allocation to the decoder layer running it
    (checkpoint recomputes included); ``tracker.tag = "..."`` labels what follows. With
    ``snapshot`` the storages alive at the peak are kept in ``report.at_peak``. Runs on any
    device; ops in other threads (e.g. CUDA autograd worker threads) are seen because torch
    propagates the dispatch mode to the autograd engine.
    """
    report = LivePeakReport()
    mode_cls = _live_dispatch_mode_class()
    if layers is None and model is not None:
        layers = find_decoder_layers(model)
    tracker_ctx = _region_tracker(layers) if layers else contextlib.nullcontext([OTHER])
    with tracker_ctx as current:
        mode = mode_cls(report, current, snapshot)
        try:
            with mode:
                yield mode
        finally:
            mode.close()


def measure_live_peak(
    run: Callable[[], object],
    model: Optional[torch.nn.Module] = None,
    layers: Optional[List[torch.nn.Module]] = None,
    snapshot: bool = True,
):
    """Run ``run()`` (e.g. a forward + ``loss.backward()``) under :func:`track_live_tensors`.

    Returns ``(result, LivePeakReport)``. The CPU counterpart of ``max_memory_allocated`` minus
    what was allocated before.
    """
    with track_live_tensors(model, layers, snapshot) as tracker:
        result = run()
    return result, tracker.report


# -- theory ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder layer that decide its buffered bytes."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    lora_rank: int = 0
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    features: tuple = ()  # optional parts of the tensor table the layer has (Gemma's post-norms)
    double_bits: tuple = ()  # tensors its architecture keeps at twice q_bit beyond the table's

    @classmethod
    def from_config(cls, config, lora_rank: int = 0, lora_targets: Optional[Iterable[str]] = None):
        """``lora_targets`` default: every linear module of the layer (a fused projection such as
        Phi-3's ``qkv_proj`` is one module and keeps one ``X A``). The features and extra
        double-bit tensors come from the architecture's spec."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        spec = _spec_of(config)
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            lora_rank=lora_rank,
            lora_targets=tuple(lora_targets) if lora_targets is not None else _linear_modules(config),
            features=spec.features if spec is not None else (),
            double_bits=spec.double_bits if spec is not None else (),
        )

    @property
    def dims(self) -> Dict[str, int]:
        """The sizes by width key of :mod:`hyclora.ops.tensor_specs`."""
        return {"hidden": self.hidden, "q_heads": self.num_heads * self.head_dim,
                "kv_heads": self.num_kv_heads * self.head_dim, "d_ff": self.intermediate}


def _spec_of(config):
    """The registered architecture spec of ``config``'s model type, or None."""
    from .models import get_adapter

    try:
        return get_adapter(getattr(config, "model_type", None)).spec
    except ValueError:  # not a registered model type: the Llama layout
        return None


def _linear_modules(config) -> tuple:
    """The module names of a decoder layer's linears: the Llama seven, or for an architecture with
    fused projections (its spec's ``fused_projections``) each fused module once."""
    spec = _spec_of(config)
    if spec is None or not spec.fused_projections:
        return LayerShape.lora_targets
    return tuple(dict.fromkeys(path.rsplit(".", 1)[-1] for _, path in spec.linears))


def _packed_bytes(width: int, bits: int) -> float:
    return math.ceil(width * bits / 8)


def _compressed_bytes(spec, width: int, rows: int, q_bit: int, dtype_bytes: int, double: tuple = ()) -> float:
    """Bytes of one tensor as :class:`hyclora.ops.storage.StoragePolicy` keeps it (its row of
    :mod:`hyclora.ops.tensor_specs`): packed codes, fp32 range parameters (per channel, or per
    row group), and the exact outlier rows."""
    from .ops.tensor_specs import GROUP_SIZE, outlier_row_count

    total = rows * _packed_bytes(width, _bits(spec, q_bit, double))
    if spec.grouped:
        total += rows * math.ceil(width / GROUP_SIZE) * 8
    else:
        total += 8 * width
    if spec.row_outliers:
        k_rows = outlier_row_count(rows)
        total += k_rows * 8 + k_rows * width * dtype_bytes
    return total


def _bits(spec, q_bit: int, double: tuple = ()) -> int:
    return min(8, 2 * q_bit) if spec.double_bits or spec.name in double else q_bit


def _kept_tensors(shape: LayerShape, layer_type: str, attention: str, probs: str):
    """``([(TensorSpec, width), ...], keeps_map)``: every per-token tensor a decoder layer keeps
    (the table's quantised activations and those of the layer's features; kept as is by
    ``baseline``), and whether the eager attention map is kept."""
    from .ops.tensor_specs import DECODER, kept_activations, tensor_widths

    keeps_map = attention == "eager" and probs != "recompute"
    widths = tensor_widths(DECODER, shape.dims)
    kept = kept_activations(DECODER, layer_type, keeps_map, shape.features)
    return [(s, widths[s.name]) for s in kept], keeps_map


def _norm_stats_per_token(features: tuple = ()) -> int:
    """fp32 values per token the decoder's norms keep beside their inputs (one rstd each)."""
    from .ops.tensor_specs import DECODER, NORM_STAT, family_specs, has_feature

    return sum(1 for s in family_specs(DECODER).values() if s.role == NORM_STAT and has_feature(s, features))


def theoretical_layer_bytes(
    shape: LayerShape,
    batch: int,
    seq: int,
    layer_type: str,
    q_bit: int = 4,
    *,
    attention: str = "sdpa",
    probs: str = "auto",
    dtype_bytes: int = 2,
    lora_dtype_bytes: Optional[int] = None,
    layernorm_outlier_ratio: float = 0.005,
    softmax_outlier_ratio: float = 0.05,
) -> float:
    """Bytes one patched decoder layer keeps for the backward in one training step.

    The count follows the tensors hyclora's blocks save (see ``hyclora.ops.blocks``): per token
    the quantised activations (``ceil(width * q_bit / 8)`` bytes each), the exact outlier
    columns of both norm inputs, two fp32 rstd values and the ``X A`` of every LoRA linear;
    per step the fp32 range parameters (8 bytes per quantised channel) and outlier indices;
    the eager map when it is stored. Tensors shared by all layers (RoPE cos/sin, the mask)
    are not included. ``probs="auto"`` means dense for baseline and recompute otherwise.
    """
    tokens = batch * seq
    compress = layer_type != "baseline"
    if probs == "auto":
        probs = "recompute" if compress else "dense"
    lora_w = dtype_bytes if lora_dtype_bytes is None else lora_dtype_bytes
    kept, keeps_map = _kept_tensors(shape, layer_type, attention, probs)
    k = math.floor(shape.hidden * layernorm_outlier_ratio)
    total = 0.0
    for spec, width in kept:
        if not compress:
            total += tokens * width * dtype_bytes
            continue
        total += _compressed_bytes(spec, width, tokens, q_bit, dtype_bytes, shape.double_bits)
        if spec.outlier_channels and k:
            total += tokens * k * dtype_bytes + 8 * k
    total += tokens * _norm_stats_per_token(shape.features) * 4
    if shape.lora_rank:
        total += tokens * len(shape.lora_targets) * shape.lora_rank * lora_w
    if keeps_map:
        heads = shape.num_heads
        if probs == "dense":
            total += batch * heads * seq * seq * dtype_bytes
        else:  # sparse: values + int16 columns per kept entry, plus per-row counts
            kept_entries = math.floor(batch * heads * seq * seq * softmax_outlier_ratio)
            total += kept_entries * (dtype_bytes + 2) + batch * heads * seq * 2
    return total


def theoretical_bytes_per_token(
    shape: LayerShape,
    layer_type: str,
    q_bit: int = 16,
    *,
    dtype_bytes: int = 2,
    layernorm_outlier_ratio: float = 0.005,
    attention: str = "sdpa",
    include_small: bool = True,
) -> float:
    """Per-token part of :func:`theoretical_layer_bytes` (large sequences: per-step constants
    and the attention map excluded). ``include_small=False`` gives the paper's count: only the
    quantised (b, s, width) tensors."""
    compress = layer_type != "baseline"
    kept, _ = _kept_tensors(shape, layer_type, attention, "recompute" if compress else "dense")
    big = sum((_packed_bytes(w, _bits(s, q_bit, shape.double_bits)) if compress else w * dtype_bytes) for s, w in kept)
    if attention == "eager" and not compress:
        big += shape.num_heads * shape.head_dim * dtype_bytes  # o, kept beside the dense map
    if not include_small:
        return float(big)
    small = _norm_stats_per_token(shape.features) * 4 + len(shape.lora_targets) * shape.lora_rank * dtype_bytes
    if compress:
        norm_inputs = sum(1 for s, _ in kept if s.outlier_channels)
        small += norm_inputs * math.floor(shape.hidden * layernorm_outlier_ratio) * dtype_bytes
    return float(big + small)


def graph_pool_free_bytes(device: Optional[torch.device] = None) -> int:
    """Bytes that private memory pools (CUDA graphs) hold but the allocator counts as free.

    After a capture, the tensors a graph saved for its backward and its scratch are freed in
    the allocator's books, yet every replay writes and reads that memory: it is in use whenever
    the graphs run, and ``torch.cuda.max_memory_allocated`` does not see it. Add this to the
    allocated peak of a step that replays graphs to get what the step really holds. 0 without
    CUDA. Reads the allocator's segment list (``torch.cuda.memory_snapshot``): call it when
    ``memory_reserved`` changed, not every step."""
    if not torch.cuda.is_available():
        return 0
    index = None if device is None else torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    try:  # without the allocation history a user may be recording (large)
        segments = torch.cuda.memory_snapshot(include_traces=False)
    except TypeError:  # torch releases before the include_traces argument
        segments = torch.cuda.memory_snapshot()
    return sum(seg["total_size"] - seg["allocated_size"] for seg in segments
               if seg.get("device", index) == index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


__all__ = [
    "SavedTensorReport",
    "measure_saved_tensors",
    "count_saved_tensors",
    "allocator_delta",
    "LiveTensor",
    "LivePeakReport",
    "track_live_tensors",
    "measure_live_peak",
    "find_decoder_layers",
    "LayerShape",
    "theoretical_bytes_per_token",
    "theoretical_layer_bytes",
    "format_bytes",
    "graph_pool_free_bytes",
]
