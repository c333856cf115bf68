"""Phi-3 / Phi-3.5 / Phi-4-mini (``model_type`` ``"phi3"``, ``Phi3DecoderLayer``): Llama's layer
with fused projections, run by the shared decoder blocks.

* ``self_attn.qkv_proj`` (out ``heads*hd + 2*kv_heads*hd``: q, k, v rows in that order) and
  ``mlp.gate_up_proj`` (out ``2*d_ff``: gate rows, then up rows, as ``chunk(2, dim=-1)`` splits
  them) are ``fused_projections`` of the spec: the blocks take each as its parts (q/k/v, gate/up),
  each part a row block of the fused weight, bias and LoRA ``B`` with the one LoRA ``A``
  (:class:`hyclora.ops.lora.FusedPart`). PEFT targets ``qkv_proj`` / ``gate_up_proj`` with one
  ``lora_A`` / ``lora_B`` each, so ``drop(x) A^T`` is computed and kept once per fused linear (one
  dropout mask, as PEFT applies it), and the gradients of the parts are summed (``A``) and
  concatenated (``B``) into the fused parameters' own.
* ``Phi3RMSNorm`` computes ``w * x_hat`` (Llama's ``"w"`` variant); SiLU gate (``hidden_act``).
* ``resid_attn_dropout`` / ``resid_mlp_dropout``: parameter-free dropouts on the branch outputs,
  which the blocks do not run; a layer training with ``p > 0`` (``resid_pdrop``) is refused by
  name. ``attention_dropout`` must be 0, as for Llama.
* RoPE: the model computes the ``(cos, sin)`` tables (default or ``"longrope"`` scaling, whose
  short/long factors switch with the sequence length) and hands them to every layer; the blocks
  apply them as given. ``partial_rotary_factor < 1`` (Phi-4-mini: 0.75) gives tables narrower than
  ``head_dim``: the first channels of each head are rotated, the rest passed through, as
  transformers does (:func:`hyclora.kernels.rope.apply_rope`).
* ``sliding_window`` (Phi-3-mini-4k: 2047) reaches the layers through the attention mask
  transformers builds, as Mistral's.
"""

from __future__ import annotations

from dataclasses import replace

from .decoder import DecoderAdapter
from .llama import LLAMA_SPEC
from .registry import register_model

_QKV, _GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"

PHI3_SPEC = replace(
    LLAMA_SPEC, model_type="phi3",
    layer_class=("transformers.models.phi3.modeling_phi3", "Phi3DecoderLayer"),
    norm_classes=("transformers.models.phi3.modeling_phi3.Phi3RMSNorm",),
    attention_linears=(("q_proj", _QKV), ("k_proj", _QKV), ("v_proj", _QKV), ("o_proj", "self_attn.o_proj")),
    mlp_linears=(("gate_proj", _GATE_UP), ("up_proj", _GATE_UP), ("down_proj", "mlp.down_proj")),
    fused_projections=(_QKV, _GATE_UP),
    dropouts=(("attention_output", "resid_attn_dropout"), ("mlp_output", "resid_mlp_dropout")),
)
PHI3 = DecoderAdapter(PHI3_SPEC)
register_model(PHI3_SPEC.model_type, PHI3)

__all__ = ["PHI3", "PHI3_SPEC"]
