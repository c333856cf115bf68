"""Llama: ``LlamaDecoderLayer`` (transformers 5.x), a row of the decoder family. Its defaults in
:class:`~hyclora.models.spec.ArchitectureSpec` are this layout; relatives ``replace()`` what
differs (:mod:`.mistral`).

Llama 3.x is this row too: its ``rope_parameters`` (``rope_type`` ``"llama3"``, or any other RoPE
scaling) shape the ``(cos, sin)`` tables the model computes once and hands every layer as
``position_embeddings``, which the blocks apply as given; GQA with any number of KV heads and a
``head_dim`` of its own are read from the attention module (tests/models/test_architectures.py)."""

from __future__ import annotations

from .decoder import DecoderAdapter
from .registry import register_model
from .spec import ArchitectureSpec, ConfigRule

LLAMA_SPEC = ArchitectureSpec(
    model_type="llama",
    layer_class=("transformers.models.llama.modeling_llama", "LlamaDecoderLayer"),
    norm_classes=("transformers.models.llama.modeling_llama.LlamaRMSNorm",),
    config_rules=(ConfigRule("attention_dropout", (0, None), 0.0,
                             "the blocks run no attention dropout; set config.attention_dropout = 0.0"),),
)
LLAMA = DecoderAdapter(LLAMA_SPEC)
register_model(LLAMA_SPEC.model_type, LLAMA)

__all__ = ["LLAMA", "LLAMA_SPEC"]
