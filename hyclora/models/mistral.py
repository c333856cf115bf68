"""Mistral: same decoder-layer layout as Llama. The sliding window reaches the layer through
the attention mask transformers builds (``create_sliding_window_causal_mask``), which both the
eager and the sdpa path apply, so no extra code is needed here."""

from __future__ import annotations

from .base import LlamaFamilyAdapter
from .registry import register_model

MISTRAL = LlamaFamilyAdapter("mistral", ("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer"))
register_model("mistral", MISTRAL)

__all__ = ["MISTRAL"]
