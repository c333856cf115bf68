"""Reading PEFT / transformers modules into the plain tensors and metadata the ops take.

Duck-typed on PEFT's ``LoraLayer`` attributes (``base_layer``, ``lora_A``, ``lora_B``,
``scaling``, ``lora_dropout``) so that PEFT internals that do not matter here can move.
Unsupported PEFT features are refused with a message listing what is supported.
"""

from __future__ import annotations

from typing import Collection, Dict, FrozenSet, NamedTuple, Optional

import torch
from torch import nn

from hyclora.ops.lora import LinearMeta

from .patching import original_class
from .spec import qualified_name

SUPPORTED_PEFT = (
    "plain LoRA (peft LoraConfig) with one active adapter, any subset of "
    "q/k/v/o/gate/up/down_proj (Phi-3: qkv/o/gate_up/down_proj) as targets, lora_dropout, use_rslora, "
    "bias on the base layer"
)


_CLASS_NAMES: Dict[type, FrozenSet[str]] = {}


def class_attribute_names(cls: type) -> FrozenSet[str]:
    """Every name ``cls`` or a base defines (a property there shadows nn.Module's registries),
    once per class."""
    names = _CLASS_NAMES.get(cls)
    if names is None:
        names = _CLASS_NAMES[cls] = frozenset(n for k in cls.__mro__ for n in k.__dict__)
    return names


_MISSING = object()
_NO_ENTRIES: Dict[str, object] = {}
_MODULE_GETATTR = nn.Module.__getattr__


def module_attr(module, name: str, default=None):
    """``getattr(module, name, default)``, read from the instance dict and nn.Module's registries
    when that is where ``getattr`` would find it: a missing name otherwise raises and catches an
    AttributeError inside ``nn.Module.__getattr__``, host time on every layer call."""
    cls = type(module)
    if (not isinstance(module, nn.Module) or cls.__getattr__ is not _MODULE_GETATTR
            or name in class_attribute_names(cls)):
        return getattr(module, name, default)
    d = module.__dict__
    value = d.get(name, _MISSING)
    if value is not _MISSING:
        return value
    # nn.Module.__getattr__'s own order; indexing, not .get: DeepSpeed ZeRO-3's parameter dict
    # gathers a partitioned parameter in __getitem__
    for key in ("_parameters", "_buffers", "_modules"):
        registry = d.get(key, _NO_ENTRIES)
        if name in registry:
            return registry[name]
    return default


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (``get_base_model()``), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_sharded(tensor: Optional[torch.Tensor]) -> bool:
    """True when ``tensor`` is an FSDP2 shard (a ``DTensor``): what a module's parameters are
    between its unshard and reshard."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def is_zero3_param(param: torch.Tensor) -> bool:
    """True when DeepSpeed ZeRO-3 manages ``param`` (it sets ``ds_id`` on every parameter it
    partitions, in place, so the answer can change after a model was patched)."""
    return hasattr(param, "ds_id")


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


def is_tuner_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "active_adapters")


def _unsupported(where: str, what: str) -> ValueError:
    return ValueError(
        f"hyclora: {where} uses {what}, which hyclora does not support. Supported: {SUPPORTED_PEFT}. "
        "Set HyCLoRAConfig(use_hyclora=False) to train this model without hyclora."
    )


def _bnb_weight_fn(base: nn.Module, where: str):
    """NF4/FP4 bitsandbytes ``Linear4bit``: dequantise the weight inside the block."""
    weight = base.weight
    if weight.device.type != "cuda":
        raise ValueError(
            f"hyclora: {where} is a bitsandbytes Linear4bit on {weight.device.type}; 4-bit base "
            "weights are supported on CUDA only."
        )
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - only with a broken bnb install
        raise ValueError(f"hyclora: {where} is a Linear4bit but bitsandbytes cannot be imported") from exc

    def weight_fn(w: torch.Tensor) -> torch.Tensor:
        return bnbf.dequantize_4bit(w.data if isinstance(w, nn.Parameter) else w, w.quant_state)

    return weight_fn


def _base_linear(base: nn.Module, where: str):
    """``(weight, bias, weight_fn)`` of a frozen base linear."""
    cls = type(base)
    if cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes"):
        return base.weight, base.bias, _bnb_weight_fn(base, where)
    if isinstance(base, nn.Linear) and not cls.__module__.startswith("bitsandbytes"):
        return base.weight, base.bias, None
    raise ValueError(
        f"hyclora: {where} is a {cls.__module__}.{cls.__name__}; supported base layers are "
        "torch.nn.Linear and bitsandbytes Linear4bit (NF4/FP4, CUDA)."
    )


def resolve_linear(module: nn.Module, name: str, where: str, training: bool = True):
    """Return ``(LinearMeta, (weight, bias, lora_A, lora_B))`` for one projection."""
    if is_lora_layer(module):
        if getattr(module, "merged", False):
            raise _unsupported(where, "a merged LoRA adapter (unmerge it before training: model.unmerge_adapter())")
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
        if is_tuner_layer(base):
            raise _unsupported(where, "nested adapter layers")
        weight, bias, weight_fn = _base_linear(base, where)
        if getattr(module, "fan_in_fan_out", False):
            raise _unsupported(where, "fan_in_fan_out=True")
        active = list(module.active_adapters)
        if len(active) > 1:
            raise _unsupported(where, f"several active adapters {active}")
        if getattr(module, "disable_adapters", False) or not active or active[0] not in module.lora_A:
            return LinearMeta(name, False, weight_fn=weight_fn), (weight, bias, None, None)
        adapter = active[0]
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            variant = type(module.lora_variant.get(adapter)).__name__ if adapter in getattr(module, "lora_variant", {}) else "DoRA"
            raise _unsupported(where, f"a LoRA variant ({variant}; e.g. DoRA)")
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        if not isinstance(lora_a, nn.Linear) or not isinstance(lora_b, nn.Linear):
            raise _unsupported(where, f"LoRA modules of type {type(lora_a).__name__}")
        if lora_b.bias is not None or lora_a.bias is not None:
            raise _unsupported(where, "lora_bias=True")
        if lora_a.weight.dtype != lora_b.weight.dtype:
            raise _unsupported(where, "lora_A and lora_B of different dtypes")
        dropout = module.lora_dropout[adapter] if adapter in module.lora_dropout else None
        p = 0.0
        if isinstance(dropout, nn.Dropout):
            p = float(dropout.p) if (dropout.training and training) else 0.0
        elif dropout is not None and not isinstance(dropout, nn.Identity):
            raise _unsupported(where, f"a lora_dropout module of type {type(dropout).__name__}")
        scaling = float(module.scaling[adapter])
        meta = LinearMeta(name, True, scaling=scaling, dropout_p=p, weight_fn=weight_fn)
        return meta, (weight, bias, lora_a.weight, lora_b.weight)
    if is_tuner_layer(module):
        raise _unsupported(where, f"a non-LoRA PEFT tuner layer ({type(module).__name__})")
    weight, bias, weight_fn = _base_linear(module, where)
    return LinearMeta(name, False, weight_fn=weight_fn), (weight, bias, None, None)


_NORM_CLASSES: Dict[type, tuple] = {}


def _norm_class(module: nn.Module):
    """``(original class, its qualified name)`` of ``module``, once per class: both follow from
    the class alone (a patched module gets a new subclass, no class is changed)."""
    cls = type(module)
    known = _NORM_CLASSES.get(cls)
    if known is None:
        original = original_class(module)
        known = _NORM_CLASSES[cls] = (original, qualified_name(original))
    return known


class NormParams(NamedTuple):
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]  # None for RMSNorm
    eps: float


def unwrap_modules_to_save(module: nn.Module) -> nn.Module:
    """The module PEFT's ``ModulesToSaveWrapper`` runs now (the trained copy of the active adapter,
    or the original with adapters disabled); ``module`` itself when it is no such wrapper."""
    if (module_attr(module, "original_module", _MISSING) is not _MISSING
            and module_attr(module, "modules_to_save", _MISSING) is not _MISSING):
        active = list(getattr(module, "active_adapters", [])) or [getattr(module, "active_adapter", None)]
        if getattr(module, "disable_adapters", False) or active[0] not in module.modules_to_save:
            return module.original_module
        return module.modules_to_save[active[0]]
    return module


def resolve_norm(module: nn.Module, where: str, kind: str, classes: Collection[str]) -> NormParams:
    """``(weight, bias, eps)`` of a norm of ``kind`` (``"rms"``: weight and ``variance_epsilon`` /
    ``eps``, no bias; ``"layer"``: ``torch.nn.LayerNorm`` over the last dimension), unwrapping
    PEFT's ``ModulesToSaveWrapper``. Its class must be one of ``classes`` (qualified names): a norm
    of another class may compute something else from the same parameters (Gemma's ``1 + w``)."""
    module = unwrap_modules_to_save(module)
    cls, name = _norm_class(module)
    if name not in classes:
        raise ValueError(
            f"hyclora: {where} is a {name}; hyclora's blocks for this layer support {', '.join(sorted(classes))}. "
            "Set HyCLoRAConfig(use_hyclora=False) to train this model without hyclora."
        )
    if kind == "layer":
        if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
            raise ValueError(f"hyclora: {where} is a {cls.__name__}, expected a torch.nn.LayerNorm over the "
                             "hidden dimension (BERT/RoBERTa post-LN layout).")
        return NormParams(module.weight, module.bias, float(module.eps))
    eps = module_attr(module, "variance_epsilon")
    if eps is None:
        eps = module_attr(module, "eps")
    weight = module_attr(module, "weight")
    if eps is None or not isinstance(weight, torch.Tensor) or module_attr(module, "bias") is not None:
        raise ValueError(
            f"hyclora: {where} is a {cls.__name__}, expected an RMSNorm with a weight and "
            "variance_epsilon (Llama/Mistral RMSNorm)."
        )
    return NormParams(weight, None, float(eps))


__all__ = ["transformers_model", "resolve_linear", "resolve_norm", "unwrap_modules_to_save", "NormParams", "is_lora_layer",
           "is_sharded", "SUPPORTED_PEFT"]
