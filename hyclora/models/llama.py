"""Llama: ``LlamaDecoderLayer`` (transformers 5.x) patched with the Llama-family adapter."""

from __future__ import annotations

from .base import LlamaFamilyAdapter
from .registry import register_model

LLAMA = LlamaFamilyAdapter("llama", ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer"))
register_model("llama", LLAMA)

__all__ = ["LLAMA"]
