"""The base of hyclora's layer adapters: patch, unpatch, calibration bookkeeping and dispatch.

A :class:`LayerAdapter` serves one architecture, described by an
:class:`~hyclora.models.spec.ArchitectureSpec`; a subclass per block family (the Llama-style
decoder blocks in :mod:`.decoder`, the BERT-style encoder blocks in :mod:`.roberta`) only checks
the call's arguments, gives the geometry and runs its two blocks.

A patched layer keeps its modules and parameters untouched; only its class is swapped for a
subclass whose ``forward`` is :func:`patched_forward` (:mod:`.patching`, so that transformers' own
wrappers of ``forward`` wrap hyclora's). That forward takes the compressed path only for a
training forward with grad enabled and calls the original forward otherwise, so eval,
``no_grad`` and ``generate()`` are exactly the unpatched model.

Calibration and gradient checkpointing: a layer updates its statistics on a counted training
forward. A non-reentrant checkpoint recomputes the layer inside the backward (the graph-task id
is set); that recompute is not counted, because the first forward already was. A reentrant
checkpoint runs the first forward under ``no_grad`` (original path) and the only compressed
forward inside the backward; the ``no_grad`` training forward leaves an ``owed`` mark, so that
recompute is counted.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hyclora.ops.attention import check_implementation, is_s2
from hyclora.ops.lora import FusedPart
from hyclora.ops.rmsnorm import RMSNormFn
from hyclora.ops.storage import StoragePolicy
from hyclora.ops.tensor_specs import stats_names, tensor_widths

from .patching import call_original, patch_forward, unpatch_forward
from .peft_utils import NormParams, class_attribute_names, resolve_linear, resolve_norm
from .spec import ArchitectureSpec, get_path
from .state import HyCLoRALayerState


@dataclass
class LayerPatch:
    """What a patched layer carries (``layer._hyclora_patch``)."""

    adapter: "LayerAdapter"
    config: Any  # HyCLoRAConfig
    name: str
    signature: inspect.Signature
    var_kw: str
    # shared by all layers of one model (set by apply_hyclora): the deferred NaN/Inf check
    guard: Any = None  # hyclora.quant.checks.FiniteGuard
    order: int = 0  # this layer's position among the model's patched layers
    # warmed up / captured into a CUDA graph now (kernels_for_graph_capture): the policy lets the
    # fused LoRA kernels run at any token count, since replays launch nothing from the host
    under_graph_capture: bool = False
    # host-time caches of compressed_forward (see there); rebuilt whenever their key changes
    resolved: Any = None  # (key, (attn metas, attn params), (mlp metas, mlp params))
    setup: Any = None  # (key, (geometry, s2 group, StoragePolicy))
    # (resolved linears, the layer's submodules, their hook dicts) for the hook check, refreshed
    # when the resolved linears change
    cached_submodules: Any = None
    warned_hooks: set = field(default_factory=set)
    # (submodules, torch's hook-handle counter, _hook_fingerprint) at the last hook scan
    hooks_scanned: Any = None

    def _cached_submodules(self, layer: nn.Module):
        cached = self.cached_submodules
        linears = None if self.resolved is None else self.resolved[1]
        if linears is None or cached is None or cached[0] is not linears:
            submodules = _submodules(layer)
            dicts = tuple(getattr(sub, attr) for _, sub in submodules for attr in _HOOK_DICTS)
            cached = self.cached_submodules = (linears, submodules, dicts)
        return cached

    def submodules(self, layer: nn.Module):
        return self._cached_submodules(layer)[1]

    def hook_dicts(self, layer: nn.Module):
        """The hook dicts (``_HOOK_DICTS``) of :meth:`submodules`, in one flat tuple."""
        return self._cached_submodules(layer)[2]


class Calibration(NamedTuple):
    """Calibration bookkeeping of one compressed forward (:meth:`LayerAdapter.begin_forward`)."""

    counted: bool  # a training forward that counts (not a checkpoint recompute of a counted one)
    in_backward: bool
    stats: Dict[str, nn.Module]
    replay: frozenset  # statistics a recompute must treat as the calibrating forward did


class LayerCall(NamedTuple):
    """One compressed forward of a layer, as :meth:`LayerAdapter.blocks` gets it."""

    hidden: torch.Tensor
    impl: str  # attention implementation
    inputs: Any  # what the family's check_call returned (mask, RoPE tables ...)
    geometry: Any
    s2: Tuple[Any, Any]  # S²-Attn group ratio / size
    norms: Tuple[NormParams, ...]
    linears: Any  # ((attention metas, params), (mlp metas, params))
    common: Dict[str, Any]  # the plan fields both blocks share (name, policy, statistics, checks)


def in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward on this thread (a checkpoint's recompute
    runs inside one)."""
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def kernels_for_graph_capture(layers: Iterable[nn.Module]):
    """Inside, the patched layers among ``layers`` build their policies for CUDA-graph warm-up
    and capture (``StoragePolicy.from_config(..., under_graph_capture=True)``): a replay launches
    nothing from the host, so the fused LoRA kernels pay off at any token count."""
    patches = [m.__dict__["_hyclora_patch"] for m in layers if "_hyclora_patch" in m.__dict__]
    before = [p.under_graph_capture for p in patches]
    for p in patches:
        p.under_graph_capture = True
    try:
        yield
    finally:
        for p, flag in zip(patches, before):
            p.under_graph_capture = flag


def adapter_state_key(layer: nn.Module):
    """What the resolved linears of a patched layer depend on (:meth:`LayerAdapter.state_key`)."""
    return layer.__dict__["_hyclora_patch"].adapter.state_key(layer)


def _linear_key(module: nn.Module):
    """What :func:`resolve_linear`'s result depends on that can change after ``apply_hyclora``:
    the module itself, its active adapter(s), disabled/merged state, training mode (dropout), the
    scaling of the active adapter and the identity of every parameter it returns. Public PEFT
    attributes only; ``None`` (do not cache) for anything else, which then resolves each call."""
    ad = getattr(module, "active_adapters", None)
    if ad is None or not ("lora_A" in module._modules or hasattr(module, "lora_A")):
        if isinstance(module, nn.Linear):
            return (id(module), id(_member(module, "weight")), id(_member(module, "bias")))
        return None
    first = ad[0] if len(ad) else None
    lora_a, lora_b, drop, base = _members(module, _LORA_MEMBERS)
    a, b, d = _entry(lora_a, first), _entry(lora_b, first), _entry(drop, first)
    base_weight, base_bias = _members(base, _BASE_MEMBERS)
    return (id(module), tuple(ad), module.disable_adapters, module.merged, module.scaling.get(first),
            None if d is None else (id(d), d.training), id(base), id(base_weight),
            id(base_bias), None if a is None else (id(a), id(_member(a, "weight"))),
            None if b is None else (id(b), id(_member(b, "weight"))))


_LORA_MEMBERS = ("lora_A", "lora_B", "lora_dropout", "base_layer")
_BASE_MEMBERS = ("weight", "bias")


_ABSENT = object()


def _member(module: nn.Module, name: str):
    """``getattr(module, name)`` for a registered parameter or submodule, read from the registry
    dict itself: ``nn.Module.__getattr__`` (a Python call after a failed lookup) costs host time
    on every layer call. Anything else (a property, a plain attribute) is read by getattr."""
    try:
        d = module.__dict__
        params, mods = d["_parameters"], d["_modules"]
        # indexing, not .get: DeepSpeed ZeRO-3's parameter dict gathers in __getitem__
        value = params[name] if name in params else mods[name] if name in mods else _ABSENT
    except (AttributeError, KeyError):  # not an nn.Module
        return getattr(module, name)
    if value is _ABSENT or name in d or name in class_attribute_names(type(module)):
        return getattr(module, name)
    return value


def _members(module: nn.Module, names: Tuple[str, ...]):
    """``[_member(module, n) for n in names]``, the class and the instance dict checked once."""
    try:
        d = module.__dict__
        params, mods = d["_parameters"], d["_modules"]
    except (AttributeError, KeyError):  # not an nn.Module
        return [getattr(module, n) for n in names]
    if d.keys().isdisjoint(names) and class_attribute_names(type(module)).isdisjoint(names):
        return [params[n] if n in params else mods[n] if n in mods else getattr(module, n) for n in names]
    return [_member(module, n) for n in names]


def _member_path(module: nn.Module, names: Tuple[str, ...]):
    """``attrgetter("a.b")(module)`` by :func:`_member` steps."""
    for name in names:
        module = _member(module, name)
    return module


def _entry(container, key):
    """``container[key] if key in container else None``; a plain ``nn.ModuleDict`` (PEFT's
    ``lora_A`` ...) read from its registry without its Python ``__contains__`` / ``__getitem__``."""
    if type(container) is nn.ModuleDict:
        return container._modules.get(key)
    return container[key] if key in container else None


# Hooks from these packages are their own machinery (ZeRO-3, PEFT's adapter routing ...), not a
# user's hook that would be silently skipped.
_FRAMEWORK_HOOK_MODULES = ("torch", "deepspeed", "accelerate", "peft", "transformers", "hyclora")
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _user_hooks(submodules):
    """``(submodule name, hook)`` of the user hooks on the submodules of a patched layer."""
    # the scan runs on every layer call: one comprehension (no generator step per submodule)
    hooked = [(n, sub) for n, sub in submodules
              if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks]
    for sub_name, sub in hooked:
        for attr in _HOOK_DICTS:
            for hook in getattr(sub, attr).values():
                origin = getattr(getattr(hook, "func", hook), "__module__", None) or ""
                if origin.split(".")[0] not in _FRAMEWORK_HOOK_MODULES:
                    yield sub_name, hook


def warn_unreachable_hooks(layers) -> None:
    """Warn once per hook registered on a submodule of a patched layer (``mlp``, ``self_attn``,
    ``q_proj``, the norms, ``act_fn`` ...): hyclora's training forward runs fused blocks on the
    layer's weights and never calls those submodules, so their hooks do not fire there (they do
    under ``no_grad`` / ``eval()``, which run the original forward)."""
    for name, layer in layers:
        patch = layer.__dict__.get("_hyclora_patch")
        submodules = patch.submodules(layer) if patch is not None else _submodules(layer)
        fingerprint = None
        if patch is not None:
            # every hook registration takes a RemovableHandle, which advances this counter: the
            # same submodules and the same count since the last scan mean no hook was added
            stamp = getattr(RemovableHandle, "next_id", None)
            scanned = patch.hooks_scanned
            if scanned is not None and scanned[0] is submodules:
                if stamp is not None and scanned[1] == stamp:
                    continue
                # the counter also moves for tensor hooks (FiniteGuard arms one per step)
                fingerprint = _hook_fingerprint(patch.hook_dicts(layer))
                if fingerprint == scanned[2]:
                    patch.hooks_scanned = (submodules, stamp, fingerprint)
                    continue
            else:
                fingerprint = _hook_fingerprint(patch.hook_dicts(layer))
        warned = patch.warned_hooks if patch is not None else set()
        for sub_name, hook in _user_hooks(submodules):
            key = (sub_name, id(hook))
            if key in warned:
                continue
            warned.add(key)
            warnings.warn(
                f"hyclora: the hook {getattr(hook, '__qualname__', hook)!r} on {name}.{sub_name} does not run in "
                "hyclora's training forward (the patched layer runs fused compressed blocks, not its submodules); "
                "it runs only in no_grad / eval forwards. Register it on the layer itself, or train "
                "without hyclora (HyCLoRAConfig(use_hyclora=False)) where the hook must see every step.",
                UserWarning, stacklevel=3,
            )
        if patch is not None:  # after the scan: a warning raised as an error leaves it to the next call
            patch.hooks_scanned = (submodules, stamp, fingerprint)


def _hook_fingerprint(hook_dicts) -> Tuple[int, int]:
    """``(hooks held, largest handle id)`` over ``hook_dicts``: every hook dict is keyed by its
    RemovableHandle's id, which grows with each registration, so a hook added since the last
    fingerprint (and still there) raises the largest id, and a removal lowers the count."""
    hooked = list(filter(None, hook_dicts))  # C-level: the common case holds no hook at all
    if not hooked:
        return 0, -1
    return sum(map(len, hooked)), max(map(max, hooked))


def _submodules(layer: nn.Module):
    return tuple((n, m) for n, m in layer.named_modules() if n and not n.startswith("hyclora_state"))


def run_checked(patch: LayerPatch, check: bool, in_backward: bool, run: Callable[[], torch.Tensor]):
    """Run a layer's blocks with its NaN/Inf checks deferred to one host read per step.

    The blocks' ``check_finite`` calls record device-side flags into the model's
    ``FiniteGuard`` (no sync). The output of the first layer whose output needs a gradient is
    armed: its gradient is the last one the backward computes among the patched layers, and
    the hook reads every flag of the step at that moment (one sync), raising before any
    optimizer step. A reentrant checkpoint recomputes the layers last to first inside the
    backward; there only the first layer (order 0) arms, so it is still one read per step.
    """
    guard = patch.guard
    if not check or guard is None:  # no guard: check_finite falls back to an immediate check
        return run()
    if patch.order == 0 and not in_backward:
        # a new step: flags a previous forward left unread (it was never backpropagated) are
        # read now (a sync only in that case), and the guard is armed afresh
        if guard.num_pending:
            guard.raise_pending()
        guard.armed = False
    with guard.scope(patch.order):
        y = run()
    if not guard.armed and (not in_backward or patch.order == 0):
        guard.arm(y)
    return y


def bind_arguments(patch: LayerPatch, args, kwargs) -> Dict[str, Any]:
    """The layer call's arguments by name (``**kwargs`` flattened in)."""
    if len(args) <= 1 and patch.var_kw not in kwargs:
        # transformers passes the hidden states positionally and the rest by keyword: the
        # arguments are the keywords as they are (Signature.bind costs host time on every call)
        arguments: Dict[str, Any] = dict(kwargs)
        if args:
            if "hidden_states" in arguments:
                raise TypeError("hyclora: hidden_states given both positionally and by keyword")
            arguments["hidden_states"] = args[0]
        return arguments
    bound = patch.signature.bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop(patch.var_kw, {}) or {})
    return arguments


# a config key that names an activation (hidden_act, Gemma's hidden_activation, activation_function)
_ACTIVATION_KEY = re.compile(r"(^|_)act($|_)|activation")


class LayerAdapter:
    """Patches the layers of one architecture (``spec``) with the blocks of ``family``.

    Subclasses implement :meth:`geometry`, :meth:`dims`, :meth:`check_call` and :meth:`blocks`;
    everything else (discovery, config and layout checks, patch/unpatch, host-time caches,
    calibration bookkeeping, the final norm) is shared.
    """

    family: str = ""  # the block family the subclass runs (hyclora.ops.tensor_specs.FAMILIES)

    def __init__(self, spec: ArchitectureSpec):
        if spec.family != self.family:
            raise ValueError(f"hyclora: {type(self).__name__} runs {self.family} blocks, not the "
                             f"{spec.family} blocks of the {spec.model_type} spec")
        self.spec = spec
        self.model_type = spec.model_type
        self._norm_classes = frozenset(spec.norm_classes)
        # paths whose parameters the blocks read
        self._owned = tuple(p for _, p in spec.linears) + spec.norms + spec.qk_norms + spec.post_norms
        # dotted-path getters made once (these run on every layer call: host time)
        self._attention = attrgetter(spec.attention)
        self._norms = tuple((p, attrgetter(p)) for p in spec.norms)
        self._post_norms = tuple((p, attrgetter(p)) for p in spec.post_norms)
        self._qk_norms = tuple((p, attrgetter(p)) for p in spec.qk_norms)
        self._qk_norm_classes = frozenset(spec.effective_qk_norm_classes)
        self._linear_groups = tuple(tuple((short, p, attrgetter(p)) for short, p in group)
                                    for group in (spec.attention_linears, spec.mlp_linears))
        self._linears = tuple(get for group in self._linear_groups for _, _, get in group)
        self._linear_paths = tuple(tuple(p.split(".")) for group in self._linear_groups for _, p, _ in group)
        # the same paths as (parent path, consecutive children under it): each parent read once
        parents: List[Tuple[Tuple[str, ...], List[str]]] = []
        for names in self._linear_paths:
            if parents and parents[-1][0] == names[:-1]:
                parents[-1][1].append(names[-1])
            else:
                parents.append((names[:-1], [names[-1]]))
        self._linear_parents = tuple((parent, tuple(children)) for parent, children in parents)
        self._fused_parts = spec.fused_parts
        self._fused_group = {part[0]: g for g, group in enumerate(self._fused_parts) for part in group if part}

    # -- discovery and checks ----------------------------------------------------------------
    def layer_class(self):
        module, name = self.spec.layer_class
        return getattr(__import__(module, fromlist=[name]), name)

    def find_layers(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        cls = self.layer_class()
        return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]

    def activation(self, config) -> str:
        """The MLP activation the model computes (the spec's first activation key)."""
        return getattr(config, self.spec.activation_keys[0], self.spec.default_activation)

    def check_config(self, config) -> None:
        """Refuse, by name, a config value the blocks would not compute as the model does."""
        spec, model_type = self.spec, self.model_type
        for key in sorted(getattr(config, "__dict__", {})):
            if key not in spec.activation_keys and _ACTIVATION_KEY.search(key):
                raise ValueError(
                    f"hyclora: the {model_type} config has {key}={getattr(config, key)!r}, an activation setting "
                    f"hyclora's {model_type} adapter does not read (it reads {', '.join(spec.activation_keys)}); "
                    "refusing rather than computing another activation than the model's. Set "
                    "HyCLoRAConfig(use_hyclora=False) to train this model without hyclora."
                )
        for key in spec.activation_keys:
            act = getattr(config, key, spec.default_activation)
            if act not in spec.activations:
                raise ValueError(
                    f"hyclora: {key}={act!r} is not supported for {model_type}; supported: "
                    f"{', '.join(spec.activations)}. Set HyCLoRAConfig(use_hyclora=False) to train this model "
                    "without hyclora."
                )
        for rule in spec.config_rules:
            value = getattr(config, rule.key, rule.default)
            if value not in rule.accepted:
                raise ValueError(
                    f"hyclora: {rule.key}={value!r} is not supported for {model_type}"
                    f"{' (' + rule.why + ')' if rule.why else ''}; supported: "
                    f"{', '.join(repr(v) for v in rule.accepted)}. Set HyCLoRAConfig(use_hyclora=False) to train "
                    "this model without hyclora."
                )
        impl = getattr(config, "_attn_implementation", None) or "eager"
        check_implementation(impl, model_type)
        if is_s2(impl) and not spec.s2attn:
            raise ValueError(
                f"hyclora: attn_implementation={impl!r} (LongLoRA's S²-Attn) is not supported for {model_type}: its "
                "layers' own attention pattern is not implemented in hyclora's S²-Attn. Use 'sdpa' or 'eager'."
            )
        key = spec.attn_softcap_key
        cap = getattr(config, key, None) if key else None
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
                raise ValueError(f"hyclora: {key}={cap!r} is not a positive soft-capping value ({model_type}).")
            if is_s2(impl):
                raise ValueError(
                    f"hyclora: attn_implementation={impl!r} (LongLoRA's S²-Attn) with {key}={cap!r} ({model_type}): "
                    "the S²-Attn kernels apply no attention logit soft-capping, so the model trained would not be "
                    f"the pretrained model. Train with attn_implementation='eager' (full attention, soft-capping "
                    f"kept), or set config.{key} = None to train under S²-Attn without soft-capping knowingly."
                )
            if impl != "eager":
                raise ValueError(
                    f"hyclora: {model_type} with {key}={cap!r} (attention logit soft-capping) under "
                    f"attn_implementation={impl!r}: transformers applies the soft-capping only in its eager (and "
                    f"flash) attention and drops it under {impl!r}, which hyclora will not silently copy (the model "
                    "trained would not be the pretrained model). Use attn_implementation='eager' (hyclora's eager "
                    f"path keeps no attention map when compressing), or set config.{key} = None to train without "
                    "soft-capping knowingly."
                )

    def check_layer(self, layer: nn.Module, name: str) -> None:
        """Refuse a layer laid out otherwise than the spec: a missing module, or a submodule with
        parameters the blocks would not use (q/k norms, extra norms, cross-attention, adapters on a
        module hyclora does not read); then read every module once."""
        for path in self.spec.layout_paths:
            try:
                get_path(layer, path)
            except AttributeError:
                raise ValueError(
                    f"hyclora: {name} ({type(layer).__name__}) has no {path!r}: this transformers version "
                    f"lays out the {self.spec.family} layer differently from the supported 5.x layout."
                ) from None
        for sub, module in layer.named_modules():
            if sub.split(".")[0] == "hyclora_state" or next(module.parameters(recurse=False), None) is None:
                continue
            if not sub or not any(sub == p or sub.startswith(p + ".") for p in self._owned):
                # sub "": parameters the layer holds itself (a learned residual scale ...), read by no path
                where = (f"{name}.{sub} ({type(module).__name__}) holds parameters" if sub else
                         f"{name} ({type(module).__name__}) holds parameters of its own "
                         f"({', '.join(n for n, _ in module.named_parameters(recurse=False))})")
                raise ValueError(
                    f"hyclora: {where} that hyclora's {self.model_type} "
                    "blocks would not use (they read only "
                    f"{', '.join(self._owned)}); refusing rather than training a different model. Set "
                    "HyCLoRAConfig(use_hyclora=False) to train this model without hyclora."
                )
        self.resolve(layer, name)
        self.resolve_qk_norms(layer, name)
        self.resolve_post_norms(layer, name)

    # -- reading the layer's modules -----------------------------------------------------------
    def resolve_norm(self, module: nn.Module, where: str) -> NormParams:
        return resolve_norm(module, where, self.spec.norm_kind, self._norm_classes)

    def resolve_norms(self, layer: nn.Module, name: str) -> Tuple[NormParams, ...]:
        return tuple(self.resolve_norm(get(layer), f"{name}.{p}") for p, get in self._norms)

    def resolve_qk_norms(self, layer: nn.Module, name: str) -> Tuple[NormParams, ...]:
        """``(q norm, k norm)`` of the spec's ``qk_norms`` (RMSNorms over head_dim), or ``()``."""
        return tuple(resolve_norm(get(layer), f"{name}.{p}", "rms", self._qk_norm_classes)
                     for p, get in self._qk_norms)

    def resolve_post_norms(self, layer: nn.Module, name: str) -> Tuple[NormParams, ...]:
        """``(post-attention norm, post-MLP norm)`` of the spec's ``post_norms`` (Gemma), or ``()``."""
        return tuple(self.resolve_norm(get(layer), f"{name}.{p}") for p, get in self._post_norms)

    def resolve_linears(self, layer: nn.Module, name: str):
        """``((attention metas, params), (mlp metas, params))`` of the spec's linears. A fused
        projection (``spec.fused_projections``) is read once and given as its parts: each a meta
        with its rows (:class:`~hyclora.ops.lora.FusedPart`) and the fused ``(W, bias, A, B)``."""
        widths = self.output_widths(layer, self.layer_config(layer)) if self.spec.fused_projections else None
        groups = []
        for g, linears in enumerate(self._linear_groups):
            metas, params = [], []
            fused: Dict[str, list] = {}  # path -> [meta, params, rows taken so far]
            for k, (short, path, get) in enumerate(linears):
                part = self._fused_parts[g][k]
                if part is None:
                    meta, p = resolve_linear(get(layer), short, f"{name}.{path}")
                else:
                    meta, p = self._resolve_part(layer, name, short, get, part, widths[g], k, fused)
                metas.append(meta)
                params.extend(p)
            groups.append((tuple(metas), params))
        return tuple(groups)

    def _resolve_part(self, layer, name: str, short: str, get, part, widths, k: int, fused):
        """One part of a fused projection: ``(meta with its rows, the fused linear's parameters)``."""
        path, index, count = part
        where = f"{name}.{path}"
        if path not in fused:
            module = get(layer)
            meta, p = resolve_linear(module, path.rsplit(".", 1)[-1], where)
            linears = self._linear_groups[self._fused_group[path]]
            split = [(s, w) for (s, pth, _), w in zip(linears, widths) if pth == path]
            total = sum(w for _, w in split)
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            out = getattr(base, "out_features", None)
            rows_b = p[3].shape[0] if p[3] is not None and p[3].numel() else total
            if out != total or rows_b != total:
                raise ValueError(
                    f"hyclora: {where} has {out} output features (lora_B: {rows_b} rows); hyclora's {self.model_type} "
                    f"blocks split it into {' + '.join(f'{s} {w}' for s, w in split)} = {total} (from the model "
                    "config's heads, head_dim and intermediate_size). Set HyCLoRAConfig(use_hyclora=False) to train "
                    "this model without hyclora."
                )
            fused[path] = [meta, p, 0]
        meta, p, start = fused[path]
        stop = start + widths[k]
        fused[path][2] = stop
        fused_name = path.rsplit(".", 1)[-1]
        return replace(meta, name=f"{fused_name}[{short}]",
                       part=FusedPart(fused_name, index, count, start, stop)), p

    def resolve(self, layer: nn.Module, name: str):
        """``(norms, ((attention metas, params), (mlp metas, params)))``."""
        return self.resolve_norms(layer, name), self.resolve_linears(layer, name)

    def state_key(self, layer: nn.Module):
        """:func:`_linear_key` of the spec's linears (``None`` inside for a linear that cannot be
        keyed): what the layer's resolved linears depend on."""
        keys = []
        for parent, children in self._linear_parents:
            for module in _members(_member_path(layer, parent), children):
                keys.append(_linear_key(module))
        return tuple(keys)

    def resolve_cached(self, layer: nn.Module, patch: LayerPatch):
        """:meth:`resolve`, the linears re-read only when one's adapter state or parameters change
        (reading PEFT's modules costs host time on every layer call); the norms every call."""
        try:
            key = self.state_key(layer)
        except Exception:  # anything unexpected: resolve() raises the clear error, or works
            key = None
        if key is not None and None in key:
            key = None
        cached = patch.resolved
        if key is None or cached is None or cached[0] != key:
            norms, linears = self.resolve(layer, patch.name)
            patch.resolved = None if key is None else (key, linears)
            return norms, linears
        return self.resolve_norms(layer, patch.name), cached[1]

    def layer_config(self, layer: nn.Module):
        """The transformers config the layer's attention module reads."""
        return self._attention(layer).config

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return self._attention(layer)

    def norm_weights(self, layer: nn.Module) -> Tuple[Any, ...]:
        """The weight objects of the layer's norms (then the q/k norms, then the post-norms) as the
        layer holds them now."""
        return tuple(get(layer).weight for _, get in self._norms + self._qk_norms + self._post_norms)

    # -- family hooks ------------------------------------------------------------------------
    def geometry(self, layer: nn.Module, cfg):
        """Non-tensor sizes the blocks take (heads, head size, scaling ...)."""
        raise NotImplementedError

    def dims(self, layer: nn.Module, cfg) -> Dict[str, int]:
        """The layer's sizes by width key of the tensor-spec table (``hidden``, ``q_heads``,
        ``kv_heads``, ``d_ff``)."""
        raise NotImplementedError

    def output_widths(self, layer: nn.Module, cfg) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """Output features of each linear of the spec, per block (attention, MLP): how a fused
        projection splits into its parts (families whose specs may have fused projections)."""
        raise NotImplementedError

    def check_call(self, layer: nn.Module, patch: LayerPatch, arguments: Dict[str, Any], impl: str):
        """Refuse call arguments the blocks do not serve; return the family's block inputs."""
        raise NotImplementedError

    def blocks(self, layer: nn.Module, call: LayerCall) -> Callable[[], torch.Tensor]:
        """A function running the layer's two blocks on ``call.hidden`` (plans built here)."""
        raise NotImplementedError

    # -- patch / unpatch ---------------------------------------------------------------------
    def patch(self, layer: nn.Module, name: str, config) -> None:
        family = self.spec.family
        names = stats_names(family, config.layer_type, self.spec.features) if config.compresses else ()
        widths = tensor_widths(family, self.dims(layer, self.layer_config(layer)))
        device = self.resolve_norms(layer, name)[0].weight.device
        layer.hyclora_state = HyCLoRALayerState(
            widths, names, config.layernorm_outlier_ratio, config.iteration_threshold,
            device=device, recalibrate_every=config.recalibrate_every, family=family,
            refresh=config.recalibrate_mode == "refresh", quick=config.quick_calibration,
        )
        sig = inspect.signature(type(layer).forward)
        params = list(sig.parameters.values())[1:]  # drop self
        var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), "kwargs")
        layer._hyclora_patch = LayerPatch(adapter=self, config=config, name=name,
                                          signature=sig.replace(parameters=params), var_kw=var_kw)
        patch_forward(layer, patched_forward)

    @staticmethod
    def unpatch(layer: nn.Module) -> None:
        if layer.__dict__.get("_hyclora_patch") is None:
            return
        unpatch_forward(layer)
        del layer._hyclora_patch
        if "hyclora_state" in layer._modules:
            del layer._modules["hyclora_state"]

    # -- the final norm ---------------------------------------------------------------------
    def find_final_norms(self, model: nn.Module, layers) -> List[Tuple[str, nn.Module]]:
        """The norm after the last layer (``LlamaModel.norm``) of each stack: the spec's
        ``final_norm`` attribute of the module holding the layer list (none for encoders)."""
        attr = self.spec.final_norm
        if attr is None or self.spec.norm_kind != "rms":
            return []
        parents = {name.rsplit(".", 2)[0] if name.count(".") >= 2 else "" for name, _ in layers}
        found = []
        for name, module in model.named_modules():
            norm = getattr(module, attr, None) if name in parents else None
            if not isinstance(norm, nn.Module):
                continue
            path = f"{name}.{attr}" if name else attr
            try:
                self.resolve_norm(norm, path)
            except ValueError:  # another norm class: left as it is (this patch only saves memory)
                continue
            found.append((path, norm))
        return found

    def patch_final_norm(self, norm: nn.Module, name: str, guard=None, order: int = 0) -> None:
        """Training forwards of the final RMSNorm through :class:`~hyclora.ops.rmsnorm.RMSNormFn`
        (keeps the 16-bit input, not transformers' fp32 upcast; chunked fp32 work): the same
        output, gradients equal to rounding, and less memory at the peak of long-sequence steps,
        which was this norm's backward. Eval and no-grad forwards run the original.
        ``guard``: the layers' :class:`~hyclora.quant.checks.FiniteGuard`, which gets the output's
        finite flag (at ``order``, after the layers')."""
        norm._hyclora_final_norm = (self, name, guard, order)
        patch_forward(norm, _final_norm_forward)

    @staticmethod
    def unpatch_final_norm(norm: nn.Module) -> None:
        if "_hyclora_final_norm" in norm.__dict__:
            unpatch_forward(norm)
            del norm._hyclora_final_norm

    # -- the compressed forward --------------------------------------------------------------
    def setup(self, layer: nn.Module, patch: LayerPatch, cfg, impl: str):
        """``(geometry, S²-Attn group, StoragePolicy)``, checked and built once per (model config
        object, attention module, attention implementation, S²-Attn group, graph capture or not);
        ``check_config`` runs whenever they are rebuilt. The HyCLoRAConfig cannot change while
        a model is patched with it (its fields refuse assignment), so it needs no key."""
        s2 = (getattr(cfg, "s2attn_group_ratio", None), getattr(cfg, "s2attn_group_size", None))
        key = (id(cfg), id(self.attention_module(layer)), impl, s2, patch.under_graph_capture)
        cached = patch.setup
        if cached is not None and cached[0] == key:
            return cached[1]
        self.check_config(cfg)
        policy = StoragePolicy.from_config(patch.config, under_graph_capture=patch.under_graph_capture,
                                           family=self.spec.family, double_bits_extra=self.spec.double_bits)
        value = (self.geometry(layer, cfg), s2, policy)
        patch.setup = (key, value)
        return value

    @staticmethod
    def begin_forward(state: HyCLoRALayerState) -> Calibration:
        """Count this forward unless it recomputes a counted one (see the module docstring)."""
        in_backward = in_backward_pass()
        counted = (not in_backward) or state.owed
        state.owed = False
        stats = state.stats_dict()
        replay = frozenset()
        if counted:
            state.count_forward()
        elif in_backward:
            replay = state.calibrating
        return Calibration(counted, in_backward, stats, replay)

    def compressed_forward(self, layer: nn.Module, patch: LayerPatch, args, kwargs):
        arguments = bind_arguments(patch, args, kwargs)
        hidden = arguments.get("hidden_states", args[0] if args else None)
        if arguments.get("output_attentions"):
            raise ValueError("hyclora: output_attentions=True is not available in the compressed training path.")
        cfg = self.layer_config(layer)
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        check_implementation(impl, patch.name)
        inputs = self.check_call(layer, patch, arguments, impl)
        geometry, s2, policy = self.setup(layer, patch, cfg, impl)

        config = patch.config
        state: HyCLoRALayerState = layer.hyclora_state
        cal = self.begin_forward(state)
        norms, linears = self.resolve_cached(layer, patch)
        if not cal.in_backward:
            warn_unreachable_hooks(((patch.name, layer),))
        # a checkpoint recompute that is not counted replays a forward that was checked already
        check = config.on_nonfinite == "raise" and cal.counted
        common = dict(
            layer_name=patch.name, policy=policy, stats=cal.stats, update=bool(cal.counted and config.compresses),
            check_finite=check, record=state.last_saved, replay=cal.replay,
        )
        run = self.blocks(layer, LayerCall(hidden, impl, inputs, geometry, s2, norms, linears, common))
        return run_checked(patch, check, cal.in_backward, run)


def _final_norm_forward(norm: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    if args or kwargs or not (norm.training and torch.is_grad_enabled()):
        return call_original(norm, hidden_states, *args, **kwargs)
    adapter, name, guard, order = norm._hyclora_final_norm
    weight, _, eps = adapter.resolve_norm(norm, name)
    out = RMSNormFn.apply(hidden_states, weight, eps, adapter.spec.norm_variant)
    if guard is not None:
        guard.record(out, f"{name} (output of the final norm)", order=order)
    return out


def patched_forward(layer: nn.Module, *args, **kwargs):
    """The forward of a patched layer: the compressed path for training forwards with grad."""
    patch: LayerPatch = layer._hyclora_patch
    if not (layer.training and torch.is_grad_enabled()):
        if layer.training and not in_backward_pass():
            # A training-mode forward without grad: the first pass of a checkpoint (or a no_grad
            # evaluation in train mode). Its recompute, if any, is the counted one.
            layer.hyclora_state.owed = True
        return call_original(layer, *args, **kwargs)
    return patch.adapter.compressed_forward(layer, patch, args, kwargs)


__all__ = ["LayerAdapter", "LayerPatch", "LayerCall", "Calibration", "in_backward_pass", "kernels_for_graph_capture",
           "adapter_state_key", "warn_unreachable_hooks", "run_checked", "bind_arguments", "patched_forward"]
