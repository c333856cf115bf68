"""RoBERTa and BERT encoder layers (transformers 5.x ``RobertaLayer`` / ``BertLayer``) patched
with the post-LN encoder blocks of :mod:`hyclora.ops.encoder`.

Module layout read here (identical for both architectures)::

    layer.attention.self.{query, key, value}        LoRA linears (+ bias), attention dropout
    layer.attention.output.{dense, dropout, LayerNorm}
    layer.intermediate.{dense, intermediate_act_fn}  up projection + GELU
    layer.output.{dense, dropout, LayerNorm}         down projection

Only the encoder layers are patched; embeddings, pooler and the (trainable) classification
head stay plain modules. Training-mode forwards with grad enabled take the compressed path;
eval, ``no_grad`` and inference run the original forward (``_patched_forward`` of
:mod:`hyclora.models.base`, shared with Llama). Decoder use of these classes
(``is_decoder``, cross-attention, KV caches) is refused.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Tuple

import torch
from torch import nn

from hyclora.ops.attention import check_implementation, is_s2
from hyclora.ops.encoder import EncoderAttentionPlan, EncoderFFNPlan, check_activation, encoder_attention_block, encoder_ffn_block
from hyclora.ops.storage import StoragePolicy

from .base import LlamaFamilyAdapter, _patched_forward, _Patch, in_backward_pass, run_checked, warn_unreachable_hooks
from .patching import patch_forward
from .peft_utils import resolve_linear
from .registry import register_model
from .state import HyCLoRALayerState

ATTN_LINEARS = (("query", "attention.self.query"), ("key", "attention.self.key"),
                ("value", "attention.self.value"), ("attn_out", "attention.output.dense"))
FFN_LINEARS = (("intermediate", "intermediate.dense"), ("output", "output.dense"))
# saved tensors with calibration statistics; the LayerNorm inputs get exact outlier channels.
# Names follow the Llama blocks by role (x_n1 / x_n2: the normalised inputs of q/k/v and of the
# up projection; hidden: the down-projection input), so name-based storage rules apply alike.
ENCODER_ATTENTION_TENSORS = ("x_n1", "q", "k", "v", "o", "z1")
ENCODER_FFN_TENSORS = ("x_n2", "up", "z2")
# K at twice the bits, as measured for the encoder (the decoder's wider set of non-linear inputs,
# hyclora.ops.storage.DOUBLE_BIT_TENSORS, was measured on Llama-family models only)
ENCODER_DOUBLE_BIT_TENSORS = frozenset({"k"})
ENCODER_ELEMENTWISE_TENSORS = ("hidden",)  # GELU output, only stored (quantised) by ``intra``
ENCODER_NORM_INPUTS = ("z1", "z2")


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def resolve_layernorm(module: nn.Module, where: str) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``(weight, bias, eps)`` of an ``nn.LayerNorm``, unwrapping PEFT's ``ModulesToSaveWrapper``."""
    if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
        active = list(getattr(module, "active_adapters", [])) or [getattr(module, "active_adapter", None)]
        if getattr(module, "disable_adapters", False) or active[0] not in module.modules_to_save:
            module = module.original_module
        else:
            module = module.modules_to_save[active[0]]
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        raise ValueError(
            f"hyclora: {where} is a {type(module).__name__}, expected a torch.nn.LayerNorm over the "
            "hidden dimension (BERT/RoBERTa post-LN layout)."
        )
    return module.weight, module.bias, float(module.eps)


def _dropout_p(module: nn.Module, where: str) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if not isinstance(module, nn.Dropout):
        raise ValueError(f"hyclora: {where} is a {type(module).__name__}, expected torch.nn.Dropout.")
    return float(module.p) if module.training else 0.0


class EncoderAdapter(LlamaFamilyAdapter):
    """Patches post-LN encoder layers laid out like BERT's (BERT, RoBERTa).

    Reuses the Llama-family adapter's discovery (``find_layers``), ``unpatch`` and the shared
    training-only dispatch; reads its own module layout.
    """

    def check_config(self, config) -> None:
        check_activation(getattr(config, "hidden_act", "gelu"), self.model_type)
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError(
                f"hyclora: {self.model_type} with is_decoder=True / add_cross_attention=True is not "
                "supported; hyclora patches the bidirectional encoder (sequence classification, "
                "masked LM, ...). Set HyCLoRAConfig(use_hyclora=False) for this model."
            )
        impl = getattr(config, "_attn_implementation", None) or "eager"
        check_implementation(impl, self.model_type)
        if is_s2(impl):
            raise ValueError(
                f"hyclora: {self.model_type}: S²-Attn ({impl!r}) is a causal long-context pattern for "
                "decoders; use attn_implementation='sdpa' or 'eager' for encoders."
            )

    def check_layer(self, layer: nn.Module, name: str) -> None:
        for path in ("attention.self", "attention.output.LayerNorm", "attention.output.dropout",
                     "intermediate.dense", "output.dense", "output.LayerNorm", "output.dropout"):
            try:
                _get(layer, path)
            except AttributeError:
                raise ValueError(
                    f"hyclora: {name} ({type(layer).__name__}) has no {path!r}: this transformers "
                    "version lays out the encoder layer differently from the supported 5.x layout."
                ) from None
        if getattr(layer, "crossattention", None) is not None:
            raise ValueError(f"hyclora: {name} has cross-attention, which hyclora does not support.")
        self.resolve(layer, name)

    def resolve(self, layer: nn.Module, name: str, training: bool = True):
        """``(ln1, ln2, (attn metas, params), (ffn metas, params))``; ``ln = (w, b, eps)``."""
        ln1 = resolve_layernorm(layer.attention.output.LayerNorm, f"{name}.attention.output.LayerNorm")
        ln2 = resolve_layernorm(layer.output.LayerNorm, f"{name}.output.LayerNorm")
        groups = []
        for linears in (ATTN_LINEARS, FFN_LINEARS):
            metas, params = [], []
            for short, path in linears:
                meta, p = resolve_linear(_get(layer, path), short, f"{name}.{path}", training)
                metas.append(meta)
                params.extend(p)
            groups.append((tuple(metas), params))
        return ln1, ln2, groups[0], groups[1]

    @staticmethod
    def _geometry(layer: nn.Module):
        attn = layer.attention.self
        return attn.num_attention_heads, attn.attention_head_size, float(attn.scaling)

    @staticmethod
    def _widths(layer: nn.Module) -> Dict[str, int]:
        d = layer.attention.output.dense.in_features
        heads, head_dim, _ = EncoderAdapter._geometry(layer)
        hd = heads * head_dim
        d_ff = layer.intermediate.dense.out_features
        return {"x_n1": d, "q": hd, "k": hd, "v": hd, "o": hd, "z1": d, "x_n2": d, "up": d_ff,
                "hidden": d_ff, "z2": d}

    # -- patch -------------------------------------------------------------------------------
    def patch(self, layer: nn.Module, name: str, config) -> None:
        ln_w = resolve_layernorm(layer.attention.output.LayerNorm, name)[0]
        state = HyCLoRALayerState({}, (), config.layernorm_outlier_ratio, config.iteration_threshold,
                                  device=ln_w.device)
        if config.compresses:
            from hyclora.quant import ChannelStats

            names = list(ENCODER_ATTENTION_TENSORS + ENCODER_FFN_TENSORS)
            if config.layer_type == "intra":
                names += list(ENCODER_ELEMENTWISE_TENSORS)
            widths = self._widths(layer)
            for key in names:
                outliers = (int(math.floor(widths[key] * config.layernorm_outlier_ratio))
                            if key in ENCODER_NORM_INPUTS else 0)
                state.stats[key] = ChannelStats(widths[key], num_outliers=outliers,
                                                iteration_threshold=config.iteration_threshold,
                                                recalibrate_every=config.recalibrate_every)
            state.stats.to(ln_w.device)
        layer.hyclora_state = state
        sig = inspect.signature(type(layer).forward)
        params = list(sig.parameters.values())[1:]  # drop self
        var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), "kwargs")
        layer._hyclora_patch = _Patch(adapter=self, config=config, name=name,
                                      signature=sig.replace(parameters=params), var_kw=var_kw)
        patch_forward(layer, _patched_forward)

    # -- the compressed forward --------------------------------------------------------------
    def compressed_forward(self, layer: nn.Module, patch: _Patch, args, kwargs):
        bound = patch.signature.bind(*args, **kwargs)
        arguments: Dict[str, Any] = dict(bound.arguments)
        arguments.update(arguments.pop(patch.var_kw, {}) or {})
        hidden = arguments.get("hidden_states", args[0] if args else None)
        mask = arguments.get("attention_mask")
        name = patch.name
        if arguments.get("encoder_hidden_states") is not None:
            raise ValueError(f"hyclora: {name} got encoder_hidden_states; cross-attention is not supported.")
        cache = arguments.get("past_key_values")
        if cache is not None:
            raise ValueError(f"hyclora: {name} got a KV cache; pass use_cache=False (encoder training).")
        if arguments.get("output_attentions"):
            raise ValueError("hyclora: output_attentions=True is not available in the compressed training path.")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 4):
            raise ValueError(
                f"hyclora: {name} got an attention mask of type {type(mask).__name__} "
                f"{tuple(mask.shape) if torch.is_tensor(mask) else ''}; expected None or the 4-D "
                "mask transformers builds for eager/sdpa attention."
            )
        cfg = layer.attention.self.config
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        self.check_config(cfg)

        # Calibration bookkeeping, as for the Llama family (models/base.py): a forward counts
        # unless it is a non-reentrant checkpoint recompute, which replays the counted one.
        config = patch.config
        state: HyCLoRALayerState = layer.hyclora_state
        in_backward = in_backward_pass()
        counted = (not in_backward) or state.owed
        state.owed = False
        stats = state.stats_dict()
        replay = frozenset()
        if counted:
            state.count_forward()
        elif in_backward:
            replay = state.calibrating

        (w1, b1, eps1), (w2, b2, eps2), (a_metas, a_params), (f_metas, f_params) = self.resolve(layer, name)
        if not in_backward:
            warn_unreachable_hooks(((name, layer),))
        heads, head_dim, scaling = self._geometry(layer)
        policy = StoragePolicy(
            config.layer_type, config.q_bit, config.softmax_outlier_ratio, config.kernel_backend,
            probs=getattr(config, "attention_probs", "auto"),
            double_bits=ENCODER_DOUBLE_BIT_TENSORS,
        )
        # a checkpoint recompute that is not counted replays a forward that was checked already
        check = config.on_nonfinite == "raise" and counted
        common = dict(
            layer_name=name, policy=policy, stats=stats, update=bool(counted and config.compresses),
            check_finite=check, record=state.last_saved, replay=replay,
        )
        aplan = EncoderAttentionPlan(
            eps=eps1, linears=a_metas, num_heads=heads, head_dim=head_dim, scaling=scaling, impl=impl,
            attn_dropout=_dropout_p(layer.attention.self.dropout, f"{name}.attention.self.dropout"),
            hidden_dropout=_dropout_p(layer.attention.output.dropout, f"{name}.attention.output.dropout"),
            **common,
        )
        fplan = EncoderFFNPlan(
            eps=eps2, linears=f_metas, activation=getattr(cfg, "hidden_act", "gelu"),
            hidden_dropout=_dropout_p(layer.output.dropout, f"{name}.output.dropout"), **common,
        )

        def run():
            h = encoder_attention_block(aplan, hidden, w1, b1, mask, a_params)
            return encoder_ffn_block(fplan, h, w2, b2, f_params)

        return run_checked(patch, check, in_backward, run)


# -- BERT checkpoints in RoBERTa classes -----------------------------------------------------


def roberta_config_from_bert(bert_config, **overrides):
    """A ``RobertaConfig`` under which a BERT checkpoint computes exactly what it computes as
    BERT: RoBERTa numbers positions from ``pad_token_id + 1``, so with ``pad_token_id = 0`` the
    position table gets one extra (zero) row in front and ``max_position_embeddings + 1`` rows."""
    from transformers import RobertaConfig

    values = dict(
        vocab_size=bert_config.vocab_size, hidden_size=bert_config.hidden_size,
        num_hidden_layers=bert_config.num_hidden_layers, num_attention_heads=bert_config.num_attention_heads,
        intermediate_size=bert_config.intermediate_size, hidden_act=bert_config.hidden_act,
        hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
        max_position_embeddings=bert_config.max_position_embeddings + 1,
        type_vocab_size=bert_config.type_vocab_size, layer_norm_eps=bert_config.layer_norm_eps,
        initializer_range=bert_config.initializer_range, pad_token_id=0,
    )
    pad = getattr(bert_config, "pad_token_id", 0)
    if pad not in (0, None):
        raise ValueError(
            f"hyclora: BERT checkpoint with pad_token_id={pad}; the position shift into RoBERTa "
            "assumes pad_token_id 0 (BERT's [PAD])."
        )
    values.update(overrides)
    return RobertaConfig(**values)


def bert_state_dict_to_roberta(state_dict: Dict[str, torch.Tensor], prefix: str = "roberta.") -> Dict[str, torch.Tensor]:
    """Rename a ``BertModel`` state dict for ``RobertaModel`` (``prefix`` = where the RoBERTa body
    sits: ``"roberta."`` in the task models, ``""`` for a bare ``RobertaModel``). The pooler and
    ``position_ids`` are dropped; the position table gets its leading zero row."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        if key.startswith("pooler.") or key.endswith("position_ids") or not key.startswith(("embeddings.", "encoder.")):
            continue
        if key == "embeddings.position_embeddings.weight":
            value = torch.cat([value.new_zeros(1, value.shape[1]), value], 0)
        out[prefix + key] = value
    return out


def roberta_from_bert_checkpoint(path: str, *, num_labels: int = 2, attn_implementation: str = "eager",
                                 dtype: torch.dtype = torch.float32, **config_overrides):
    """``RobertaForSequenceClassification`` with the encoder of a local BERT checkpoint (a folder
    with ``config.json`` and ``model.safetensors``, e.g. all-MiniLM-L6-v2) and a freshly
    initialised classification head. ``config_overrides`` go to the ``RobertaConfig``
    (``problem_type``, dropouts, ...)."""
    import os

    from safetensors.torch import load_file
    from transformers import BertConfig, RobertaForSequenceClassification

    bert_config = BertConfig.from_pretrained(path)
    config = roberta_config_from_bert(bert_config, num_labels=num_labels, **config_overrides)
    model = RobertaForSequenceClassification(config)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"hyclora: no model.safetensors in {path!r} (a BERT checkpoint folder)")
    missing, unexpected = model.load_state_dict(bert_state_dict_to_roberta(load_file(weights)), strict=False)
    missing = [k for k in missing if not k.startswith("classifier.") and not k.endswith("position_ids")
               and not k.endswith("token_type_ids")]
    if missing or unexpected:
        raise ValueError(f"hyclora: {path} is not a BERT encoder checkpoint: missing {missing}, unexpected {unexpected}")
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype)


ROBERTA = EncoderAdapter("roberta", ("transformers.models.roberta.modeling_roberta", "RobertaLayer"))
BERT = EncoderAdapter("bert", ("transformers.models.bert.modeling_bert", "BertLayer"))
register_model("roberta", ROBERTA)
register_model("bert", BERT)

__all__ = ["EncoderAdapter", "ROBERTA", "BERT", "resolve_layernorm", "roberta_config_from_bert",
           "bert_state_dict_to_roberta", "roberta_from_bert_checkpoint", "ENCODER_ATTENTION_TENSORS",
           "ENCODER_FFN_TENSORS", "ENCODER_NORM_INPUTS"]
