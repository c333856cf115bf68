"""Patching of Llama-style decoder layers (Llama, Mistral): the only place that knows the
transformers module layout of those layers.

A patched layer keeps its modules and parameters untouched; only its class is swapped for a
subclass whose ``forward`` is hyclora's (:mod:`.patching`, so that transformers' own wrappers of
``forward`` wrap hyclora's). That forward takes the compressed path (two autograd Functions from
``hyclora.ops.blocks``) only for a training forward with grad enabled, and calls the original
forward otherwise, so eval, ``no_grad`` and ``generate()`` are exactly the unpatched model.

Calibration and gradient checkpointing: a layer updates its statistics on a counted training
forward. A non-reentrant checkpoint recomputes the layer inside the backward (the graph-task
id is set); that recompute is not counted, because the first forward already was. A
reentrant checkpoint runs the first forward under ``no_grad`` (original path) and the only
compressed forward inside the backward; the ``no_grad`` training forward leaves an ``owed``
mark, so that recompute is counted.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from hyclora.ops.attention import block_attention_mask, check_implementation
from hyclora.ops.blocks import AttentionPlan, MLPPlan, attention_block, mlp_block
from hyclora.ops.rmsnorm import RMSNormFn
from hyclora.ops.storage import StoragePolicy

from .patching import call_original, patch_forward, unpatch_forward
from .peft_utils import resolve_linear, resolve_norm
from .state import ATTENTION_TENSORS, ELEMENTWISE_TENSORS, MLP_TENSORS, HyCLoRALayerState, tensor_widths

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_ACTIVATIONS = ("silu", "swish")


@dataclass
class _Patch:
    adapter: "LlamaFamilyAdapter"
    config: Any  # HyCLoRAConfig
    name: str
    signature: inspect.Signature
    var_kw: str
    # shared by all layers of one model (set by apply_hyclora): the deferred NaN/Inf check
    guard: Any = None  # hyclora.quant.checks.FiniteGuard
    order: int = 0  # this layer's position among the model's patched layers
    # host-time caches of compressed_forward (see there); rebuilt whenever their key changes
    resolved: Any = None  # (key, (attn metas, attn params, mlp metas, mlp params))
    setup: Any = None  # (key, (geometry, s2 group, StoragePolicy))
    # the layer's submodules (for the hook check), refreshed when the resolved linears change
    cached_submodules: Any = None
    warned_hooks: set = field(default_factory=set)

    def submodules(self, layer: nn.Module):
        cached = self.cached_submodules
        if self.resolved is None or cached is None or cached[0] is not self.resolved:
            cached = self.cached_submodules = (self.resolved, _submodules(layer))
        return cached[1]


def in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward on this thread (a checkpoint's recompute
    runs inside one)."""
    return torch._C._current_graph_task_id() != -1


def adapter_state_key(layer: nn.Module):
    """:func:`_linear_key` of the seven linears of a Llama-style decoder layer (``None`` inside
    for a linear that cannot be keyed): what the layer's resolved linears depend on."""
    attn, mlp = layer.self_attn, layer.mlp
    return (tuple(_linear_key(getattr(attn, p)) for p in ATTN_PROJ)
            + tuple(_linear_key(getattr(mlp, p)) for p in MLP_PROJ))


def _linear_key(module: nn.Module):
    """What :func:`resolve_linear`'s result depends on that can change after ``apply_hyclora``:
    the module itself, its active adapter(s), disabled/merged state, training mode (dropout), the
    scaling of the active adapter and the identity of every parameter it returns. Public PEFT
    attributes only; ``None`` (do not cache) for anything else, which then resolves each call."""
    ad = getattr(module, "active_adapters", None)
    if ad is None or not hasattr(module, "lora_A"):
        if isinstance(module, nn.Linear):
            return (id(module), id(module.weight), id(module.bias))
        return None
    first = ad[0] if len(ad) else None
    lora_a, lora_b, drop = module.lora_A, module.lora_B, module.lora_dropout
    base = module.base_layer
    a = lora_a[first] if first in lora_a else None
    b = lora_b[first] if first in lora_b else None
    d = drop[first] if first in drop else None
    return (id(module), tuple(ad), module.disable_adapters, module.merged, module.scaling.get(first),
            None if d is None else (id(d), d.training), id(base), id(base.weight), id(base.bias),
            None if a is None else (id(a), id(a.weight)), None if b is None else (id(b), id(b.weight)))


# Hooks from these packages are their own machinery (ZeRO-3, PEFT's adapter routing ...), not a
# user's hook that would be silently skipped.
_FRAMEWORK_HOOK_MODULES = ("torch", "deepspeed", "accelerate", "peft", "transformers", "hyclora")
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _user_hooks(layer: nn.Module, submodules):
    """``(submodule name, hook)`` of the user hooks on the submodules of a patched layer."""
    for sub_name, sub in submodules:
        if not (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks):
            continue
        for attr in _HOOK_DICTS:
            for hook in getattr(sub, attr).values():
                origin = getattr(getattr(hook, "func", hook), "__module__", None) or ""
                if origin.split(".")[0] not in _FRAMEWORK_HOOK_MODULES:
                    yield sub_name, hook


def warn_unreachable_hooks(layers, seen=None) -> None:
    """Warn once per hook registered on a submodule of a patched layer (``mlp``, ``self_attn``,
    ``q_proj``, the norms, ``act_fn`` ...): hyclora's training forward runs fused blocks on the
    layer's weights and never calls those submodules, so their hooks do not fire there (they do
    under ``no_grad`` / ``eval()``, which run the original forward)."""
    import warnings

    for name, layer in layers:
        patch = layer.__dict__.get("_hyclora_patch")
        submodules = patch.submodules(layer) if patch is not None else _submodules(layer)
        warned = patch.warned_hooks if patch is not None else set()
        for sub_name, hook in _user_hooks(layer, submodules):
            key = (sub_name, id(hook))
            if key in warned:
                continue
            warned.add(key)
            warnings.warn(
                f"hyclora: the hook {getattr(hook, '__qualname__', hook)!r} on {name}.{sub_name} does not run in "
                "hyclora's training forward (the decoder layer runs fused compressed blocks, not its submodules); "
                "it runs only in no_grad / eval forwards. Register it on the decoder layer itself, or train "
                "without hyclora (HyCLoRAConfig(use_hyclora=False)) where the hook must see every step.",
                UserWarning, stacklevel=3,
            )


def _submodules(layer: nn.Module):
    return tuple((n, m) for n, m in layer.named_modules() if n and not n.startswith("hyclora_state"))


def run_checked(patch: _Patch, check: bool, in_backward: bool, run: Callable[[], torch.Tensor]):
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


class LlamaFamilyAdapter:
    """Patches decoder layers whose structure is Llama's (Llama, Mistral and relatives)."""

    def __init__(self, model_type: str, layer_class_path: Tuple[str, str]):
        self.model_type = model_type
        self._layer_class_path = layer_class_path

    # -- discovery and checks ----------------------------------------------------------------
    def layer_class(self):
        module, name = self._layer_class_path
        return getattr(__import__(module, fromlist=[name]), name)

    def find_layers(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        cls = self.layer_class()
        return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]

    def check_config(self, config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hyclora: hidden_act={act!r} is not supported for {self.model_type}; supported: "
                f"{', '.join(SUPPORTED_ACTIVATIONS)} (SwiGLU MLP)."
            )
        if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
            raise ValueError(
                f"hyclora: attention_dropout={config.attention_dropout} is not supported (Llama and "
                "Mistral are trained with 0); set config.attention_dropout = 0.0."
            )
        check_implementation(getattr(config, "_attn_implementation", None) or "eager", self.model_type)

    def check_layer(self, layer: nn.Module, name: str) -> None:
        for path in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, path):
                raise ValueError(
                    f"hyclora: {name} ({type(layer).__name__}) has no {path!r}: this transformers "
                    "version lays out the decoder layer differently from the supported 5.x layout."
                )
        self.resolve(layer, name)

    def resolve(self, layer: nn.Module, name: str, training: bool = True):
        """Read the layer's modules: ``(norm1, norm2, attn metas+params, mlp metas+params)``."""
        attn, mlp = layer.self_attn, layer.mlp
        norm1 = resolve_norm(layer.input_layernorm, f"{name}.input_layernorm")
        norm2 = resolve_norm(layer.post_attention_layernorm, f"{name}.post_attention_layernorm")
        a_metas, a_params, m_metas, m_params = [], [], [], []
        for proj in ATTN_PROJ:
            meta, params = resolve_linear(getattr(attn, proj), proj, f"{name}.self_attn.{proj}", training)
            a_metas.append(meta)
            a_params.extend(params)
        for proj in MLP_PROJ:
            meta, params = resolve_linear(getattr(mlp, proj), proj, f"{name}.mlp.{proj}", training)
            m_metas.append(meta)
            m_params.extend(params)
        return norm1, norm2, (tuple(a_metas), a_params), (tuple(m_metas), m_params)

    @staticmethod
    def _geometry(layer: nn.Module):
        attn = layer.self_attn
        cfg = attn.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return heads, kv_heads, attn.head_dim, float(attn.scaling), bool(getattr(attn, "is_causal", True))

    # -- patch / unpatch ---------------------------------------------------------------------
    def patch(self, layer: nn.Module, name: str, config) -> None:
        heads, kv_heads, head_dim, _, _ = self._geometry(layer)
        cfg = layer.self_attn.config
        widths = tensor_widths(cfg.hidden_size, cfg.intermediate_size, heads, kv_heads, head_dim)
        names: List[str] = []
        if config.compresses:
            names = list(ATTENTION_TENSORS + MLP_TENSORS)
            if config.layer_type == "intra":
                names += list(ELEMENTWISE_TENSORS)
        norm_weight = resolve_norm(layer.input_layernorm, name)[0]
        layer.hyclora_state = HyCLoRALayerState(
            widths, names, config.layernorm_outlier_ratio, config.iteration_threshold,
            device=norm_weight.device, recalibrate_every=config.recalibrate_every,
        )
        sig = inspect.signature(type(layer).forward)
        params = list(sig.parameters.values())[1:]  # drop self
        var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), "kwargs")
        layer._hyclora_patch = _Patch(adapter=self, config=config, name=name,
                                      signature=sig.replace(parameters=params), var_kw=var_kw)
        patch_forward(layer, _patched_forward)

    # -- the final norm ---------------------------------------------------------------------
    @staticmethod
    def find_final_norms(model: nn.Module, layers) -> List[Tuple[str, nn.Module]]:
        """The norm after the last decoder layer (``LlamaModel.norm``) of each decoder stack:
        the ``norm`` attribute of the module holding the ``layers`` list (none for encoders)."""
        parents = {name.rsplit(".", 2)[0] if name.count(".") >= 2 else "" for name, _ in layers}
        found = []
        for name, module in model.named_modules():
            norm = getattr(module, "norm", None) if name in parents else None
            if not isinstance(norm, nn.Module):
                continue
            path = f"{name}.norm" if name else "norm"
            try:
                resolve_norm(norm, path)
            except ValueError:  # not an RMSNorm: left as it is (this patch only saves memory)
                continue
            found.append((path, norm))
        return found

    @staticmethod
    def patch_final_norm(norm: nn.Module, name: str, guard=None, order: int = 0) -> None:
        """Training forwards of the final RMSNorm through :class:`~hyclora.ops.rmsnorm.RMSNormFn`
        (keeps the bf16 input, not transformers' fp32 upcast; chunked fp32 work): the same output,
        gradients equal to rounding, and at 7B/64k with checkpointing 6 GiB less at the step's
        peak, which was this norm's backward. Eval and no-grad forwards run the original.
        ``guard``: the layers' :class:`~hyclora.quant.checks.FiniteGuard`, which gets the output's
        finite flag (at ``order``, after the layers')."""
        norm._hyclora_final_norm = (name, guard, order)
        patch_forward(norm, _final_norm_forward)

    @staticmethod
    def unpatch_final_norm(norm: nn.Module) -> None:
        if "_hyclora_final_norm" in norm.__dict__:
            unpatch_forward(norm)
            del norm._hyclora_final_norm

    @staticmethod
    def unpatch(layer: nn.Module) -> None:
        patch: _Patch = layer.__dict__.get("_hyclora_patch")
        if patch is None:
            return
        unpatch_forward(layer)
        del layer._hyclora_patch
        if "hyclora_state" in layer._modules:
            del layer._modules["hyclora_state"]

    def resolve_cached(self, layer: nn.Module, patch: _Patch):
        """:meth:`resolve`, re-read only when a linear's adapter state or parameters change
        (``_linear_key``; reading PEFT's modules took ~0.2 ms of host time per layer call).
        The norms are read every call (cheap)."""
        try:
            key = adapter_state_key(layer)
        except Exception:  # anything unexpected: resolve() raises the clear error, or works
            key = None
        if key is not None and None in key:
            key = None
        cached = patch.resolved
        if key is None or cached is None or cached[0] != key:
            norm1, norm2, attn_part, mlp_part = self.resolve(layer, patch.name)
            patch.resolved = None if key is None else (key, (attn_part, mlp_part))
            return norm1, norm2, attn_part, mlp_part
        name = patch.name
        norm1 = resolve_norm(layer.input_layernorm, f"{name}.input_layernorm")
        norm2 = resolve_norm(layer.post_attention_layernorm, f"{name}.post_attention_layernorm")
        return (norm1, norm2) + cached[1]

    def _setup(self, layer: nn.Module, patch: _Patch, cfg, impl: str):
        """Geometry, S²-Attn group and storage policy, checked and built once per (model config
        object, attention implementation, S²-Attn group, hyclora knobs); ``check_config`` runs
        whenever they are rebuilt."""
        s2 = (getattr(cfg, "s2attn_group_ratio", None), getattr(cfg, "s2attn_group_size", None))
        config = patch.config
        knobs = (config.layer_type, config.q_bit, config.softmax_outlier_ratio, config.kernel_backend,
                 getattr(config, "attention_probs", "auto"))  # a HyCLoRAConfig changed in place counts
        key = (id(cfg), id(layer.self_attn), impl, s2, knobs)
        cached = patch.setup
        if cached is not None and cached[0] == key:
            return cached[1]
        self.check_config(cfg)
        policy = StoragePolicy(*knobs[:4], probs=knobs[4])
        value = (self._geometry(layer), s2, policy)
        patch.setup = (key, value)
        return value

    # -- the compressed forward --------------------------------------------------------------
    def compressed_forward(self, layer: nn.Module, patch: _Patch, args, kwargs):
        if len(args) <= 1 and patch.var_kw not in kwargs:
            # transformers passes the hidden states positionally and the rest by keyword: the
            # arguments are the keywords as they are (Signature.bind took ~5 us per call)
            arguments: Dict[str, Any] = dict(kwargs)
            if args:
                if "hidden_states" in arguments:
                    raise TypeError("hyclora: hidden_states given both positionally and by keyword")
                arguments["hidden_states"] = args[0]
        else:
            bound = patch.signature.bind(*args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.update(arguments.pop(patch.var_kw, {}) or {})
        hidden = arguments.get("hidden_states", args[0] if args else None)
        mask = arguments.get("attention_mask")
        pos = arguments.get("position_embeddings")
        name = patch.name
        if pos is None:
            raise ValueError(
                f"hyclora: {name} was called without position_embeddings; hyclora needs the "
                "(cos, sin) tables the transformers 5.x model passes to its decoder layers."
            )
        if arguments.get("output_attentions"):
            raise ValueError("hyclora: output_attentions=True is not available in the compressed training path.")
        layer_idx = None
        for value in arguments.values():
            if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, tuple)):
                continue
            if layer_idx is None:
                layer_idx = getattr(layer.self_attn, "layer_idx", 0)
            # Any KV cache (5.17 passes it as past_key_values, newer versions as cache): the
            # training path does not fill it, and cannot attend to tokens already in it.
            get_len = getattr(value, "get_seq_length", None)
            if callable(get_len) and not torch.is_tensor(value) and get_len(layer_idx) > 0:
                raise ValueError(
                    f"hyclora: {name} got a KV cache that already holds tokens; training with a "
                    "pre-filled cache (prefix tuning) is not supported. Pass use_cache=False."
                )
        cfg = layer.self_attn.config
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        check_implementation(impl, name)
        mask = block_attention_mask(impl, mask, name)  # S²-Attn's lazy mask -> a tensor the block saves
        geometry, (s2_ratio, s2_size), policy = self._setup(layer, patch, cfg, impl)

        config = patch.config
        state: HyCLoRALayerState = layer.hyclora_state
        in_backward = in_backward_pass()
        counted = (not in_backward) or state.owed
        state.owed = False
        stats = state.stats_dict()
        replay = frozenset()
        if counted:
            state.count_forward()
        elif in_backward:
            replay = state.calibrating

        (w1, eps1), (w2, eps2), (a_metas, a_params), (m_metas, m_params) = self.resolve_cached(layer, patch)
        if not in_backward:
            warn_unreachable_hooks(((name, layer),))
        heads, kv_heads, head_dim, scaling, is_causal = geometry
        # a checkpoint recompute that is not counted replays a forward that was checked already
        check = config.on_nonfinite == "raise" and counted
        common = dict(
            layer_name=name, policy=policy, stats=stats, update=bool(counted and config.compresses),
            check_finite=check, record=state.last_saved, replay=replay,
        )
        cos, sin = pos
        aplan = AttentionPlan(
            eps=eps1, linears=a_metas, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            scaling=scaling, impl=impl, is_causal=is_causal,
            s2_group_ratio=s2_ratio, s2_group_size=s2_size, **common,
        )
        mplan = MLPPlan(eps=eps2, linears=m_metas, d_ff=getattr(cfg, "intermediate_size", 0) or 0, **common)

        def run():
            h = attention_block(aplan, hidden, w1, cos, sin, mask, a_params)
            return mlp_block(mplan, h, w2, m_params)

        return run_checked(patch, check, in_backward, run)


def _final_norm_forward(norm: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    if args or kwargs or not (norm.training and torch.is_grad_enabled()):
        return call_original(norm, hidden_states, *args, **kwargs)
    name, guard, order = norm._hyclora_final_norm
    weight, eps = resolve_norm(norm, name)
    out = RMSNormFn.apply(hidden_states, weight, eps)
    if guard is not None:
        guard.record(out, f"{name} (output of the final norm)", order=order)
    return out


def _patched_forward(layer: nn.Module, *args, **kwargs):
    patch: _Patch = layer._hyclora_patch
    if not (layer.training and torch.is_grad_enabled()):
        if layer.training and not in_backward_pass():
            # A training-mode forward without grad: the first pass of a checkpoint (or a no_grad
            # evaluation in train mode). Its recompute, if any, is the counted one.
            layer.hyclora_state.owed = True
        return call_original(layer, *args, **kwargs)
    return patch.adapter.compressed_forward(layer, patch, args, kwargs)


__all__ = ["LlamaFamilyAdapter"]
