"""Qwen2 / Qwen2.5: Llama's decoder-layer layout under its own class names, with biases on q/k/v
(the blocks add a base linear's bias, so the spec needs nothing for them).

Sliding-window attention (``use_sliding_window``, ``sliding_window``, ``max_window_layers``, or an
explicit ``layer_types``) reaches each layer through its attention mask: ``Qwen2Model`` builds a
full causal mask and, when some layer is a ``"sliding_attention"`` one, a sliding-window mask
(``create_sliding_window_causal_mask``), and hands every layer the mask of its own type
(``causal_mask_mapping[config.layer_types[i]]``). Both the eager and the sdpa path apply that mask
(the attention module's ``sliding_window`` attribute is read by flash attention only, which hyclora
does not run), so the blocks compute what the model computes and the spec needs no rule for it.
A layer type other than those two has no mask in ``Qwen2Model`` and fails in transformers itself.
"""

from __future__ import annotations

from dataclasses import replace

from .decoder import DecoderAdapter
from .llama import LLAMA_SPEC
from .registry import register_model

QWEN2_SPEC = replace(
    LLAMA_SPEC, model_type="qwen2",
    layer_class=("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer"),
    norm_classes=("transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",),
)
QWEN2 = DecoderAdapter(QWEN2_SPEC)
register_model(QWEN2_SPEC.model_type, QWEN2)

__all__ = ["QWEN2", "QWEN2_SPEC"]
