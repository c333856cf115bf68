"""What hyclora must know about an architecture's layer, as data: :class:`ArchitectureSpec`.

An adapter (:class:`hyclora.models.adapter.LayerAdapter` and its block families) reads modules
only at the paths a spec names and refuses whatever the spec does not describe (another norm
class, a submodule with parameters it would not run, a config key it does not read), so a model
that differs from the spec is refused by name instead of being trained with the wrong numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from hyclora.ops.tensor_specs import DECODER, FAMILIES


@dataclass(frozen=True)
class ConfigRule:
    """``getattr(config, key, default)`` must be one of ``accepted``; ``why`` goes into the error."""

    key: str
    accepted: Tuple[Any, ...]
    default: Any = None
    why: str = ""


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture's layer: where its modules are and which config values it supports.

    Paths are dotted attribute paths below the patched layer. ``attention_linears`` /
    ``mlp_linears``: ``(name, path)`` in the order the blocks take them (the name is the
    ``LinearMeta`` name used in messages). ``norms``: the two norms in block order; ``norm_kind``
    ``"rms"`` (weight, eps) or ``"layer"`` (``torch.nn.LayerNorm``: weight, bias, eps);
    ``norm_classes``: the accepted classes, ``"module.QualName"`` (any other class is refused);
    ``norm_variant``: how the weight scales the normalised input (``"w"``: ``x_hat * w``; Gemma's
    ``"1+w"`` is not implemented). ``attention``: the module whose ``config`` the layer reads.
    ``dropouts``: ``(role, path)`` of dropout modules the blocks honour. ``activation_keys``:
    config keys naming the MLP activation (the first is read, all must hold an accepted value);
    any other activation-like key on the config is refused. ``config_rules``: further keys that
    must hold given values. ``qk_norms`` / ``fused_projections``: q/k norms (Qwen3, Gemma 3) and
    fused linears (Phi-3's ``qkv_proj``); none is implemented, so a spec naming one is refused.
    ``final_norm``: attribute of the module holding the layer list that is the final norm (its
    training forward saves memory too), or None.
    """

    model_type: str
    layer_class: Tuple[str, str]  # (module, class name)
    family: str = DECODER
    attention: str = "self_attn"
    attention_linears: Tuple[Tuple[str, str], ...] = (
        ("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
        ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"))
    mlp_linears: Tuple[Tuple[str, str], ...] = (
        ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"), ("down_proj", "mlp.down_proj"))
    norms: Tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    norm_kind: str = "rms"
    norm_classes: Tuple[str, ...] = ()
    norm_variant: str = "w"
    dropouts: Tuple[Tuple[str, str], ...] = ()
    activation_keys: Tuple[str, ...] = ("hidden_act",)
    activations: Tuple[str, ...] = ("silu", "swish")
    default_activation: str = "silu"
    config_rules: Tuple[ConfigRule, ...] = ()
    qk_norms: Tuple[str, ...] = ()
    fused_projections: Tuple[str, ...] = ()
    final_norm: Optional[str] = "norm"

    def __post_init__(self):
        where = f"hyclora: the {self.model_type} architecture spec"
        if self.family not in FAMILIES:
            raise ValueError(f"{where} names the block family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.norm_kind not in ("rms", "layer"):
            raise ValueError(f"{where} names the norm kind {self.norm_kind!r}; known: rms, layer")
        if self.norm_variant != "w":
            raise NotImplementedError(f"{where}: norm_variant={self.norm_variant!r} is not implemented (only "
                                      "'w', the norm weight scaling the normalised input)")
        if self.qk_norms or self.fused_projections:
            raise NotImplementedError(f"{where}: q/k norms {self.qk_norms} and fused projections "
                                      f"{self.fused_projections} are not implemented by hyclora's blocks")
        if not self.norm_classes or not self.activation_keys:
            raise ValueError(f"{where} needs norm_classes and activation_keys")

    @property
    def linears(self) -> Tuple[Tuple[str, str], ...]:
        return self.attention_linears + self.mlp_linears

    @property
    def layout_paths(self) -> Tuple[str, ...]:
        """Every module path the adapter reads (all must exist in a supported layer)."""
        return ((self.attention,) + tuple(p for _, p in self.linears) + self.norms
                + tuple(p for _, p in self.dropouts))


def get_path(module, path: str):
    """``module.a.b.c`` for ``path = "a.b.c"`` (AttributeError when a part is missing)."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


__all__ = ["ArchitectureSpec", "ConfigRule", "get_path", "qualified_name"]
