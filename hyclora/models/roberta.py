"""RoBERTa and BERT encoder layers (transformers 5.x ``RobertaLayer`` / ``BertLayer``) patched
with the post-LN encoder blocks of :mod:`hyclora.ops.encoder`.

Module layout read here (identical for both architectures: :data:`ENCODER_LAYOUT`)::

    layer.attention.self.{query, key, value}        LoRA linears (+ bias), attention dropout
    layer.attention.output.{dense, dropout, LayerNorm}
    layer.intermediate.{dense, intermediate_act_fn}  up projection + GELU
    layer.output.{dense, dropout, LayerNorm}         down projection

Only the encoder layers are patched; embeddings, pooler and the (trainable) classification
head stay plain modules. Training-mode forwards with grad enabled take the compressed path;
eval, ``no_grad`` and inference run the original forward (the shared dispatch of
:mod:`hyclora.models.adapter`). Decoder use of these classes (``is_decoder``, cross-attention,
KV caches) is refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict

import torch
from torch import nn

from hyclora.ops.attention import is_s2
from hyclora.ops.encoder import (SUPPORTED_ACTIVATIONS, EncoderAttentionPlan, EncoderFFNPlan, encoder_attention_block,
                                 encoder_ffn_block)
from hyclora.ops.tensor_specs import D_FF, ENCODER, HIDDEN, KV_HEADS, Q_HEADS

from .adapter import LayerAdapter, LayerCall, LayerPatch
from .registry import register_model
from .spec import ArchitectureSpec, ConfigRule, get_path

_DECODER_USE = ("hyclora patches the bidirectional encoder (sequence classification, masked LM, ...); "
                "is_decoder / add_cross_attention turn it into a decoder")

ENCODER_LAYOUT = ArchitectureSpec(
    model_type="roberta",
    layer_class=("transformers.models.roberta.modeling_roberta", "RobertaLayer"),
    family=ENCODER,
    attention="attention.self",
    attention_linears=(("query", "attention.self.query"), ("key", "attention.self.key"),
                       ("value", "attention.self.value"), ("attn_out", "attention.output.dense")),
    mlp_linears=(("intermediate", "intermediate.dense"), ("output", "output.dense")),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    norm_kind="layer",
    norm_classes=("torch.nn.modules.normalization.LayerNorm",),
    dropouts=(("attention_probs", "attention.self.dropout"), ("attention_output", "attention.output.dropout"),
              ("ffn_output", "output.dropout")),
    activations=SUPPORTED_ACTIVATIONS,
    default_activation="gelu",
    config_rules=(ConfigRule("is_decoder", (False, None), False, _DECODER_USE),
                  ConfigRule("add_cross_attention", (False, None), False, _DECODER_USE)),
    final_norm=None,
)


def _dropout_p(module: nn.Module, where: str) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if not isinstance(module, nn.Dropout):
        raise ValueError(f"hyclora: {where} is a {type(module).__name__}, expected torch.nn.Dropout.")
    return float(module.p) if module.training else 0.0


class EncoderAdapter(LayerAdapter):
    """Patches post-LN encoder layers laid out like BERT's (BERT, RoBERTa)."""

    family = ENCODER

    def check_config(self, config) -> None:
        super().check_config(config)
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if is_s2(impl):
            raise ValueError(
                f"hyclora: {self.model_type}: S²-Attn ({impl!r}) is a causal long-context pattern for "
                "decoders; use attn_implementation='sdpa' or 'eager' for encoders."
            )

    def geometry(self, layer: nn.Module, cfg):
        attn = self.attention_module(layer)
        return attn.num_attention_heads, attn.attention_head_size, float(attn.scaling)

    def dims(self, layer: nn.Module, cfg) -> Dict[str, int]:
        heads, head_dim, _ = self.geometry(layer, cfg)
        return {HIDDEN: cfg.hidden_size, Q_HEADS: heads * head_dim, KV_HEADS: heads * head_dim,
                D_FF: cfg.intermediate_size}

    def check_call(self, layer: nn.Module, patch: LayerPatch, arguments: Dict[str, Any], impl: str):
        """The attention mask (``None`` or transformers' 4-D mask)."""
        name, mask = patch.name, arguments.get("attention_mask")
        if arguments.get("encoder_hidden_states") is not None:
            raise ValueError(f"hyclora: {name} got encoder_hidden_states; cross-attention is not supported.")
        if arguments.get("past_key_values") is not None:
            raise ValueError(f"hyclora: {name} got a KV cache; pass use_cache=False (encoder training).")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 4):
            raise ValueError(
                f"hyclora: {name} got an attention mask of type {type(mask).__name__} "
                f"{tuple(mask.shape) if torch.is_tensor(mask) else ''}; expected None or the 4-D "
                "mask transformers builds for eager/sdpa attention."
            )
        return mask

    def blocks(self, layer: nn.Module, call: LayerCall):
        name = call.common["layer_name"]
        heads, head_dim, scaling = call.geometry
        n1, n2 = call.norms
        (a_metas, a_params), (f_metas, f_params) = call.linears
        # dropout modules follow train()/eval() of their own: read on every call
        p = {role: _dropout_p(get_path(layer, path), f"{name}.{path}") for role, path in self.spec.dropouts}
        aplan = EncoderAttentionPlan(
            eps=n1.eps, linears=a_metas, num_heads=heads, head_dim=head_dim, scaling=scaling, impl=call.impl,
            attn_dropout=p["attention_probs"], hidden_dropout=p["attention_output"], **call.common,
        )
        fplan = EncoderFFNPlan(eps=n2.eps, linears=f_metas, activation=self.activation(self.layer_config(layer)),
                               hidden_dropout=p["ffn_output"], **call.common)
        hidden, mask = call.hidden, call.inputs

        def run():
            h = encoder_attention_block(aplan, hidden, n1.weight, n1.bias, mask, a_params)
            return encoder_ffn_block(fplan, h, n2.weight, n2.bias, f_params)

        return run


# -- BERT checkpoints in RoBERTa classes -----------------------------------------------------


def roberta_config_from_bert(bert_config, **overrides):
    """A ``RobertaConfig`` under which a BERT checkpoint computes exactly what it computes as
    BERT: RoBERTa numbers positions from ``pad_token_id + 1``, so with ``pad_token_id = 0`` the
    position table gets one extra (zero) row in front and ``max_position_embeddings + 1`` rows."""
    from transformers import RobertaConfig

    values = dict(
        vocab_size=bert_config.vocab_size, hidden_size=bert_config.hidden_size,
        num_hidden_layers=bert_config.num_hidden_layers, num_attention_heads=bert_config.num_attention_heads,
        intermediate_size=bert_config.intermediate_size, hidden_act=bert_config.hidden_act,
        hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
        max_position_embeddings=bert_config.max_position_embeddings + 1,
        type_vocab_size=bert_config.type_vocab_size, layer_norm_eps=bert_config.layer_norm_eps,
        initializer_range=bert_config.initializer_range, pad_token_id=0,
    )
    pad = getattr(bert_config, "pad_token_id", 0)
    if pad not in (0, None):
        raise ValueError(
            f"hyclora: BERT checkpoint with pad_token_id={pad}; the position shift into RoBERTa "
            "assumes pad_token_id 0 (BERT's [PAD])."
        )
    values.update(overrides)
    return RobertaConfig(**values)


def bert_state_dict_to_roberta(state_dict: Dict[str, torch.Tensor], prefix: str = "roberta.") -> Dict[str, torch.Tensor]:
    """Rename a ``BertModel`` state dict for ``RobertaModel`` (``prefix`` = where the RoBERTa body
    sits: ``"roberta."`` in the task models, ``""`` for a bare ``RobertaModel``). The pooler and
    ``position_ids`` are dropped; the position table gets its leading zero row."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        if key.startswith("pooler.") or key.endswith("position_ids") or not key.startswith(("embeddings.", "encoder.")):
            continue
        if key == "embeddings.position_embeddings.weight":
            value = torch.cat([value.new_zeros(1, value.shape[1]), value], 0)
        out[prefix + key] = value
    return out


def roberta_from_bert_checkpoint(path: str, *, num_labels: int = 2, attn_implementation: str = "eager",
                                 dtype: torch.dtype = torch.float32, **config_overrides):
    """``RobertaForSequenceClassification`` with the encoder of a local BERT checkpoint (a folder
    with ``config.json`` and ``model.safetensors``, e.g. all-MiniLM-L6-v2) and a freshly
    initialised classification head. ``config_overrides`` go to the ``RobertaConfig``
    (``problem_type``, dropouts, ...)."""
    import os

    from safetensors.torch import load_file
    from transformers import BertConfig, RobertaForSequenceClassification

    bert_config = BertConfig.from_pretrained(path)
    config = roberta_config_from_bert(bert_config, num_labels=num_labels, **config_overrides)
    model = RobertaForSequenceClassification(config)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"hyclora: no model.safetensors in {path!r} (a BERT checkpoint folder)")
    missing, unexpected = model.load_state_dict(bert_state_dict_to_roberta(load_file(weights)), strict=False)
    missing = [k for k in missing if not k.startswith("classifier.") and not k.endswith("position_ids")
               and not k.endswith("token_type_ids")]
    if missing or unexpected:
        raise ValueError(f"hyclora: {path} is not a BERT encoder checkpoint: missing {missing}, unexpected {unexpected}")
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype)


ROBERTA_SPEC = ENCODER_LAYOUT
BERT_SPEC = replace(ENCODER_LAYOUT, model_type="bert",
                    layer_class=("transformers.models.bert.modeling_bert", "BertLayer"))
ROBERTA = EncoderAdapter(ROBERTA_SPEC)
BERT = EncoderAdapter(BERT_SPEC)
register_model("roberta", ROBERTA)
register_model("bert", BERT)

__all__ = ["EncoderAdapter", "ENCODER_LAYOUT", "ROBERTA", "BERT", "ROBERTA_SPEC", "BERT_SPEC",
           "roberta_config_from_bert", "bert_state_dict_to_roberta", "roberta_from_bert_checkpoint"]
