"""Qwen3: Llama's decoder-layer layout plus q/k norms (``self_attn.q_norm`` / ``k_norm``, a
``Qwen3RMSNorm`` over head_dim applied to every head of q and k before RoPE), which the attention
block runs as a parameter (``AttentionPlan.qk_norm_eps``). No q/k/v bias by default
(``attention_bias``; a bias would be honoured like any base-layer bias). Qwen3's sliding-window
layers (``use_sliding_window``) reach the layer through the attention mask transformers builds for
each layer type, as Mistral's do."""

from __future__ import annotations

from dataclasses import replace

from .decoder import DecoderAdapter
from .llama import LLAMA_SPEC
from .registry import register_model

_QWEN3_NORM = "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm"

QWEN3_SPEC = replace(
    LLAMA_SPEC, model_type="qwen3",
    layer_class=("transformers.models.qwen3.modeling_qwen3", "Qwen3DecoderLayer"),
    norm_classes=(_QWEN3_NORM,),
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    qk_norm_classes=(_QWEN3_NORM,),
)
QWEN3 = DecoderAdapter(QWEN3_SPEC)
register_model(QWEN3_SPEC.model_type, QWEN3)

__all__ = ["QWEN3", "QWEN3_SPEC"]
