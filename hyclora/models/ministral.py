"""Ministral (``model_type`` ``"ministral"``, e.g. Ministral-8B): Mistral's layer under its own
class names, with per-layer attention types (``layer_types``: ``"sliding_attention"`` /
``"full_attention"``). ``MinistralModel`` builds both masks and hands each layer the mask of its
type, which the eager and the sdpa path apply, so the spec needs nothing for them (as for
:mod:`.qwen2`). ``head_dim`` may differ from ``hidden_size / num_attention_heads``: the blocks take
the attention module's ``head_dim``.

Not this row: ``"ministral3"`` (Ministral 3), whose attention scales the queries by position
(``llama_4_scaling_beta``); it is not registered, so it is refused by its model type. Mistral-Nemo
is ``model_type`` ``"mistral"`` with ``head_dim`` set (:mod:`.mistral`).
"""

from __future__ import annotations

from dataclasses import replace

from .decoder import DecoderAdapter
from .llama import LLAMA_SPEC
from .registry import register_model

MINISTRAL_SPEC = replace(
    LLAMA_SPEC, model_type="ministral",
    layer_class=("transformers.models.ministral.modeling_ministral", "MinistralDecoderLayer"),
    norm_classes=("transformers.models.ministral.modeling_ministral.MinistralRMSNorm",),
)
MINISTRAL = DecoderAdapter(MINISTRAL_SPEC)
register_model(MINISTRAL_SPEC.model_type, MINISTRAL)

__all__ = ["MINISTRAL", "MINISTRAL_SPEC"]
