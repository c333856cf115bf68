"""The causal-LM training loss without full logits, inside the model's own forward.

A transformers causal LM computes ``lm_head(hidden)`` for every token, upcasts the logits to fp32
and keeps them and their log-softmax for the backward: (tokens, vocab) tensors in fp32, often more
than hyclora's compressed decoder layers keep. With
``HyCLoRAConfig.lm_loss`` ``"auto"`` (default) or ``"chunked"``, :func:`install_chunked_loss`
puts a :class:`ChunkedLossForward` on the model. In a training forward with labels (a module in
train mode, gradients enabled) it runs the decoder, then
:func:`hyclora.ops.chunked_ce.chunked_cross_entropy` on the final hidden states and the LM-head
weight, and returns the same loss as the model's (HF's shift, ``ignore_index``,
``num_items_in_batch``, ``shift_labels``, Gemma's final soft-capping) with ``logits=None``, as
Liger-Kernel's fused linear cross-entropy does. Every other call (evaluation, generation, no
labels, ``logits_to_keep``, TRL's ``fused_lm_head``, a ZeRO-3 or FSDP2-sharded head) runs the
model's own forward unchanged.

The head and decoder lookups (:func:`split_causal_lm`, :func:`active_head`,
:func:`final_logit_softcap`) are shared with :class:`hyclora.integrations.longseq.CausalLMChunkedLoss`.
"""

from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
from torch import nn

from hyclora.ops.chunked_ce import chunked_cross_entropy

from .peft_utils import is_sharded, is_zero3_param, transformers_model

# kwargs of the model's forward that only its own loss reads (transformers' ForCausalLMLoss)
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# kwargs that ask for something the chunked path does not produce: the model's own forward runs
_OWN_FORWARD_KWARGS = ("fused_lm_head", "output_router_logits")


def active_head(module: nn.Module) -> nn.Module:
    """The module whose weight the LM head's forward would use (unwraps PEFT modules_to_save)."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = [a for a in module.active_adapters if a in module.modules_to_save]
        if module.disable_adapters or not active:
            return module.original_module
        return module.modules_to_save[active[0]]
    if hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
        raise ValueError(
            "The LM head carries a PEFT adapter (e.g. LoRA on lm_head): the chunked loss reads the head's "
            "weight directly and would ignore it. Remove lm_head from target_modules (use modules_to_save "
            "to train it), or compute the loss from the model's logits instead."
        )
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise TypeError(f"LM head {type(module).__name__} has no weight tensor; cannot compute a chunked loss.")
    return module


def split_causal_lm(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """``(decoder, lm_head)`` of a transformers causal LM (PEFT-wrapped or not)."""
    inner = transformers_model(model)
    if not hasattr(inner, "get_output_embeddings") or inner.get_output_embeddings() is None:
        raise TypeError(f"{type(inner).__name__} is not a causal LM with an output embedding (lm_head).")
    config = getattr(inner, "config", None)
    # final_logit_softcapping (Gemma) is applied by the chunked loss itself (final_logit_softcap)
    for attr in ("logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{type(inner).__name__} transforms its logits ({attr}={getattr(config, attr)}); the chunked "
                "loss computes plain hidden @ lm_head.weight and would be wrong. Use the model's own loss."
            )
    decoder = inner.get_decoder()
    if decoder is inner:
        raise TypeError(f"Could not find the decoder inside {type(inner).__name__} (get_decoder returned itself).")
    return decoder, inner.get_output_embeddings()


def final_logit_softcap(model: nn.Module) -> Optional[float]:
    """The final-logit soft-capping of a causal LM's config (Gemma's ``final_logit_softcapping``), or None."""
    inner = transformers_model(model)
    cap = getattr(getattr(inner, "config", None), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter not gathered now."""
    status = getattr(param, "ds_status", None)
    return status is not None and getattr(status, "name", str(status)) == "NOT_AVAILABLE"


def chunked_loss_refusal(hf_model: nn.Module) -> Optional[str]:
    """Why :class:`ChunkedLossForward` cannot reproduce this model's training loss, or None."""
    name = type(hf_model).__name__
    if not name.endswith("ForCausalLM"):
        return f"{name} is not a causal LM (*ForCausalLM)"
    if "forward" in hf_model.__dict__:
        return f"{name}.forward was replaced on the instance by something else"
    if "_loss_function" in hf_model.__dict__ or getattr(hf_model, "loss_type", None) not in (None, "ForCausalLM"):
        return f"{name} has its own loss function (loss_type={getattr(hf_model, 'loss_type', None)!r})"
    config = getattr(hf_model, "config", None)
    if getattr(config, "output_router_logits", False):
        return f"{name} adds a router auxiliary loss"
    params = inspect.signature(type(hf_model).forward).parameters
    if not {"labels", "logits_to_keep"} <= set(params) or not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return f"{name}.forward does not have transformers' causal-LM signature"
    try:
        _, head = split_causal_lm(hf_model)
        head = active_head(head)
    except (TypeError, ValueError) as exc:
        return str(exc)
    # a subclass with its own forward (a quantised Linear4bit, ...) does not compute weight @ hidden
    plain = isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
    if not plain or not head.weight.is_floating_point():
        return f"its LM head is a {type(head).__name__} ({head.weight.dtype}), not a plain floating-point Linear"
    return None


class ChunkedLossForward:
    """A causal LM's ``forward`` (set on the instance) that computes the training loss in chunks
    through the LM head and returns no logits; anything else goes to the class's own forward.
    A class, not a closure, so that a patched model still pickles and deep-copies."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.signature = inspect.signature(type(model).forward)  # binds positional calls by name
        self.var_keyword = next((k for k, p in self.signature.parameters.items()
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @property
    def __signature__(self) -> inspect.Signature:
        # the class's forward's, as ``model.forward`` shows it: the Trainer reads it to keep dataset
        # columns and to pass loss kwargs (num_items_in_batch)
        return self.signature.replace(parameters=list(self.signature.parameters.values())[1:])

    def _own(self, args, kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        model = self.model
        if not (model.training and torch.is_grad_enabled()):
            return self._own(args, kwargs)
        named = dict(self.signature.bind(model, *args, **kwargs).arguments)
        named.pop("self", None)
        extra = dict(named.pop(self.var_keyword, {}))
        labels = named.pop("labels", None)
        logits_to_keep = named.pop("logits_to_keep", 0)
        return_dict = extra.get("return_dict", getattr(model.config, "return_dict", True))
        if (labels is None or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
                or any(extra.get(k) for k in _OWN_FORWARD_KWARGS) or return_dict is False):
            return self._own(args, kwargs)
        decoder, head = split_causal_lm(model)
        head = active_head(head)
        params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
        if any(is_zero3_param(p) or is_sharded(p) for p in params):  # ZeRO-3 / FSDP2
            return self._own(args, kwargs)  # sharded: only the head's own forward gathers it
        out = decoder(**named, **extra)  # the loss kwargs reach the decoder too, as in transformers
        hidden = out.last_hidden_state
        ignore_index = extra.get("ignore_index", -100)
        targets = extra.get("shift_labels")
        if targets is None:  # tokens < n predict n, as transformers' ForCausalLMLoss
            targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        count = extra.get("num_items_in_batch")
        loss = chunked_cross_entropy(
            hidden, head.weight, targets.to(hidden.device), bias=getattr(head, "bias", None),
            ignore_index=ignore_index,
            reduction="mean" if count is None else "sum", softcap=final_logit_softcap(model))
        if count is not None:
            loss = loss / (count.to(loss.device) if torch.is_tensor(count) else count)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))


def install_chunked_loss(hf_model: nn.Module, mode: str) -> Optional[str]:
    """Put :class:`ChunkedLossForward` on ``hf_model`` for ``lm_loss=mode``; returns why it was not
    installed (``"auto"`` on a model it cannot serve, ``"model"``), or None. ``"chunked"`` on such
    a model raises, naming the reason."""
    if mode == "model":
        return "lm_loss='model'"
    reason = chunked_loss_refusal(hf_model)
    if reason is not None:
        if mode == "chunked":
            raise ValueError(f"hyclora: lm_loss='chunked' cannot reproduce this model's loss: {reason}. "
                             "Use HyCLoRAConfig(lm_loss='model') (the model's own loss, full logits).")
        return reason
    hf_model.__dict__["forward"] = ChunkedLossForward(hf_model)
    return None


def uninstall_chunked_loss(hf_model: nn.Module) -> None:
    """Undo :func:`install_chunked_loss` (the class's forward again)."""
    if isinstance(hf_model.__dict__.get("forward"), ChunkedLossForward):
        del hf_model.__dict__["forward"]


def uses_chunked_loss(model: nn.Module) -> bool:
    """Whether the transformers model (inside ``model``) computes its training loss in chunks."""
    return isinstance(transformers_model(model).__dict__.get("forward"), ChunkedLossForward)


__all__ = [
    "ChunkedLossForward", "active_head", "chunked_loss_refusal", "final_logit_softcap", "install_chunked_loss",
    "split_causal_lm", "uninstall_chunked_loss", "uses_chunked_loss", "zero3_partitioned",
]
