"""CUDA graphs of hyclora's compressed decoder layers (opt-in, CUDA only).

A hyclora training step with frozen statistics is host-bound: the Python bodies of the block
autograd Functions and ~1000 kernel launches per step cost more than the GPU work. Once every
layer's statistics are frozen, that work is the same every step, so it can be captured once as
CUDA graphs (one forward and one backward graph per decoder layer, through
:func:`graph_layer_chain`, a variant of ``torch.cuda.make_graphed_callables``) and replayed::

    from hyclora import HyCLoRAConfig, apply_hyclora
    from hyclora.cuda_graphs import graph_decoder_layers

    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=2))
    graphs = graph_decoder_layers(model)          # installs a dispatcher; captures lazily
    for batch in loader:                          # train as usual (own loop or HF Trainer)
        loss = model(**batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        loss = loss.detach()                      # no autograd graph alive into the next forward
    print(graphs.counts)                          # replays / captures / why calls ran eager
    graphs.remove()                               # before revert_hyclora(model)

What happens per decoder-layer call:

* **eager** (hyclora's own compressed forward, or the unpatched forward in eval / ``no_grad``)
  whenever the call is not graphable; ``graphs.counts`` counts each reason. Not graphable: eval
  mode or grad disabled, a gradient-checkpointing recompute (inside a backward), an
  ``attention_mask`` tensor (padding; the sdpa causal path passes ``None``; packed documents replay,
  see below), a KV cache that
  holds tokens, ``output_attentions``, extra positional arguments, another batch shape / dtype /
  ``requires_grad`` of the input than the captured one (``sample_shape`` pins the one shape to
  capture), an attention implementation other than ``sdpa`` / ``eager`` / S²-Attn
  (``hyclora_s2attn``), autocast state other
  than at capture, statistics that are still calibrating (the first calibration: the first forward with
  ``calibration="quick"``, the default, ``iteration_threshold`` with ``"eager"``) or that expire
  at this forward (``recalibrate_mode="reset"``), a previous graphed forward of the same layer whose backward has not
  run yet (e.g. two forwards, then one backward of their sum: the graph's saved activations are
  static buffers, a second replay would overwrite them), and anything the graph read that
  changed since capture (parameter storage, statistics buffers, the frozen quantisation
  parameters, PEFT adapter state, the ``HyCLoRAConfig`` knobs).
* **capture**: at the first decoder layer's training forward where every layer's statistics are
  frozen and none expires now, all layers are captured together (one memory pool, captured in
  the order they run), after ``num_warmup_iters`` eager warm-up iterations (these run Triton's
  autotuning and the capture stream's lazy initialisation before capture) of the first layer of
  each kind (``warm_up_layers="distinct"``, the default: layers of one class, configuration,
  parameter, buffer and input shapes run the same kernels; the others are captured without a
  warm-up of their own) or of every layer (``"all"``, as ``make_graphed_callables``). The
  warm-ups and the capture do not count as training forwards (the layer state's counter is not
  advanced) and use copies of the current batch. A capture happens inside the model's forward
  and costs about one eager step plus the warm-ups.
* **replay**: the host bookkeeping of a counted forward still runs once per call
  (``HyCLoRALayerState.count_forward``: counter, expiry of frozen statistics), then the
  forward graph replays; the backward graph replays in the backward.

Packed batches (``hyclora.data.PackedBatchCollator``, TRL's padding-free collator): the documents
reach the layers as ``cu_seq_lens_q`` (``hyclora.ops.attention.packed_documents`` reads it once
per step on the host to check it), and replay with it
as a fourth static input: a ``cu_seqlens`` buffer of fixed capacity (the collator pads it with the
total length), so micro-batches with other document boundaries replay the same graph. The
attention mask transformers may build beside it is not a graph input (it is checked to hide nothing
inside a document; a padding mask with packed documents is refused).

Recalibration (``recalibrate_every = N``): with ``recalibrate_mode="refresh"`` (the default) it
happens inside the graphs: each captured forward launches the statistics-gathering kernel of every
statistic, which reads a device flag and returns at once unless a refresh window is open
(``ChannelStats.observe``); at the end of the window the new parameters are written into the
tensors the graphs read, in place, between two steps. Nothing is released, re-captured or run
eager. With ``"reset"`` the statistics expire and the layers run eager while they calibrate
(``iteration_threshold`` forwards); the new frozen parameters are new tensors, so the graphs are
freed first (before the eager steps allocate) and captured again at the next eligible step
(``recapture=False``: freed and never captured again). Graphs are also freed and captured again
after ``model.to(...)``, ``load_state_dict`` of the statistics, or a change of the adapters.

NaN/Inf checks (``on_nonfinite="raise"``): the flags the blocks compute are captured into the
forward graph; each replay hands the layer's flags (recomputed by the replay) to the model's
deferred ``FiniteGuard``, which reads them once per step in the backward as in eager mode, with
the same error naming the earliest layer.

Refused with a clear error at :func:`graph_decoder_layers`: no CUDA device or layers not on it,
a model without hyclora-patched decoder layers, LoRA dropout > 0 (hyclora redraws the dropout
mask in the backward from a generator state read on the host, which a graph cannot capture),
DeepSpeed ZeRO-3 parameters (gathered per call). Every ``layer_type`` can be graphed
(``baseline`` layers keep their input for the backward, so they get one static input each).
Gradient checkpointing and active saved-tensor hooks (``hyclora.memory`` measurements) run
eager. Autocast with its weight cache enabled is refused at capture (``make_graphed_callables``
needs ``torch.autocast(..., cache_enabled=False)``).

Own training loops: release each step's autograd graph before the next forward (``loss =
loss.detach()`` after the backward, as the HF Trainer does). A graph kept alive, e.g. by the loss
variable until it is reassigned, keeps the parameters' gradient accumulators of the previous
step, tied to the default stream; a capture in the next forward then fails with "operation would
make the legacy stream depend on a capturing blocking stream" (seen in launch/longseq.py).

Gradients: the backward graphs write the LoRA gradients into static buffers that all layers of
one parameter layout share (only one backward replays at a time); each backward hands autograd
fresh copies, so ``.grad`` (or what ``torch.autograd.grad`` returns) never aliases a buffer the
next replay overwrites (PyTorch lets ``.grad`` steal an incoming gradient: pytorch/pytorch#181723).

Memory: the graphs of all layers share one pool, and the layers share their static inputs
(hidden states of compressing layer types, cos, sin), one incoming-gradient buffer and one
input-gradient buffer and one set of parameter-gradient buffers (:func:`graph_layer_chain`, our
variant of ``make_graphed_callables``, which keeps one of each per layer); compressing layers also
share one output buffer (that same input buffer). What stays per layer is what its backward reads,
as in an eager step (measure it: benchmarks/bench_whole_run.py).
After the capture, what the graphs saved for their backward lives in their pool as memory the
allocator counts as free, so ``torch.cuda.max_memory_allocated`` leaves it out
(``hyclora.memory.graph_pool_free_bytes`` gives it).

Outputs: the tensor a graphed layer returns is a static buffer. Compressing layers all write
their output into the one buffer the next layer reads its input from, so the next layer's replay
overwrites it; a layer with a forward hook (transformers' ``output_hidden_states`` records
through hooks) returns a copy instead. Clone an output you keep without a hook.
``copy.deepcopy`` of a graphed model is not supported (the copy's layers would dispatch to the
original's graphs): ``remove()`` first.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import warnings
import weakref
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from hyclora.models.adapter import adapter_state_key, in_backward_pass, kernels_for_graph_capture
from hyclora.models.api import patched_layers
from hyclora.models.peft_utils import is_zero3_param
from hyclora.ops.attention import packed_documents
from hyclora.ops.s2attn import S2ATTN_NAME
from hyclora.ops.tensor_specs import DECODER
from hyclora.quant.checks import FiniteGuard

__all__ = ["graph_decoder_layers", "DecoderLayerGraphs", "stats_ready", "GRAPHABLE_ATTENTION", "run_refusal"]

# eager with a None mask runs sdpa in hyclora's blocks; S²-Attn (LongLoRA) with a None mask (no
# padding) runs its shifted groups inside the blocks, from shapes only
GRAPHABLE_ATTENTION = ("sdpa", "eager", S2ATTN_NAME)
WARM_UP_LAYERS = ("all", "distinct")


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (torch.utils.checkpoint, hyclora.memory's
    measurement): a graphed layer saves nothing they could see or recompute."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _autocast_key():
    if torch.is_autocast_enabled("cuda"):
        return ("cuda", torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled())
    return None


def stats_ready(state) -> bool:
    """Whether a layer's next counted forward runs with frozen statistics: every statistic the
    layer uses is frozen now and none expires at this forward (``ChannelStats.note_counted_forward``
    resets a statistic whose ``_frozen_forwards + 1`` exceeds ``recalibrate_every``), and at least
    one is frozen. A statistic that was never calibrated (``count == 0`` and not frozen) is one
    this layer's path does not use (e.g. ``v`` / ``o`` of ``intra_inter_full_fuse`` with sdpa); a
    used one is never at 0 between two calls, since the forward that resets it also calibrates
    it. Layer types that keep no statistics (``baseline``) are always ready. Host state only."""
    stats = list(state.stats.values())
    if not stats:
        return True
    if any(s.calibrating or s.expires_at_next_forward() for s in stats):
        return False
    return any(s.frozen for s in stats)


class _CaptureGuard(FiniteGuard):
    """Stands in for the model's guard while a layer runs inside the graphed callable: keeps the
    device-side flags of the latest call (the capture is the latest call of
    the grapher; its flags are graph tensors that every replay recomputes), never
    reads them and never arms a hook."""

    def __init__(self):
        super().__init__()
        self.entries: List[Tuple[int, torch.Tensor, str, tuple, torch.dtype]] = []

    def add_flag(self, flag, where, *, order=0, shape=(), dtype=None) -> None:
        self.entries.append((order, flag, where, tuple(shape), dtype))  # kept, never read here

    @property
    def num_pending(self) -> int:
        return 0

    def raise_pending(self) -> None:
        return None

    def arm(self, y) -> bool:
        return False


def _push_flags(guard: FiniteGuard, entries) -> None:
    """Queue a replay's flags into the model's deferred guard (no host sync)."""
    for order, flag, where, shape, dtype in entries:
        guard.add_flag(flag, where, order=order, shape=shape, dtype=dtype)


class _LayerCallable(nn.Module):
    """What is graphed for one decoder layer: ``(hidden, cos, sin) -> output``, hyclora's
    compressed forward with no mask and no cache. Its parameters are the layer's, so
    the grapher returns their gradients. The layer state's ``count_forward`` is a
    paused inside (warm-ups and capture are not training forwards; the dispatcher counts each
    replay) and NaN/Inf checks record into a :class:`_CaptureGuard`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.capture_guard = _CaptureGuard()

    def forward(self, hidden, cos, sin, documents=None):
        layer = self.layer
        patch = layer._hyclora_patch
        state = layer.hyclora_state
        guard = patch.guard
        self.capture_guard.entries = []
        patch.guard = self.capture_guard  # also without a model guard: no host read in a capture
        state.counting = False
        try:
            return patch.adapter.compressed_forward(
                layer, patch, (hidden,), {"position_embeddings": (cos, sin), "attention_mask": None,
                                          "cu_seq_lens_q": documents})
        finally:
            patch.guard = guard
            state.counting = True


class _Captured:
    """One capture of all layers: the graphed callables and what each one read."""

    def __init__(self, key, callables, graphed, tensors, checks, linear_keys, config_knobs,
                 input_requires_grad, static_rope, rope_groups):
        self.key = key
        self.input_requires_grad = input_requires_grad  # per layer, as in the sample args
        self.callables = callables  # _LayerCallable per layer (their capture_guard.entries)
        self.graphed = graphed      # per layer: the graphed forward
        self.tensors = tensors      # per layer: what the graph reads (_layer_tensors)
        self.checks = checks        # per layer: (tensor storage pointers, stats caches)
        self.linear_keys = linear_keys
        self.config_knobs = config_knobs
        # per layer: its (cos, sin[, documents]) sample tensors, one set per group of layers that read
        # the same tables (rope_groups[i]: the group's first layer; Gemma 3's sliding and global
        # layers are two groups): a backward replay reads them, so no other table may overwrite them
        self.static_rope = static_rope
        self.rope_groups = rope_groups
        self.rope_source = {}  # group -> the (cos, sin, documents) its first layer's last replay copied from
        self.pending = [None] * len(graphed)  # per layer: weakref to the last replay's autograd node
        # the layers return one shared static buffer (graph_layer_chain), rewritten by the next layer
        self.shared_output = False


def _config_knobs(config):
    return (config.layer_type, config.q_bit, config.softmax_outlier_ratio, config.kernel_backend,
            getattr(config, "attention_probs", "auto"), config.on_nonfinite, config.compresses)


def _layer_tensors(layer: nn.Module):
    """The tensors a graph of ``layer`` reads in place (parameters and buffers: weights, LoRA,
    norms, statistics), its norm weights as the layer holds them (the adapter's spec says where),
    and its statistics."""
    tensors = tuple(layer.parameters()) + tuple(layer.buffers())
    norms = layer._hyclora_patch.adapter.norm_weights(layer)
    return tensors, norms, tuple(layer.hyclora_state.stats.values())


def _layer_storage(tensors, norms, stats):
    """What must not move for a graph of the layer to stay valid: the storage of every parameter
    and buffer, the norm weight objects (the linears' are in the adapter key), and the
    frozen-parameter caches of the statistics (``ChannelStats._param_cache`` is replaced, never
    changed in place, when the statistics change; ``.to()`` and ``load_state_dict`` replace it)."""
    return (tuple(t.data_ptr() for t in tensors), tuple(id(w) for w in norms),
            tuple(s.__dict__.get("_param_cache") for s in stats))


def _same_storage(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and len(a[2]) == len(b[2]) and all(x is y for x, y in zip(a[2], b[2]))


class DecoderLayerGraphs:
    """Dispatcher over a model's hyclora-patched decoder layers: eager, capture or replay per
    call (see the module docstring). Made by :func:`graph_decoder_layers`.

    Attributes:
        counts: ``collections.Counter`` of ``"replay"``, ``"capture"`` and ``"eager: <reason>"``.
        enabled: set ``False`` to run every call eager (graphs kept); ``True`` again to replay.
    """

    def __init__(self, model: nn.Module, *, sample_shape: Optional[Tuple[int, int]] = None,
                 num_warmup_iters: int = 1, recapture: bool = True, warm_up_layers: str = "distinct",
                 _grapher: Optional[Callable] = None):
        if sample_shape is not None:
            if (not isinstance(sample_shape, (tuple, list)) or len(sample_shape) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sample_shape)):
                raise ValueError(f"hyclora.cuda_graphs: sample_shape={sample_shape!r} is invalid: use "
                                 "(batch_size, seq_len) with positive ints, or None (the first batch's).")
            sample_shape = tuple(sample_shape)
        if isinstance(num_warmup_iters, bool) or not isinstance(num_warmup_iters, int) or num_warmup_iters < 1:
            raise ValueError(f"hyclora.cuda_graphs: num_warmup_iters={num_warmup_iters!r} is invalid: use an "
                             "int >= 1 (the warm-ups run Triton's autotuning before capture).")
        if warm_up_layers not in WARM_UP_LAYERS:
            raise ValueError(f"hyclora.cuda_graphs: warm_up_layers={warm_up_layers!r} is invalid: use one of "
                             f"{', '.join(map(repr, WARM_UP_LAYERS))}.")
        layers = patched_layers(model)
        if not layers:
            raise ValueError("hyclora.cuda_graphs: the model has no hyclora-patched decoder layers; call "
                             "apply_hyclora(model, HyCLoRAConfig(...)) first.")
        for name, layer in layers:
            if "_hyclora_graphs" in layer.__dict__:
                raise ValueError(f"hyclora.cuda_graphs: {name} is already graphed; call .remove() on the "
                                 "existing DecoderLayerGraphs first.")
            if layer._hyclora_patch.adapter.spec.family != DECODER or not hasattr(layer, "hyclora_state"):
                raise ValueError(f"hyclora.cuda_graphs: {name} ({type(layer).__name__}) is not a Llama-style "
                                 "decoder layer; only Llama/Mistral layers can be graphed.")
            _refuse_dropout(name, layer, training_only=False)
            for p in layer.parameters():
                if is_zero3_param(p):
                    raise ValueError(f"hyclora.cuda_graphs: {name} has DeepSpeed ZeRO-3 parameters (gathered per "
                                     "call); CUDA graphs need resident weights. Use ZeRO-0/1/2 or no graphs.")
            if _grapher is None:
                dev = layer.hyclora_state.forward_count.device
                if not torch.cuda.is_available() or dev.type != "cuda":
                    raise RuntimeError(
                        f"hyclora.cuda_graphs: CUDA graphs need the model on a CUDA device ({name} is on "
                        f"{dev}{'' if torch.cuda.is_available() else '; no CUDA device is available'}). "
                        "Move the model with model.to('cuda') first, or train without graphs.")
        self.model = model
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.sample_shape = sample_shape
        self.num_warmup_iters = num_warmup_iters
        self.warm_up_layers = warm_up_layers
        self.recapture = recapture
        self.enabled = True
        self.counts: collections.Counter = collections.Counter()
        self._grapher = _grapher or graph_layer_chain
        self._captured: Optional[_Captured] = None
        self._step_rope: List[Optional[tuple]] = [None] * len(self.layers)  # this step's tables per layer
        self._rope_groups: Optional[List[int]] = None  # per layer: the first layer reading the same tables
        self._given_up = False  # recapture=False after the first invalidation
        self._eager: List[Callable] = []
        self._removed = False
        for i, layer in enumerate(self.layers):
            eager = layer.forward  # hyclora's bound _patched_forward (or what wraps it)
            self._eager.append(eager)
            # what remove() puts back: the instance forward there was, or none (the class's)
            layer.__dict__["_hyclora_graphs"] = (self, layer.__dict__.get("forward"))
            layer.forward = _make_forward(self, i)

    # -- public -------------------------------------------------------------------------------
    @property
    def captured(self) -> bool:
        """Whether graphs are captured now."""
        return self._captured is not None

    def release(self) -> None:
        """Free the captured graphs (the next eligible step captures again)."""
        cap, self._captured = self._captured, None
        if cap is not None:
            del cap
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    def summary(self) -> str:
        """One line for the end of a run: replayed layer calls, captures, eager calls by reason."""
        counts = self.counts
        eager = {k[len("eager: "):]: v for k, v in counts.items() if k.startswith("eager: ")}
        return (f"CUDA graphs: {counts.get('replay', 0)} decoder-layer calls replayed, {counts.get('capture', 0)} "
                f"capture(s); eager calls by reason: {eager or 'none'}")

    def remove(self) -> None:
        """Free the graphs and give the layers back their hyclora forwards. Call it before
        ``revert_hyclora(model)``."""
        if self._removed:
            return
        self.release()
        for layer in self.layers:
            entry = layer.__dict__.get("_hyclora_graphs")
            if entry is not None and entry[0] is self:
                del layer.__dict__["_hyclora_graphs"]
                if entry[1] is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = entry[1]
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # -- dispatch -------------------------------------------------------------------------------
    def _eager_call(self, i: int, reason: str, args, kwargs):
        self.counts["eager: " + reason] += 1
        return self._eager[i](*args, **kwargs)

    def why_eager(self, i: int, layer: nn.Module, args, kwargs) -> Tuple[Optional[str], Any]:
        """``(reason, inputs)``: why call ``i`` runs eager (``None`` when it may be graphed) and,
        otherwise, ``(hidden, cos, sin, documents)`` (``documents``: the ``cu_seqlens`` of a packed
        batch, else None). Plain Python, except one host read per step for packed documents."""
        if not self.enabled:
            return "disabled", None
        if not (layer.training and torch.is_grad_enabled()):
            return "not a training forward with grad", None
        if in_backward_pass() or layer.hyclora_state.owed:
            return "checkpoint recompute", None
        if getattr(layer, "gradient_checkpointing", False) or _saved_tensor_hooks_active():
            return "gradient checkpointing or saved-tensor hooks", None
        if "_hyclora_patch" not in layer.__dict__:
            return "layer no longer patched", None
        adapter = layer._hyclora_patch.adapter
        if len(args) > 1:
            return "extra positional arguments", None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return "no (batch, seq, hidden) hidden_states", None
        pos = kwargs.get("position_embeddings")
        if not (isinstance(pos, (tuple, list)) and len(pos) == 2 and all(isinstance(t, torch.Tensor) for t in pos)):
            return "no position_embeddings", None
        cos, sin = pos
        if cos.requires_grad or sin.requires_grad:
            return "position_embeddings require grad", None
        mask = kwargs.get("attention_mask")
        documents = packed_documents(mask, kwargs.get("cu_seq_lens_q"), hidden.shape[0], hidden.shape[1],
                                     hidden.device, self.names[i])
        if documents is None and mask is not None:
            return "attention_mask", None
        if kwargs.get("output_attentions"):
            return "output_attentions", None
        for key, value in kwargs.items():
            if key in ("hidden_states", "position_embeddings", "attention_mask") or value is None:
                continue
            get_len = getattr(value, "get_seq_length", None)
            if callable(get_len) and not torch.is_tensor(value):
                if get_len(getattr(adapter.attention_module(layer), "layer_idx", 0) or 0) > 0:
                    return "KV cache with tokens", None
        impl = getattr(adapter.layer_config(layer), "_attn_implementation", None) or "eager"
        if impl not in GRAPHABLE_ATTENTION:
            return f"attention implementation {impl!r}", None
        if self.sample_shape is not None and tuple(hidden.shape[:2]) != self.sample_shape:
            return "batch shape", None
        if not stats_ready(layer.hyclora_state):
            return "statistics calibrating", None
        return None, (hidden, cos, sin, documents)

    def _key(self, hidden, cos, sin, documents=None):
        docs = None if documents is None else (tuple(documents.shape), documents.dtype)
        return (tuple(hidden.shape), hidden.dtype, hidden.device,
                tuple(cos.shape), cos.dtype, tuple(sin.shape), sin.dtype, docs, _autocast_key())

    def _stale(self, cap: _Captured, i: int) -> Optional[str]:
        layer = self.layers[i]
        norms = cap.tensors[i][1]
        now = layer._hyclora_patch.adapter.norm_weights(layer)
        if (any(a is not b for a, b in zip(norms, now))
                or not _same_storage(_layer_storage(*cap.tensors[i]), cap.checks[i])):
            return "stale graph (statistics or storage changed)"
        patch = layer._hyclora_patch
        if _config_knobs(patch.config) != cap.config_knobs[i]:
            return "stale graph (HyCLoRAConfig changed)"
        if adapter_state_key(layer) != cap.linear_keys[i]:
            return "stale graph (adapter state changed)"
        return None

    def _invalid(self, cap: _Captured) -> Optional[str]:
        """Why the captured graphs can no longer be replayed (checked at the first layer's
        call): a layer's statistics calibrate or expire now, or something they read changed."""
        for layer in self.layers:
            if not stats_ready(layer.hyclora_state):
                return "statistics expire (recalibration)"
        for i in range(len(self.layers)):
            why = self._stale(cap, i)
            if why is not None:
                return why
        return None

    def _observe_rope(self, i: int, kwargs) -> None:
        """Record the position-embedding tables (and packed documents) layer ``i`` gets; at the
        first layer's call, group the layers of the last whole step by the tables they shared (by
        identity: a model computes each table once per forward)."""
        pos = kwargs.get("position_embeddings")
        side = (*pos, kwargs.get("cu_seq_lens_q")) if isinstance(pos, (tuple, list)) else None
        if i == 0:
            if all(t is not None for t in self._step_rope):
                self._rope_groups = _groups_by_identity(self._step_rope)
            self._step_rope = [None] * len(self.layers)
        self._step_rope[i] = side

    def forward(self, i: int, args, kwargs):
        layer = self.layers[i]
        cap = self._captured
        self._observe_rope(i, kwargs)
        if (i == 0 and cap is not None and self.enabled and layer.training and torch.is_grad_enabled()
                and not in_backward_pass()):
            why = self._invalid(cap)
            if why is not None:  # free the graphs before the eager steps allocate anything
                self.release()
                cap = None
                self.counts["release: " + why] += 1
                if not self.recapture:
                    self._given_up = True
        reason, inputs = self.why_eager(i, layer, args, kwargs)
        if reason is not None:
            return self._eager_call(i, reason, args, kwargs)
        hidden, cos, sin, documents = inputs
        key = self._key(hidden, cos, sin, documents)
        if cap is None:
            if i != 0:
                return self._eager_call(i, "not captured (captures start at the first layer)", args, kwargs)
            if self._given_up:
                return self._eager_call(i, "graphs released (recapture=False)", args, kwargs)
            if not all(stats_ready(m.hyclora_state) for m in self.layers):
                return self._eager_call(i, "statistics calibrating", args, kwargs)
            cap = self._capture(key, hidden, cos, sin, documents)
        elif cap.key != key:
            return self._eager_call(i, "input shape/dtype or autocast differs from the capture", args, kwargs)
        if hidden.requires_grad != cap.input_requires_grad[i]:
            return self._eager_call(i, "input requires_grad differs from the capture", args, kwargs)
        node = cap.pending[i]
        if node is not None and node() is not None:
            return self._eager_call(i, "previous graphed forward awaits its backward", args, kwargs)
        group = cap.rope_groups[i]
        if group != i:
            source = cap.rope_source.get(group)
            side = (cos, sin) if documents is None else (cos, sin, documents)
            if source is None or len(side) != len(source) or any(a is not b for a, b in zip(side, source)):
                # a copy into the group's static tables would change what its other layers' backward
                # replays read
                return self._eager_call(i, "position embeddings differ from the layers graphed with it", args, kwargs)
        return self._replay(cap, i, layer, hidden, cos, sin, documents)

    def _replay(self, cap: _Captured, i: int, layer, hidden, cos, sin, documents=None):
        patch = layer._hyclora_patch
        state = layer.hyclora_state
        state.owed = False
        state.count_forward()  # the counted forward's host bookkeeping (no expiry: stats_ready)
        guard = patch.guard
        check = patch.config.on_nonfinite == "raise"
        if check and guard is not None and patch.order == 0:  # what run_checked does at a new step
            if guard.num_pending:
                guard.raise_pending()
            guard.armed = False
        side = (cos, sin) if documents is None else (cos, sin, documents)
        if cap.rope_groups[i] == i:
            cap.rope_source[i] = side  # copied into the group's static tables by this replay
        else:
            side = cap.static_rope[i]  # the group's tables, copied by its first layer: no copy
        y = cap.graphed[i](hidden, *side)
        if check:
            entries = cap.callables[i].capture_guard.entries
            if guard is None:  # no deferred guard on this model: an immediate check (one sync)
                once = FiniteGuard()
                _push_flags(once, entries)
                once.raise_pending()
            else:
                _push_flags(guard, entries)
                if not guard.armed:
                    guard.arm(y)
        node = y.grad_fn
        if node is not None:  # the Graphed Function's node (a Python object: weak-referenceable)
            cap.pending[i] = weakref.ref(node)
            node.register_hook(_make_done(cap, i))
        self.counts["replay"] += 1
        if cap.shared_output and (layer._forward_hooks or _global_forward_hooks()):
            return y.clone()  # a forward hook (transformers' output_hidden_states) may keep it past the next layer
        return y

    # -- capture --------------------------------------------------------------------------------
    def _capture(self, key, hidden, cos, sin, documents=None) -> _Captured:
        ac = _autocast_key()
        if ac is not None and ac[2]:
            raise RuntimeError(
                "hyclora.cuda_graphs: capture under torch.autocast with its cache enabled is not supported "
                "(make_graphed_callables); use torch.autocast('cuda', dtype=..., cache_enabled=False), or "
                "bf16 weights without autocast.")
        for name, layer in zip(self.names, self.layers):  # dropout may have been switched on since
            _refuse_dropout(name, layer, training_only=True)
        callables = tuple(_LayerCallable(layer) for layer in self.layers)
        compresses = all(m._hyclora_patch.config.compresses for m in self.layers)
        groups = self._rope_groups if self._rope_groups is not None else list(range(len(self.layers)))
        with torch.no_grad():
            tables = {}  # group -> its static (cos, sin[, documents])
            for g in groups:
                if g not in tables:
                    tables[g] = tuple(t.detach().clone() for t in (cos, sin, documents) if t is not None)
            shared = hidden.detach().clone().requires_grad_(True)
            samples = []
            upstream_grad = hidden.requires_grad
            for i, layer in enumerate(self.layers):
                rg = upstream_grad
                if i == 0:
                    x = hidden.detach().clone().requires_grad_(rg)
                elif compresses and rg:
                    # compressing layer types never keep their input for the backward (only its
                    # quantised copy), so all layers can share one static input buffer
                    x = shared
                else:
                    x = hidden.detach().clone().requires_grad_(rg)
                samples.append((x, *tables[groups[i]]))
                upstream_grad = upstream_grad or any(p.requires_grad for p in layer.parameters())
        # the input of layer i > 0 requires grad iff something before it does; each call checks its
        # input against its sample (the graphs need them to match)
        shared_hidden = shared if len(samples) > 1 and all(s[0] is shared for s in samples[1:]) else None
        try:
            # allow_unused_input: a trainable parameter the compressed path does not use gets no
            # gradient, as in the eager step
            # the fused LoRA kernels run at any token count in the warm-ups and the capture (a
            # replay launches nothing from the host)
            warm_up = (_first_of_each_kind(self.layers, samples) if self.warm_up_layers == "distinct"
                       else tuple(range(len(samples))))
            with kernels_for_graph_capture(self.layers):
                graphed = self._grapher(callables, tuple(samples), num_warmup_iters=self.num_warmup_iters,
                                        allow_unused_input=True, shared_hidden=shared_hidden, warm_up=warm_up)
        except Exception as exc:
            hint = ""
            if "legacy stream" in str(exc):
                hint = (" A tensor of the previous step (often the loss) still holds its autograd graph: "
                        "detach it after the backward (loss = loss.detach()) before the next forward.")
            raise RuntimeError(f"hyclora.cuda_graphs: capturing the decoder layers failed ({type(exc).__name__}: "
                               f"{exc}).{hint or ' Train without graphs (graphs.remove()) and report this.'}") from exc
        graphed = [g if not isinstance(g, nn.Module) else g.forward for g in graphed]
        tensors = [_layer_tensors(layer) for layer in self.layers]
        checks = [_layer_storage(*t) for t in tensors]
        linear_keys = [adapter_state_key(layer) for layer in self.layers]
        knobs = [_config_knobs(layer._hyclora_patch.config) for layer in self.layers]
        self._captured = _Captured(key, callables, graphed, tensors, checks, linear_keys, knobs,
                                   [s[0].requires_grad for s in samples], [tables[g] for g in groups], groups)
        self._captured.shared_output = shared_hidden is not None
        self.counts["capture"] += 1
        return self._captured


def _own_block(y: torch.Tensor, hidden: torch.Tensor) -> bool:
    """Whether ``y``'s memory may go back to the pool once the graph has copied it into ``hidden``:
    ``y`` owns its storage and the backward cannot read it. Only the node that made ``y`` can have
    saved it (every other node of its graph ran before ``y`` existed): a built-in op's
    ``_saved_*`` tensors, a custom Function's ``saved_tensors``."""
    storage = y.untyped_storage()
    if y._base is not None or storage.data_ptr() == hidden.untyped_storage().data_ptr():
        return False
    node = y.grad_fn
    saved = []
    for name in dir(node):
        if name.startswith("_saved_") or name == "saved_tensors":
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed or not applicable
                continue
            saved.extend(value if isinstance(value, (tuple, list)) else (value,))
    return not any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == storage.data_ptr()
                   for t in saved)


def _first_of_each_kind(layers, samples) -> Tuple[int, ...]:
    """The first layer of each kind: what a warm-up prepares (Triton compilation and tuning, the
    capture stream's cuBLAS workspace) depends on the kernels a layer launches and their shapes,
    the same for layers of one class, configuration, parameter and buffer shapes and input shapes."""
    seen, first = set(), []
    for i, (layer, args) in enumerate(zip(layers, samples)):
        kind = (type(layer), _config_knobs(layer._hyclora_patch.config),
                tuple((tuple(p.shape), p.dtype, p.requires_grad) for p in layer.parameters()),
                tuple((tuple(b.shape), b.dtype) for b in layer.buffers()),
                tuple((tuple(a.shape), a.dtype, a.requires_grad) for a in args))
        if kind not in seen:
            seen.add(kind)
            first.append(i)
    return tuple(first)


def _global_forward_hooks():
    """torch's global module forward hooks (``register_module_forward_hook``), if it keeps them."""
    return getattr(torch.nn.modules.module, "_global_forward_hooks", None)


def _groups_by_identity(sides: List[tuple]) -> List[int]:
    """Per entry, the index of the first entry holding the very same tensors (``is``)."""
    groups = []
    for i, side in enumerate(sides):
        groups.append(next(j for j in range(i + 1) if len(sides[j]) == len(side)
                           and all(a is b for a, b in zip(sides[j], side))))
    return groups


def graph_layer_chain(callables, sample_args, num_warmup_iters: int = 3, allow_unused_input: bool = False,
                      *, shared_hidden: Optional[torch.Tensor] = None, warm_up: Optional[Tuple[int, ...]] = None,
                      _capture: Optional["CudaGraphCapture"] = None):
    """``torch.cuda.make_graphed_callables`` for callables that run one after another, each once
    per step, forwards in order and backwards in reverse (decoder layers): the same contract
    (graphed functions that copy their inputs into the static samples, replay, and return static
    outputs; gradients for the samples that require grad and the trainable parameters), but the
    backward graphs share one incoming-gradient buffer, one input-gradient buffer and one
    parameter-gradient buffer per parameter position and layout instead of one of each per
    callable. They may: only one backward replays at a time, the incoming gradient is copied in
    before it replays, and the input gradient it returns is consumed (copied into the shared
    incoming buffer by the previous layer's backward, or read by whatever produced the first
    input) before the next backward replay writes it. Unlike ``make_graphed_callables``, the
    parameter gradients are returned as fresh copies (one launch per layer), so autograd never
    keeps a static buffer. The input gradient is a static buffer, overwritten by the next layer's
    backward, and all graphs share one memory pool, so they must replay in the order they were
    captured.

    Every callable must return one tensor that requires grad, of the same shape and dtype for all
    (the hidden states). ``shared_hidden``: the static input of callables 1..n-1 (their
    ``sample_args[i][0]``), given when none of them keeps its input for the backward (compressing
    layers). Each graph then also writes its output into that buffer and returns it, so the chain
    keeps one hidden state instead of one output per callable. Each callable's own output block
    goes back to the pool right after its forward capture, unless the node that made it saved it
    for the backward (:func:`_own_block`).
    ``warm_up``: the indices of the callables to warm up (``None``: all of them).
    ``_capture``: how warm-ups run and graphs are captured (:class:`CudaGraphCapture`; the CPU
    tests pass an emulation that replays by re-running)."""
    n = len(callables)
    if any(a.requires_grad for args in sample_args for a in args[1:]):
        raise ValueError("hyclora.cuda_graphs: only the first input of a graphed layer may require grad")
    params = [tuple(p for p in c.parameters() if p.requires_grad) for c in callables]
    surfaces = [tuple(a for a in args if a.requires_grad) + ps for args, ps in zip(sample_args, params)]
    if any(not surface for surface in surfaces):
        raise ValueError("hyclora.cuda_graphs: a graphed layer has nothing that requires grad")
    input_grad = [bool(args[0].requires_grad) for args in sample_args]
    hidden = shared_hidden
    if hidden is not None and not all(a[0] is hidden for a in sample_args[1:]):
        raise ValueError("hyclora.cuda_graphs: shared_hidden must be the first sample input of every callable "
                         "after the first")
    cap = _capture or CudaGraphCapture()

    def checked(i, out, like=None):
        if not isinstance(out, torch.Tensor) or not out.requires_grad or (
                like is not None and (out.shape, out.dtype) != (like.shape, like.dtype)):
            raise RuntimeError(f"hyclora.cuda_graphs: layer {i} returned {type(out).__name__} "
                               "(one tensor that requires grad, the same shape for every layer, expected)")
        return out

    def warm_ups():  # Triton autotuning, cuBLAS workspaces, lazy initialisation
        for i in range(n) if warm_up is None else warm_up:
            c, args, surface = callables[i], sample_args[i], surfaces[i]
            for _ in range(num_warmup_iters):
                out = checked(i, c(*args))
                torch.autograd.grad(out, surface, torch.ones_like(out), allow_unused=allow_unused_input)

    cap.warm_up(warm_ups)

    # ``live[i]``: the output whose autograd graph the backward capture differentiates (on CUDA the
    # capture's own; an emulation that replays by re-running updates it)
    live: List[Optional[torch.Tensor]] = [None] * n

    def forward_of(i):
        def run():
            y = checked(i, callables[i](*sample_args[i]), hidden)
            live[i] = y
            if hidden is None:
                return y
            with torch.no_grad():
                hidden.copy_(y)  # after the graph's last read of its input (stream order)
            if _own_block(y, hidden):
                y.untyped_storage().resize_(0)  # the pool may hand the block to the next layer's capture
            return hidden
        return run

    fwd_graphs, outputs = [], []
    for i in range(n):
        graph, out = cap.capture(forward_of(i))
        fwd_graphs.append(graph)
        outputs.append(checked(i, out, outputs[0] if outputs else None) if hidden is None else out)
    grad_out = torch.empty_like(outputs[0])  # the incoming gradient of every backward graph
    grad_in = torch.empty_like(outputs[0]) if any(input_grad) else None  # the input gradient they write

    # one gradient buffer per parameter position and layout, shared by the layers: Replayed.backward
    # copies it out before the next backward replay rewrites it
    grad_slots = {}
    for ps in params:
        for j, p in enumerate(ps):
            if (j, p.shape, p.dtype) not in grad_slots:
                grad_slots[(j, p.shape, p.dtype)] = torch.empty_like(p, memory_format=torch.contiguous_format)

    def backward_of(i):
        def run():
            grads = torch.autograd.grad(live[i], surfaces[i], grad_out, allow_unused=allow_unused_input)
            live[i] = None
            if input_grad[i]:
                if grads[0] is None:
                    raise RuntimeError(f"hyclora.cuda_graphs: layer {i}'s output does not depend on its input")
                grad_in.copy_(grads[0])
                grads = grads[1:]
            slots = [grad_slots[(j, p.shape, p.dtype)] for j, p in enumerate(params[i])]
            used = [(slot, g) for slot, g in zip(slots, grads) if g is not None]
            if used:
                torch._foreach_copy_([slot for slot, _ in used], [g for _, g in used])
            return tuple(None if g is None else slot for slot, g in zip(slots, grads))
        return run

    bwd_graphs, param_grads = [None] * n, [None] * n
    for i in reversed(range(n)):
        bwd_graphs[i], param_grads[i] = cap.capture(backward_of(i))

    class Replayed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, i, *inputs):
            ctx.i = i
            for static, x in zip(sample_args[i], inputs[:len(sample_args[i])]):
                if static.data_ptr() != x.data_ptr():
                    static.copy_(x)
            fwd_graphs[i].replay()
            return outputs[i].detach()

        @staticmethod
        def backward(ctx, grad):
            i = ctx.i
            grad_out.copy_(grad)  # grad may be grad_in (the next layer's): copied before it is rewritten
            bwd_graphs[i].replay()
            n_args = len(sample_args[i])
            first = grad_in.detach() if input_grad[i] else None
            arg_grads = (first,) + (None,) * (n_args - 1)
            used = [g for g in param_grads[i] if g is not None]
            copies = iter(torch._foreach_mul(used, 1.0) if used else ())  # fresh tensors in one launch
            return (None,) + arg_grads + tuple(None if g is None else next(copies) for g in param_grads[i])

    def make(i):
        def graphed(*args):
            return Replayed.apply(i, *args, *params[i])
        return graphed

    return tuple(make(i) for i in range(n))


class CudaGraphCapture:
    """How :func:`graph_layer_chain` runs its warm-ups (a side stream, synchronised around) and
    captures a graph (``torch.cuda.graph`` into one shared memory pool): ``capture(fn)`` returns
    ``(graph, fn's result)``; ``graph.replay()`` reruns the captured work on the same memory."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, fn) -> None:
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), quiet_grad_stream_warning():
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        with no_cyclic_gc(), torch.cuda.graph(graph, pool=self.pool), quiet_grad_stream_warning():
            result = fn()
        return graph, result


@contextlib.contextmanager
def no_cyclic_gc():
    """Python's cyclic garbage collector paused, its garbage kept for after the capture: a
    collection inside a capture runs the destructors of whatever it frees (earlier graphs, CUDA
    events, what tuning left in reference cycles), and a driver call among them can invalidate
    the capture; ``torch.cuda.graph`` no longer collects before it begins."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def quiet_grad_stream_warning():
    """Silences torch's warning that a parameter's AccumulateGrad node (made by an eager step on
    the default stream) does not match the side stream of a warm-up or capture: those run
    ``torch.autograd.grad``, which returns the gradients and never runs that node."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
        yield


def _refuse_dropout(name: str, layer: nn.Module, training_only: bool) -> None:
    for sub, m in layer.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0 and (m.training or not training_only):
            raise ValueError(
                f"hyclora.cuda_graphs: {name}.{sub} is a dropout with p={m.p}; LoRA dropout > 0 cannot be "
                "graphed (hyclora redraws the mask in the backward from a generator state read on the "
                "host). Use lora_dropout=0 or train without graphs (graphs.remove()).")


def _make_done(cap: _Captured, i: int):
    def hook(grad_inputs, grad_outputs):
        cap.pending[i] = None
        return None

    return hook


def _make_forward(graphs: DecoderLayerGraphs, i: int):
    def forward(*args, **kwargs):
        return graphs.forward(i, args, kwargs)

    return forward


def run_refusal(*, use_hyclora: bool, checkpointing: bool, several_processes: bool) -> Optional[str]:
    """Why a training run's ``--cuda_graphs`` cannot replay (naming the command-line fix), or
    None: the refusals the examples and ``launch/longseq.py`` share, checked before any model is
    built (:func:`graph_decoder_layers` refuses what it can see on the model itself)."""
    if several_processes:
        return ("it runs in one process on one GPU (DDP/DeepSpeed/DataParallel wrap the forward and own the "
                "gradients): launch one process without a DeepSpeed config; with several GPUs visible set "
                "CUDA_VISIBLE_DEVICES to one")
    if checkpointing:
        return ("checkpointed layers always run eager (their recompute happens inside the backward): drop "
                "--gradient_checkpointing / --activation_checkpointing, or --cuda_graphs")
    if not use_hyclora:
        return "it graphs hyclora's compressed layers: pass --use_hyclora true (and a --layer_type)"
    return None


def graph_decoder_layers(model: nn.Module, *, sample_shape: Optional[Tuple[int, int]] = None,
                         num_warmup_iters: int = 1, recapture: bool = True,
                         warm_up_layers: str = "distinct") -> DecoderLayerGraphs:
    """Replay CUDA graphs of ``model``'s hyclora-patched decoder layers once their statistics
    are frozen (see the module docstring for when a call runs eager, captures or replays).

    Args:
        model: a model :func:`hyclora.apply_hyclora` patched, on a CUDA device.
        sample_shape: ``(batch_size, seq_len)`` to capture; other shapes run eager. ``None``: the
            first eligible batch's shape.
        num_warmup_iters: eager warm-up iterations per warmed-up layer before each capture. One
            runs Triton's autotuning and the lazy initialisations; ``make_graphed_callables``'
            default of 3 is for DDP, which graphs do not run under.
        warm_up_layers: ``"distinct"`` (default) warms up only the first layer of each kind
            (class, configuration, parameter, buffer and input shapes: the same kernels); the
            others are captured without a warm-up. ``"all"`` warms up every layer (as
            ``make_graphed_callables`` does).
        recapture: capture again after the graphs went stale (recalibration, moved storage,
            changed adapters); ``False``: free them and stay eager.

    Returns the :class:`DecoderLayerGraphs` (``.counts``, ``.enabled``, ``.remove()``).
    """
    return DecoderLayerGraphs(model, sample_shape=sample_shape, num_warmup_iters=num_warmup_iters,
                              recapture=recapture, warm_up_layers=warm_up_layers)
