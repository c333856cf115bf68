"""Adapters from transformers/PEFT models to hyclora's compressed blocks.

Registry keyed by ``config.model_type``; ``apply_hyclora`` / ``revert_hyclora`` patch and
restore layers in place. An architecture is an :class:`~.spec.ArchitectureSpec` row served by the
adapter of its block family (:class:`~.decoder.DecoderAdapter`, :class:`~.roberta.EncoderAdapter`).
"""

from . import llama, mistral  # noqa: F401  (register the architectures)
from . import ministral, qwen2  # noqa: F401  (Llama with another name)
from . import qwen3  # noqa: F401  (Llama plus q/k norms)
from . import gemma  # noqa: F401  (Gemma 2/3: (1 + w) sandwich norms, GeGLU, soft-capping)
from . import phi3  # noqa: F401  (Phi-3 / Phi-4-mini: fused qkv_proj / gate_up_proj)
from . import roberta  # noqa: F401  (BERT/RoBERTa encoders)
from .adapter import LayerAdapter, in_backward_pass, kernels_for_graph_capture
from .api import apply_hyclora, buffered_tensors, is_patched, revert_hyclora
from .registry import get_adapter, register_model, supported_model_types
from .spec import ArchitectureSpec, ConfigRule
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
    "ArchitectureSpec",
    "ConfigRule",
    "LayerAdapter",
    "in_backward_pass",
    "kernels_for_graph_capture",
]
