"""Llama-style decoder layers (pre-RMSNorm, RoPE attention, SwiGLU MLP) run as the two blocks
of :mod:`hyclora.ops.blocks`. Architectures of this family are spec rows (:mod:`.llama`,
:mod:`.mistral`); this module holds what the family's layer call needs beyond the shared
:class:`~hyclora.models.adapter.LayerAdapter`."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from hyclora.ops.attention import layer_attention_mask
from hyclora.ops.blocks import AttentionPlan, MLPPlan, attention_block, mlp_block
from hyclora.ops.tensor_specs import D_FF, DECODER, HIDDEN, KV_HEADS, Q_HEADS

from .adapter import LayerAdapter, LayerCall, LayerPatch
from .spec import get_path


class DecoderAdapter(LayerAdapter):
    """Patches decoder layers laid out like Llama's (see the module docstring)."""

    family = DECODER

    def geometry(self, layer: nn.Module, cfg):
        """``(heads, kv_heads, head_dim, scaling, is_causal, d_ff, act, softcap)``: the attention's
        own ``scaling`` (Gemma's ``query_pre_attn_scalar ** -0.5``), the MLP activation (the spec's
        activation key) and the attention logit soft-capping (the spec's ``attn_softcap_key``)."""
        attn = self.attention_module(layer)
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        key = self.spec.attn_softcap_key
        softcap = getattr(cfg, key, None) if key else None
        return (heads, kv_heads, attn.head_dim, float(attn.scaling), bool(getattr(attn, "is_causal", True)),
                getattr(cfg, "intermediate_size", 0) or 0, self.activation(cfg),
                None if softcap is None else float(softcap))

    def dims(self, layer: nn.Module, cfg) -> Dict[str, int]:
        heads, kv_heads, head_dim = self.geometry(layer, cfg)[:3]
        return {HIDDEN: cfg.hidden_size, Q_HEADS: heads * head_dim, KV_HEADS: kv_heads * head_dim,
                D_FF: cfg.intermediate_size}

    def output_widths(self, layer: nn.Module, cfg):
        d = self.dims(layer, cfg)
        return (d[Q_HEADS], d[KV_HEADS], d[KV_HEADS], d[HIDDEN]), (d[D_FF], d[D_FF], d[HIDDEN])

    def check_dropouts(self, layer: nn.Module, name: str) -> None:
        """The decoder blocks run no dropout on the branch outputs: refuse a spec ``dropouts``
        module (Phi-3's ``resid_attn_dropout`` / ``resid_mlp_dropout``) that would drop anything."""
        for _, path in self.spec.dropouts:
            module = get_path(layer, path)
            p = 0.0 if isinstance(module, nn.Identity) else getattr(module, "p", None)
            if not isinstance(module, (nn.Dropout, nn.Identity)) or (module.training and p):
                raise ValueError(
                    f"hyclora: {name}.{path} is a {type(module).__name__}(p={p}) in training mode; hyclora's decoder "
                    "blocks run no dropout on the attention / MLP outputs. Set its p to 0 (for Phi-3: "
                    "config.resid_pdrop = 0.0, as the released models ship) or set HyCLoRAConfig(use_hyclora=False)."
                )

    def check_call(self, layer: nn.Module, patch: LayerPatch, arguments: Dict[str, Any], impl: str):
        """``(mask, (cos, sin))``: the mask in the form the attention block keeps, and RoPE's tables."""
        name = patch.name
        if self.spec.dropouts:  # read on every call: dropout modules follow train()/eval() of their own
            self.check_dropouts(layer, name)
        pos = arguments.get("position_embeddings")
        if pos is None:
            raise ValueError(
                f"hyclora: {name} was called without position_embeddings; hyclora needs the "
                "(cos, sin) tables the transformers 5.x model passes to its decoder layers."
            )
        layer_idx = None
        for value in arguments.values():
            if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, tuple)):
                continue
            if layer_idx is None:
                layer_idx = getattr(self.attention_module(layer), "layer_idx", 0)
            # Any KV cache (5.17 passes it as past_key_values, newer versions as cache): the
            # training path does not fill it, and cannot attend to tokens already in it.
            get_len = getattr(value, "get_seq_length", None)
            if callable(get_len) and not torch.is_tensor(value) and get_len(layer_idx) > 0:
                raise ValueError(
                    f"hyclora: {name} got a KV cache that already holds tokens; training with a "
                    "pre-filled cache (prefix tuning) is not supported. Pass use_cache=False."
                )
        # packed documents (cu_seqlens), or the mask (S²-Attn's lazy one -> a tensor the block saves)
        return layer_attention_mask(impl, arguments, arguments.get("hidden_states"), name), pos

    def blocks(self, layer: nn.Module, call: LayerCall):
        mask, (cos, sin) = call.inputs
        heads, kv_heads, head_dim, scaling, is_causal, d_ff, act, softcap = call.geometry
        n1, n2 = call.norms
        post = self.resolve_post_norms(layer, call.common["layer_name"]) if self.spec.post_norms else ()
        variant = self.spec.norm_variant
        (a_metas, a_params), (m_metas, m_params) = call.linears
        qk_norms = self.resolve_qk_norms(layer, call.common["layer_name"]) if self.spec.qk_norms else ()
        for path, norm in zip(self.spec.qk_norms, qk_norms):
            if norm.weight.dim() != 1 or norm.weight.numel() not in (0, head_dim):  # 0: ZeRO-3, refused later
                raise ValueError(
                    f"hyclora: {call.common['layer_name']}.{path} has a weight of shape {tuple(norm.weight.shape)}; "
                    f"hyclora's q/k norms normalise each head over head_dim={head_dim}."
                )
        aplan = AttentionPlan(
            eps=n1.eps, linears=a_metas, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            scaling=scaling, impl=call.impl, is_causal=is_causal,
            s2_group_ratio=call.s2[0], s2_group_size=call.s2[1],
            qk_norm_eps=tuple(n.eps for n in qk_norms) if qk_norms else None,
            qk_norm_variant=self.spec.effective_qk_norm_variant, norm_variant=variant,
            post_norm_eps=post[0].eps if post else None, softcap=softcap, **call.common,
        )
        qk_weights = tuple(n.weight for n in qk_norms)
        mplan = MLPPlan(eps=n2.eps, linears=m_metas, d_ff=d_ff, act=act, norm_variant=variant,
                        post_norm_eps=post[1].eps if post else None, **call.common)
        post_w = tuple(n.weight for n in post) if post else (None, None)
        hidden = call.hidden

        def run():
            h = attention_block(aplan, hidden, n1.weight, cos, sin, mask, a_params, qk_weights, post_w[0])
            return mlp_block(mplan, h, n2.weight, m_params, post_w[1])

        return run


__all__ = ["DecoderAdapter"]
