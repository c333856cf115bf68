"""Gemma 2 (``gemma2``) and Gemma 3 text (``gemma3_text``): decoder-family spec rows.

What differs from Llama, and where the blocks take it (:mod:`hyclora.ops.blocks`):

* RMSNorm with ``(1 + w)``: ``x_hat * (1 + w.float())`` in fp32, cast once to the input dtype
  (``norm_variant="1+w"``, :mod:`hyclora.kernels.rmsnorm`: the forward is bit-identical to
  ``Gemma2RMSNorm`` / ``Gemma3RMSNorm`` in every dtype, the backward follows autograd's fp32
  chain). The final norm (``model.norm``) is run with the same variant.
* Sandwich norms: ``input_layernorm`` / ``pre_feedforward_layernorm`` are the pre-norms,
  ``post_attention_layernorm`` / ``post_feedforward_layernorm`` normalise the o_proj / down_proj
  outputs before the residual adds (``post_norms``; the blocks keep those outputs like the
  pre-norm inputs, :data:`hyclora.ops.tensor_specs.POST_NORMS`).
* GELU-tanh gated MLP (``hidden_activation="gelu_pytorch_tanh"``, ``F.gelu(approximate="tanh")``;
  the exact ``"gelu"`` is served too), op by op and in the fused ``intra_inter_full_fuse``
  kernel. Other activations are refused by name.
* ``query_pre_attn_scalar``: the attention's own ``scaling`` (``query_pre_attn_scalar ** -0.5``),
  read from the attention module.
* Alternating sliding-window / global layers: ``Gemma2Model`` / ``Gemma3TextModel`` hand every layer
  the mask of its own type (``causal_mask_mapping[config.layer_types[i]]``) and Gemma 3 its own
  RoPE tables (local / global base); the blocks use what the layer receives.
* LongLoRA's S²-Attn (``enable_s2attn``): a sliding layer's mask reaches S²-Attn as transformers
  builds it (the window predicate, lazily: :func:`hyclora.integrations.longseq.s2attn_mask`), and
  S²-Attn applies it inside each group, so a group larger than the window stays exact (with
  ``group_size <= sliding_window`` the window hides nothing a group does not). Refused for Gemma 2
  with ``attn_logit_softcapping`` set: the S²-Attn kernels have no soft-capping.
* Gemma 2's attention logit soft-capping (``attn_logit_softcapping``): applied by transformers'
  eager attention only (its sdpa attention drops it); hyclora's eager attention applies it forward
  and backward, and refuses sdpa with it set. Gemma 3's attention applies none (its config key is
  not read by ``Gemma3Attention``), so neither does hyclora.
* Gemma 3's q/k norms (``self_attn.q_norm`` / ``k_norm``, ``(1 + w)``): the attention block's q/k
  norm parameter.
* Scaled embeddings (``embed_tokens`` times ``sqrt(hidden)``) and the final-logit soft-capping
  happen outside the decoder layers and are left as they are
  (:func:`hyclora.ops.chunked_ce.chunked_cross_entropy` takes ``softcap`` for the latter).
"""

from __future__ import annotations

from dataclasses import replace

from .decoder import DecoderAdapter
from .llama import LLAMA_SPEC
from .registry import register_model
from .spec import ConfigRule

GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
_NOT_BIDIRECTIONAL = ConfigRule(
    "use_bidirectional_attention", (False, None), None,
    "bidirectional Gemma (embedding models) is not implemented by hyclora's causal blocks")


# up_proj's output kept at twice q_bit (the table keeps it at q_bit: for Llama's SwiGLU that was
# enough). Gemma 3 270M (intra_inter, LoRA-gradient cosine mean / min over 252 tensors, WikiText-2):
# up at 2 bits alone (every other tensor exact) 0.63 / -0.09 (gate 0.9965, k 0.987, v 0.978,
# x_in 0.9998); all at 2 bits 0.445 / -0.234 -> 0.919 / 0.469 with up at 4 bits; all at 4 bits
# 0.9960 / 0.9596 -> 0.9989 / 0.9796 with up at 8. Cost: d_ff * q_bit / 8 more bytes per token.
GEMMA_DOUBLE_BITS = ("up",)


def _gemma_spec(model_type: str, module: str, prefix: str, **extra):
    norm = f"transformers.models.{module}.{prefix}RMSNorm"
    return replace(
        LLAMA_SPEC, model_type=model_type,
        layer_class=(f"transformers.models.{module}", f"{prefix}DecoderLayer"),
        norms=("input_layernorm", "pre_feedforward_layernorm"),
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_classes=(norm,), norm_variant="1+w",
        activation_keys=("hidden_activation",), activations=GEMMA_ACTIVATIONS,
        default_activation="gelu_pytorch_tanh",
        config_rules=LLAMA_SPEC.config_rules + (_NOT_BIDIRECTIONAL,),
        double_bits=GEMMA_DOUBLE_BITS, **extra,
    )


GEMMA2_SPEC = _gemma_spec("gemma2", "gemma2.modeling_gemma2", "Gemma2",
                          attn_softcap_key="attn_logit_softcapping")
GEMMA2 = DecoderAdapter(GEMMA2_SPEC)
register_model(GEMMA2_SPEC.model_type, GEMMA2)

# the q/k norms are Gemma3RMSNorm too: (1 + w), the spec's norm_variant
GEMMA3_SPEC = _gemma_spec("gemma3_text", "gemma3.modeling_gemma3", "Gemma3",
                          qk_norms=("self_attn.q_norm", "self_attn.k_norm"))
GEMMA3 = DecoderAdapter(GEMMA3_SPEC)
register_model(GEMMA3_SPEC.model_type, GEMMA3)

__all__ = ["GEMMA2", "GEMMA2_SPEC", "GEMMA3", "GEMMA3_SPEC", "GEMMA_ACTIVATIONS"]
