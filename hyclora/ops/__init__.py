"""Compressed operators and decoder blocks as torch.autograd.Functions.

Knows nothing about transformers, PEFT or DeepSpeed: plain tensors and small metadata in,
tensors out.
"""

from hyclora.kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward
from hyclora.kernels.rope import apply_rope, rope_backward

from .attention import (
    SUPPORTED_IMPLEMENTATIONS,
    check_implementation,
    eager_attention_backward,
    eager_attention_forward,
    sdpa_attention_forward,
    sdpa_attention_recompute,
)
from .blocks import AttentionBlockFn, AttentionPlan, MLPBlockFn, MLPPlan, attention_block, check_finite, mlp_block
from .lora import LinearMeta, lora_linear_backward, lora_linear_forward, lora_reconstruct
from .storage import StoragePolicy, TensorLoad, TensorStore
from .swiglu import silu_mul_backward, silu_mul_forward

__all__ = [
    "SUPPORTED_IMPLEMENTATIONS",
    "check_implementation",
    "eager_attention_forward",
    "eager_attention_backward",
    "sdpa_attention_forward",
    "sdpa_attention_recompute",
    "AttentionBlockFn",
    "AttentionPlan",
    "MLPBlockFn",
    "MLPPlan",
    "attention_block",
    "mlp_block",
    "check_finite",
    "LinearMeta",
    "lora_linear_forward",
    "lora_linear_backward",
    "lora_reconstruct",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "apply_rope",
    "rope_backward",
    "StoragePolicy",
    "TensorStore",
    "TensorLoad",
    "silu_mul_forward",
    "silu_mul_backward",
]
