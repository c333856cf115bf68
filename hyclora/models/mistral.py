"""Mistral: Llama's decoder-layer layout under its own class names. The sliding window reaches the
layer through the attention mask transformers builds (``create_sliding_window_causal_mask``),
which both the eager and the sdpa path apply, so the spec needs nothing more. Mistral-Nemo is this
row with ``head_dim`` (128) other than ``hidden_size / num_attention_heads``: the blocks take the
attention module's ``head_dim``. Ministral (``model_type`` ``"ministral"``) is :mod:`.ministral`."""

from __future__ import annotations

from dataclasses import replace

from .decoder import DecoderAdapter
from .llama import LLAMA_SPEC
from .registry import register_model

MISTRAL_SPEC = replace(
    LLAMA_SPEC, model_type="mistral",
    layer_class=("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer"),
    norm_classes=("transformers.models.mistral.modeling_mistral.MistralRMSNorm",),
)
MISTRAL = DecoderAdapter(MISTRAL_SPEC)
register_model(MISTRAL_SPEC.model_type, MISTRAL)

__all__ = ["MISTRAL", "MISTRAL_SPEC"]
