"""Adapters from transformers/PEFT models to hyclora's compressed blocks.

Registry keyed by ``config.model_type``; ``apply_hyclora`` / ``revert_hyclora`` patch and
restore decoder layers in place.
"""

from . import llama, mistral  # noqa: F401  (register the architectures)
from . import roberta  # noqa: F401  (BERT/RoBERTa encoders)
from .api import apply_hyclora, buffered_tensors, is_patched, revert_hyclora
from .registry import get_adapter, register_model, supported_model_types
from .state import HyCLoRALayerState

__all__ = [
    "apply_hyclora",
    "revert_hyclora",
    "is_patched",
    "buffered_tensors",
    "get_adapter",
    "register_model",
    "supported_model_types",
    "HyCLoRALayerState",
]
