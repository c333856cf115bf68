"""``apply_hyclora`` / ``revert_hyclora`` and introspection of a patched model."""

from __future__ import annotations

import logging
from typing import Dict

import torch
from torch import nn

from hyclora.kernels.common import start_compiler_hash

from .adapter import LayerAdapter, warn_unreachable_hooks
from .causal_lm_loss import install_chunked_loss, uninstall_chunked_loss
from .patching import check_forward_reached
from .peft_utils import transformers_model
from .registry import get_adapter, supported_model_types
from .state import exclude_state_from_save_pretrained, include_state_in_save_pretrained

logger = logging.getLogger(__name__)


def _model_config(model: nn.Module):
    config = getattr(transformers_model(model), "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise ValueError(
            "hyclora: apply_hyclora expects a transformers model (or a PEFT model wrapping one) "
            f"with a config; got {type(model).__name__}. Supported model types: "
            f"{', '.join(supported_model_types())}."
        )
    return config


def patched_layers(model: nn.Module):
    """``(name, module)`` of every module of ``model`` that :func:`apply_hyclora` patched."""
    return [(name, m) for name, m in model.named_modules() if "_hyclora_patch" in m.__dict__]


def apply_hyclora(model: nn.Module, config=None) -> nn.Module:
    """Patch the layers of ``model`` in place and return it.

    ``model``: ``peft.get_peft_model(LlamaForCausalLM | MistralForCausalLM | RobertaFor... | BertFor...,
    LoraConfig(...))`` or a bare transformers model of those types whose base linears are frozen
    (e.g. only norms and embeddings trainable). ``config``: a ``HyCLoRAConfig`` (default: ``HyCLoRAConfig()``).
    With ``config.use_hyclora=False`` the model is returned untouched.
    """
    from hyclora.config import HyCLoRAConfig

    config = HyCLoRAConfig() if config is None else config
    if not isinstance(config, HyCLoRAConfig):
        raise TypeError(f"hyclora: apply_hyclora needs a HyCLoRAConfig, got {type(config).__name__}")
    config.validate()
    if not config.use_hyclora:
        return model
    if patched_layers(model):
        raise ValueError("hyclora: this model is already patched; call revert_hyclora(model) first.")
    from hyclora.compat import check_versions

    check_versions()
    model_config = _model_config(model)
    adapter: LayerAdapter = get_adapter(model_config.model_type)
    adapter.check_config(model_config)
    layers = adapter.find_layers(model)
    if not layers:
        raise ValueError(
            f"hyclora: found no {adapter.layer_class().__name__} in this {model_config.model_type} "
            "model; is it a supported transformers 5.x model?"
        )
    for name, layer in layers:  # check everything before touching anything
        adapter.check_layer(layer, name)
    from hyclora.quant.checks import FiniteGuard

    why_not = install_chunked_loss(transformers_model(model), config.lm_loss)  # raises before anything is patched
    if why_not is not None and config.lm_loss == "auto":
        logger.info("hyclora: lm_loss='auto' keeps the model's own LM loss: %s", why_not)
    guard = FiniteGuard()  # one per model: all layers' NaN/Inf flags, read once per step
    norms = adapter.find_final_norms(model, layers)
    for order, (name, layer) in enumerate(layers):
        adapter.patch(layer, name, config)
        layer._hyclora_patch.guard = guard
        layer._hyclora_patch.order = order
    check = guard if config.on_nonfinite == "raise" else None
    for name, norm in norms:
        adapter.patch_final_norm(norm, name, check, order=len(layers))
    if check is not None:
        _install_output_check(transformers_model(model), check, order=len(layers) + 1)
    warn_unreachable_hooks(layers)
    try:
        for name, module in layers + norms:
            check_forward_reached(module, name)
    except RuntimeError:
        revert_hyclora(model)
        raise
    # save_pretrained (e.g. of merge_and_unload()'s still-patched model) writes the plain keys;
    # state_dict keeps the statistics for checkpoints
    exclude_state_from_save_pretrained(model)
    config._attach()  # field assignments now raise, naming revert_hyclora + apply_hyclora
    param = next(layers[0][1].parameters(), None)
    if param is not None:
        start_compiler_hash(param.device, config.kernel_backend)  # overlaps the set-up before the first step
    return model


def revert_hyclora(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_hyclora`: original forwards back, ``hyclora_state`` removed."""
    layers = patched_layers(model)
    configs = {id(layer._hyclora_patch.config): layer._hyclora_patch.config for _, layer in layers}
    for _, layer in layers:
        LayerAdapter.unpatch(layer)
    include_state_in_save_pretrained(model)
    for config in configs.values():
        config._detach()
    uninstall_chunked_loss(transformers_model(model))
    for module in model.modules():
        LayerAdapter.unpatch_final_norm(module)
        handle = module.__dict__.pop("_hyclora_output_check", None)
        if handle is not None:
            handle.remove()
    return model


class _OutputCheck:
    """Forward hook queuing "finite" flags of the model's logits and loss into the layers' guard:
    a NaN born after the last decoder layer (LM head, loss) reaches the layers only as NaN
    gradients, so the step's one host read (in the first layer's backward) must see these flags
    too. A class, not a closure, so that a patched model still pickles."""

    def __init__(self, guard, order: int):
        self.guard, self.order = guard, order

    def __call__(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()) or not hasattr(output, "get"):
            return
        for offset, (key, why) in enumerate((("logits", ""), ("loss", "; a batch whose labels are all -100 has a NaN loss"))):
            value = output.get(key)
            if torch.is_tensor(value) and value.requires_grad:
                self.guard.record(value, f"the model's {key} (after the last decoder layer{why})", order=self.order + offset)


def _install_output_check(hf_model: nn.Module, guard, order: int) -> None:
    hf_model.__dict__["_hyclora_output_check"] = hf_model.register_forward_hook(_OutputCheck(guard, order))


def is_patched(model: nn.Module) -> bool:
    return bool(patched_layers(model))


def buffered_tensors(model: nn.Module) -> Dict[str, Dict[str, list]]:
    """What each patched layer kept for the backward in its last training forward.

    Returns ``{layer_name: {"attention": [...], "mlp": [...]}}``; each entry is a dict with
    ``name`` (e.g. ``x_in``, ``q``, ``probs``), ``kind`` (``plain``/``quant``/``sparse``),
    ``parts`` (``(shape, dtype)`` of each stored tensor) and ``nbytes``. Shared inputs that
    every layer references (cos/sin, the mask) and parameters are not listed. Empty before the
    first training forward.
    """
    out: Dict[str, Dict[str, list]] = {}
    for name, layer in patched_layers(model):
        out[name] = {k: list(v) for k, v in layer.hyclora_state.last_saved.items()}
    return out


__all__ = ["apply_hyclora", "revert_hyclora", "is_patched", "buffered_tensors", "patched_layers"]
