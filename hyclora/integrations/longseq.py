"""Long-sequence fine-tuning glue for transformers 5.x / PEFT (LongLoRA recipe).

* S²-Attn through transformers' registries: :func:`enable_s2attn` registers the attention function
  ``"hyclora_s2attn"`` in ``AttentionInterface`` *and* a mask function of the same name in
  ``AttentionMaskInterface`` (without the latter transformers silently passes ``attention_mask=None``
  and causal masking is lost), then switches the model to it with ``set_attn_implementation``.
  No modeling file or ``forward`` is patched, so this survives transformers releases that keep the
  interface.
* Training vs eval: the attention function looks at ``module.training``. In training it runs
  :func:`hyclora.ops.s2attn.s2_attention`; in eval mode (``model.eval()``, generation) it runs
  transformers' own sdpa attention on the full causal (+padding) mask, so evaluation uses full
  attention with no switch to remember. :func:`disable_s2attn` restores the previous implementation.
* The mask function returns ``None`` for plain causal batches (sdpa's ``is_causal`` fast path) and
  otherwise a lazy :class:`~hyclora.ops.s2attn.IndexMask` wrapping transformers' own mask predicate
  (padding, packed sequences from ``position_ids``, sliding window, ...). S²-Attn evaluates it only on
  its diagonal group blocks; eval materialises it through ``sdpa_mask`` exactly like ``"sdpa"``.
* :func:`set_rope_linear_scaling`: linear RoPE position interpolation to a target context
  (LongLoRA: factor ``ceil(target / original)``), spelt ``config.rope_parameters`` in 5.x.
* :func:`longlora_lora_config`: LoRA + trainable embeddings and norms (PEFT ``modules_to_save``, so
  the saved adapter carries them).
* :class:`CausalLMChunkedLoss`: causal-LM loss through :func:`hyclora.ops.chunked_ce.chunked_cross_entropy`
  so full logits never exist; safe under DeepSpeed ZeRO-3 (see :meth:`CausalLMChunkedLoss.register_zero3`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from hyclora.models.causal_lm_loss import active_head, final_logit_softcap, split_causal_lm, zero3_partitioned
from hyclora.ops.chunked_ce import chunked_cross_entropy
from hyclora.ops.s2attn import S2ATTN_NAME, DEFAULT_GROUP_RATIO, IndexMask, resolve_group_size, s2_attention
_PREV_ATTR = "_hyclora_attn_before_s2attn"


# ---------------------------------------------------------------------------------------------------
# S²-Attn: mask function + attention function for transformers' registries
# ---------------------------------------------------------------------------------------------------
class _HFLazyMask(IndexMask):
    """IndexMask over transformers' mask predicate; ``dense()`` defers to ``sdpa_mask``."""

    def __init__(self, predicate, batch_size: int, length: int, device, sdpa_kwargs: dict, key_padding=None) -> None:
        super().__init__(predicate, batch_size, length, device, key_padding=key_padding)
        self._sdpa_kwargs = sdpa_kwargs

    def dense(self) -> Optional[torch.Tensor]:
        # Built once per forward (every layer receives this same object), exactly as "sdpa" would.
        if not hasattr(self, "_dense"):
            from transformers.masking_utils import sdpa_mask

            self._dense = sdpa_mask(**self._sdpa_kwargs)
        return self._dense


def s2attn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    device="cpu",
    **kwargs: Any,
):
    """Mask function registered in ``AttentionMaskInterface`` under ``"hyclora_s2attn"``.

    Same signature as transformers' ``sdpa_mask``. Returns ``None`` (plain causal), a lazy
    :class:`IndexMask` (whole-sequence training with padding/packing), or, where S²-Attn cannot
    apply anyway (KV cache offsets, vmap-only mask functions), exactly what ``sdpa_mask`` returns.
    """
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        padding_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )

    if mask_function is None:
        mask_function = causal_mask_function
    sdpa_kwargs = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, device=device, **kwargs,
    )
    whole_sequence = q_length == kv_length and not isinstance(q_offset, torch.Tensor) and q_offset == 0 and kv_offset == 0
    if not whole_sequence or use_vmap:
        return sdpa_mask(**sdpa_kwargs)

    padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    no_padding = padding_mask is None or bool(padding_mask.all())
    if allow_is_causal_skip and mask_function is causal_mask_function and no_padding:
        return None
    predicate = mask_function
    key_padding = None
    if padding_mask is not None and not no_padding:
        predicate = and_masks(mask_function, padding_mask_function(padding_mask))
        if mask_function is causal_mask_function:
            key_padding = padding_mask[:, :kv_length]  # lets S²-Attn skip the mask on right padding
    return _HFLazyMask(predicate, batch_size, q_length, device, sdpa_kwargs, key_padding=key_padding)


def _group_settings(module: nn.Module) -> Tuple[float, Optional[int]]:
    config = getattr(module, "config", None)
    ratio = getattr(config, "s2attn_group_ratio", DEFAULT_GROUP_RATIO)
    size = getattr(config, "s2attn_group_size", None)
    return ratio, size


def s2attn_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
):
    """Attention function registered in ``AttentionInterface`` under ``"hyclora_s2attn"``.

    q/k/v arrive as ``(b, h, s, d)`` / ``(b, h_kv, s, d)`` after RoPE; returns ``(b, s, h, d)``.
    Training: S²-Attn. Eval (``module.training`` False): transformers' sdpa, full attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _refuse_softcap(kwargs.get("softcap"), type(module).__name__)
    if not module.training:
        dense = attention_mask.dense() if isinstance(attention_mask, IndexMask) else attention_mask
        return sdpa_attention_forward(
            module, query, key, value, dense, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"S²-Attn got {query.shape[2]} queries for {key.shape[2]} keys: it runs on whole sequences "
            "in training only. For generation or a KV cache, call model.eval() (full attention) or "
            "disable_s2attn(model)."
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError(
            f"S²-Attn is causal, but {type(module).__name__} is a non-causal attention; use sdpa for it."
        )
    ratio, size = _group_settings(module)
    out = s2_attention(
        query, key, value, group_ratio=ratio, group_size=size, attention_mask=attention_mask,
        scaling=scaling, dropout_p=dropout,
    )
    return out.transpose(1, 2).contiguous(), None


# The config key of attention logit soft-capping, per model type whose attention applies it (Gemma 3
# stores the key but never applies it): neither S²-Attn nor the sdpa attention of its eval path
# applies it, so such a model is refused rather than trained without it. Other model types are
# caught at their first forward (the attention function receives ``softcap``).
_ATTN_SOFTCAP_KEYS = {"gemma2": "attn_logit_softcapping"}


def _refuse_softcap(cap, where: str) -> None:
    if cap is not None:
        raise ValueError(
            f"S²-Attn ({where}): attention logit soft-capping {cap!r} is set, and S²-Attn (and its eval path, "
            "sdpa) applies none, so the model trained would not be the pretrained model. Train with "
            "attn_implementation='eager' (full attention, soft-capping kept), or set "
            "config.attn_logit_softcapping = None to train under S²-Attn without soft-capping knowingly."
        )


def register_s2attn(name: str = S2ATTN_NAME) -> str:
    """Register the S²-Attn attention and mask functions under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, s2attn_attention_forward)
    AttentionMaskInterface.register(name, s2attn_mask)
    return name


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside a PEFT wrapper (or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "set_attn_implementation"):
        raise TypeError(
            f"{type(inner).__name__} is not a transformers PreTrainedModel (needs set_attn_implementation); "
            "S²-Attn hooks into transformers' AttentionInterface."
        )
    return inner


def _configs(model: nn.Module) -> Iterable[Any]:
    seen = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    return seen.values()


def enable_s2attn(
    model: nn.Module, group_ratio: float = DEFAULT_GROUP_RATIO, group_size: Optional[int] = None
) -> nn.Module:
    """Switch a transformers (or PEFT-wrapped) model to S²-Attn for training; returns the model.

    ``group_ratio`` (LongLoRA 1/4) or a fixed ``group_size`` in tokens. Eval mode keeps full attention.
    """
    resolve_group_size(8, group_ratio, group_size)  # validate early with a clear message
    inner = _hf_model(model)
    for cfg in _configs(inner):
        key = _ATTN_SOFTCAP_KEYS.get(getattr(cfg, "model_type", None))
        if key is not None:
            _refuse_softcap(getattr(cfg, key, None), f"{type(inner).__name__}, config.{key}")
    register_s2attn()
    current = inner.config._attn_implementation
    if current != S2ATTN_NAME:
        setattr(inner.config, _PREV_ATTR, current or "sdpa")
    for cfg in _configs(inner):
        cfg.s2attn_group_ratio = group_ratio
        cfg.s2attn_group_size = group_size
    inner.set_attn_implementation(S2ATTN_NAME)
    return model


def disable_s2attn(model: nn.Module) -> nn.Module:
    """Restore the attention implementation that was active before :func:`enable_s2attn`."""
    inner = _hf_model(model)
    previous = getattr(inner.config, _PREV_ATTR, "sdpa")
    inner.set_attn_implementation(previous)
    return model


def s2attn_enabled(model: nn.Module) -> bool:
    return _hf_model(model).config._attn_implementation == S2ATTN_NAME


# ---------------------------------------------------------------------------------------------------
# RoPE linear position interpolation
# ---------------------------------------------------------------------------------------------------
def rope_scaling_factor(target_context: int, original_context: int) -> int:
    """LongLoRA's factor: ``ceil(target / original)``, at least 1."""
    if target_context < 1 or original_context < 1:
        raise ValueError(
            f"rope scaling needs positive contexts, got target={target_context}, original={original_context}."
        )
    return max(1, math.ceil(target_context / original_context))


def set_rope_linear_scaling(
    model_or_config: Any, target_context: int, original_context: Optional[int] = None
) -> float:
    """Linear RoPE position interpolation to ``target_context``; returns the factor (1 = unchanged).

    Works on a config before loading (``from_pretrained(..., config=config)``) or on a built model,
    whose rotary-embedding modules are then recomputed. ``original_context`` defaults to
    ``config.max_position_embeddings``. In transformers 5.x the setting is
    ``config.rope_parameters = {"rope_type": "linear", "factor": f, "rope_theta": ...}``.
    """
    is_model = isinstance(model_or_config, nn.Module)
    config = _hf_model(model_or_config).config if is_model else model_or_config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if original_context is None:
        original_context = getattr(config, "max_position_embeddings", None)
        if original_context is None:
            raise ValueError("set_rope_linear_scaling: the config has no max_position_embeddings; pass original_context.")
    factor = rope_scaling_factor(int(target_context), int(original_context))
    if factor == 1:
        return 1.0
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "linear":
        if float(params.get("factor", 1.0)) == float(factor):
            return float(factor)
        raise ValueError(
            f"The model already uses linear RoPE scaling with factor {params.get('factor')}; "
            f"refusing to replace it with {factor}. Pass original_context = the context it was "
            "interpolated to, or edit config.rope_parameters yourself."
        )
    if rope_type != "default":
        raise ValueError(
            f"The model uses RoPE type {rope_type!r}; linear position interpolation (LongLoRA) is only "
            "applied on top of default RoPE. Use a model with default RoPE or skip rope scaling."
        )
    params.pop("type", None)
    params.update(rope_type="linear", factor=float(factor))
    config.rope_parameters = params
    if is_model:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        for module in model_or_config.modules():
            if hasattr(module, "inv_freq") and hasattr(module, "rope_type") and getattr(module, "config", None) is config:
                inv_freq, scaling = ROPE_INIT_FUNCTIONS["linear"](config, module.inv_freq.device)
                module.inv_freq = inv_freq.to(module.inv_freq.dtype)
                module.original_inv_freq = module.inv_freq.clone()
                module.attention_scaling = scaling
                module.rope_type = "linear"
    return float(factor)


# ---------------------------------------------------------------------------------------------------
# LongLoRA's "LoRA+": LoRA on attention + trainable embeddings and norms
# ---------------------------------------------------------------------------------------------------
LONGLORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LONGLORA_TRAINABLE = ("embed_tokens", "norm")


def longlora_lora_config(
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = LONGLORA_TARGETS,
    trainable_modules: Sequence[str] = LONGLORA_TRAINABLE,
    model: Optional[nn.Module] = None,
):
    """PEFT ``LoraConfig`` for LongLoRA's recipe (r 8, alpha 16, q/k/v/o, + embeddings and norms).

    ``trainable_modules`` go to ``modules_to_save`` (module-name suffixes: ``"norm"`` matches every
    ``*norm``), so they train in full and are saved inside the adapter. If ``model`` ties its LM
    head to the input embedding (or no ``model`` is given), PEFT's ``ensure_weight_tying`` is set:
    without it PEFT would train a copy of the embedding that the tied LM head no longer reads.
    """
    from peft import LoraConfig

    tied = True
    if model is not None:
        config = getattr(_hf_model(model), "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        tied = bool(getattr(text, "tie_word_embeddings", False))
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        modules_to_save=list(trainable_modules) or None,
        ensure_weight_tying=bool(trainable_modules) and tied,
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------------------------------------
# Causal-LM loss without full logits
# ---------------------------------------------------------------------------------------------------
class _LMHeadLoss(nn.Module):
    """Owns no parameters: reads the LM head's weight (registered as ZeRO-3 external parameter)."""

    def __init__(self, lm_head: nn.Module, chunk_size: Optional[int], softcap: Optional[float] = None) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the LM head stays registered once, under the model.
        object.__setattr__(self, "lm_head", lm_head)
        self.chunk_size = chunk_size
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        head = active_head(self.lm_head)
        params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
        if not torch.is_grad_enabled() and any(zero3_partitioned(p) for p in params):
            # Evaluation through a wrapper DeepSpeed never saw (no hooks): gather for this call.
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return self._loss(head, hidden, labels, reduction)
        return self._loss(head, hidden, labels, reduction)

    def _loss(self, head, hidden, labels, reduction):
        return chunked_cross_entropy(
            hidden, head.weight, labels, bias=getattr(head, "bias", None),
            chunk_size=self.chunk_size, reduction=reduction, softcap=self.softcap,
        )


class CausalLMChunkedLoss(nn.Module):
    """Wrap a causal LM so that ``forward`` returns the LM loss without materialising logits.

    ``forward(input_ids, labels=None, attention_mask=None, position_ids=None, shift_labels=True,
    reduction="mean", **model_kwargs)`` (``model_kwargs``, e.g. a packed batch's ``cu_seq_lens_q``,
    go to the decoder): labels default to ``input_ids``; with ``shift_labels`` (HF convention)
    position ``t`` is scored against ``labels[t + 1]``; pass ``shift_labels=False`` when ``labels``
    are already the next tokens. ``-100`` is ignored. Pass this wrapper (not the bare model) to
    ``accelerator.prepare`` so DeepSpeed's engine sees the whole forward.
    """

    def __init__(self, model: nn.Module, chunk_size: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        decoder, lm_head = split_causal_lm(model)
        object.__setattr__(self, "_decoder", decoder)
        self.head_loss = _LMHeadLoss(lm_head, chunk_size, final_logit_softcap(model))

    def register_zero3(self) -> None:
        """Tell DeepSpeed ZeRO-3 to gather the LM head weight around our loss's forward/backward.

        The loss reads ``lm_head.weight`` outside ``lm_head.forward``, so ZeRO-3's per-module
        gather hooks never fire for it (Liger #767: an empty weight). DeepSpeed 0.19 also notices
        a partitioned parameter fetched through ``module._parameters`` during a forward and
        registers it on the fly (``ZeROOrderedDict``); registering it explicitly here does not
        depend on that path. Call before ``accelerator.prepare`` under ZeRO stage 3.
        """
        import deepspeed

        register_external_parameter = deepspeed.zero.register_external_parameter

        lm_head = self.head_loss.lm_head
        heads = [lm_head]
        if hasattr(lm_head, "modules_to_save"):
            heads = [lm_head.original_module, *lm_head.modules_to_save.values()]
        for head in heads:
            for param in head.parameters(recurse=False):
                register_external_parameter(self.head_loss, param)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        shift_labels: bool = True,
        reduction: str = "mean",
        **model_kwargs: Any,
    ) -> torch.Tensor:
        # model_kwargs: what else the decoder's layers read, e.g. a packed batch's cu_seq_lens_q
        out = self._decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **model_kwargs,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if labels is None:
            labels = input_ids
        if attention_mask is not None and attention_mask.dim() == 2:
            labels = labels.masked_fill(attention_mask == 0, -100)
        if shift_labels:
            # Shift the labels, not the hidden states: no copy of the (b, s, d) activations.
            labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        return self.head_loss(hidden, labels, reduction=reduction)


__all__ = [
    "S2ATTN_NAME",
    "CausalLMChunkedLoss",
    "disable_s2attn",
    "enable_s2attn",
    "final_logit_softcap",
    "longlora_lora_config",
    "register_s2attn",
    "rope_scaling_factor",
    "s2attn_attention_forward",
    "s2attn_enabled",
    "s2attn_mask",
    "set_rope_linear_scaling",
    "split_causal_lm",
]
