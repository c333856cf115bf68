"""What hyclora must know about an architecture's layer, as data: :class:`ArchitectureSpec`.

An adapter (:class:`hyclora.models.adapter.LayerAdapter` and its block families) reads modules
only at the paths a spec names and refuses whatever the spec does not describe (another norm
class, a submodule with parameters it would not run, a config key it does not read), so a model
that differs from the spec is refused by name instead of being trained with the wrong numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from hyclora.ops.blocks import QK_NORM_VARIANTS, SHARED_INPUT_LINEARS
from hyclora.ops.tensor_specs import DECODER, FAMILIES, POST_NORMS, family_specs
from hyclora.kernels.rmsnorm import NORM_VARIANTS


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
    ``"1+w"``: ``x_hat * (1 + w)`` in fp32, :mod:`hyclora.kernels.rmsnorm`; RMS norms only).
    ``post_norms``: ``()``, or the paths of the norms applied to the attention and the MLP branch
    outputs before their residual adds (Gemma's sandwich norms, ``post_attention_layernorm`` /
    ``post_feedforward_layernorm``; ``norms`` are then the pre-norms). ``attn_softcap_key``: the
    config key of the attention logit soft-capping the layer's attention applies (Gemma 2's
    ``attn_logit_softcapping``; eager attention only, a layer with it set is refused under sdpa and
    S²-Attn, whose kernels have no soft-capping), None when the attention applies none.
    ``s2attn``: whether the layer may run LongLoRA's S²-Attn (``hyclora_s2attn``).
    ``double_bits``: kept tensors (names of :mod:`hyclora.ops.tensor_specs`) this architecture
    keeps at twice ``q_bit`` beyond the table's own ``double_bits`` rows (measured per model).
    ``attention``: the module whose ``config`` the layer reads.
    ``dropouts``: ``(role, path)`` of dropout modules: the encoder blocks honour them; the decoder
    blocks run none, so a decoder layer training with one of them at ``p > 0`` is refused (Phi-3's
    residual dropouts). ``activation_keys``:
    config keys naming the MLP activation (the first is read, all must hold an accepted value);
    any other activation-like key on the config is refused. ``config_rules``: further keys that
    must hold given values. ``qk_norms``: ``()`` or the paths of the q and k norms (Qwen3,
    Gemma 3: an RMSNorm over ``head_dim`` applied to each head of q / k after the projection and
    before RoPE); ``qk_norm_classes``: their accepted classes (empty: ``norm_classes``);
    ``qk_norm_variant``: how their weight scales (None: ``norm_variant``; the variants the attention
    block implements are :data:`hyclora.ops.blocks.QK_NORM_VARIANTS`). ``fused_projections``:
    paths of fused linears (Phi-3's ``self_attn.qkv_proj``, ``mlp.gate_up_proj``) that compute
    several of the block's linears in one: the consecutive ``attention_linears`` / ``mlp_linears``
    entries naming such a path are its output row blocks in order (widths from the layer's
    geometry), among the linears that take the same input
    (:data:`hyclora.ops.blocks.SHARED_INPUT_LINEARS`: q/k/v, gate/up); decoder family only.
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
    qk_norm_classes: Tuple[str, ...] = ()
    qk_norm_variant: Optional[str] = None
    post_norms: Tuple[str, ...] = ()
    attn_softcap_key: Optional[str] = None
    s2attn: bool = True
    double_bits: Tuple[str, ...] = ()
    fused_projections: Tuple[str, ...] = ()
    final_norm: Optional[str] = "norm"

    def __post_init__(self):
        where = f"hyclora: the {self.model_type} architecture spec"
        if self.family not in FAMILIES:
            raise ValueError(f"{where} names the block family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.norm_kind not in ("rms", "layer"):
            raise ValueError(f"{where} names the norm kind {self.norm_kind!r}; known: rms, layer")
        if self.norm_variant not in NORM_VARIANTS or (self.norm_variant != "w" and self.norm_kind != "rms"):
            raise NotImplementedError(f"{where}: norm_variant={self.norm_variant!r} is not implemented for "
                                      f"{self.norm_kind} norms (implemented: 'w'; for RMS norms also '1+w')")
        if self.post_norms and (self.family != DECODER or self.norm_kind != "rms" or len(self.post_norms) != 2):
            raise ValueError(f"{where} names post-norms {self.post_norms}: they are two RMSNorm paths (after the "
                             "attention, after the MLP) of a decoder-family layer")
        if self.qk_norms:
            if self.family != DECODER or self.norm_kind != "rms" or len(self.qk_norms) != 2:
                raise ValueError(f"{where} names q/k norms {self.qk_norms}: they are two RMSNorm paths "
                                 "(q_norm, k_norm) of a decoder-family layer")
            if self.effective_qk_norm_variant not in QK_NORM_VARIANTS:
                raise NotImplementedError(
                    f"{where}: q/k norms {self.qk_norms} with qk_norm_variant="
                    f"{self.effective_qk_norm_variant!r} are not implemented by the attention block "
                    f"(implemented: {', '.join(repr(v) for v in QK_NORM_VARIANTS)})")
        specs = family_specs(self.family)
        unknown = [n for n in self.double_bits if n not in specs or not specs[n].quantised]
        if unknown:
            raise ValueError(f"{where} keeps {unknown} at double bits: not quantised tensors of the {self.family} "
                             "blocks (hyclora.ops.tensor_specs)")
        self._check_fused(where)
        if not self.norm_classes or not self.activation_keys:
            raise ValueError(f"{where} needs norm_classes and activation_keys")

    def _check_fused(self, where: str) -> None:
        """Every path named by several linears is a fused projection laid out as the blocks run one."""
        groups = (self.attention_linears, self.mlp_linears)
        paths = [p for _, p in self.linears]
        repeated = sorted({p for p in paths if paths.count(p) > 1} - set(self.fused_projections))
        if repeated:
            raise ValueError(f"{where} names {repeated} for several linears without listing them in fused_projections")
        if self.fused_projections and self.family != DECODER:
            raise NotImplementedError(f"{where}: fused projections {self.fused_projections} are implemented for the "
                                      f"{DECODER} blocks only")
        for path in self.fused_projections:
            for group, shared in zip(groups, SHARED_INPUT_LINEARS):
                at = [i for i, (_, p) in enumerate(group) if p == path]
                if at:
                    break
            ok = (len(at) >= 2 and at == list(range(at[0], at[0] + len(at))) and at[-1] < shared
                  and paths.count(path) == len(at))
            if not ok:
                raise ValueError(
                    f"{where}: the fused projection {path!r} must be named by two or more consecutive linears of "
                    "one block among those that take the same input (attention: q/k/v; MLP: gate/up)")

    @property
    def linears(self) -> Tuple[Tuple[str, str], ...]:
        return self.attention_linears + self.mlp_linears

    @property
    def fused_parts(self) -> Tuple[Tuple[Optional[Tuple[str, int, int]], ...], ...]:
        """Per block (attention, MLP), per linear: ``(fused path, part index, part count)``, or
        None for a linear of its own."""
        out = []
        for group in (self.attention_linears, self.mlp_linears):
            paths = [p for _, p in group]
            out.append(tuple((p, paths[:i].count(p), paths.count(p)) if p in self.fused_projections else None
                             for i, p in enumerate(paths)))
        return tuple(out)

    @property
    def effective_qk_norm_variant(self) -> str:
        """The variant the q/k norms compute (``qk_norm_variant``, else ``norm_variant``)."""
        return self.norm_variant if self.qk_norm_variant is None else self.qk_norm_variant

    @property
    def effective_qk_norm_classes(self) -> Tuple[str, ...]:
        """The classes accepted for the q/k norms (``qk_norm_classes``, else ``norm_classes``)."""
        return self.qk_norm_classes or self.norm_classes

    @property
    def layout_paths(self) -> Tuple[str, ...]:
        """Every module path the adapter reads (all must exist in a supported layer)."""
        return ((self.attention,) + tuple(p for _, p in self.linears) + self.norms + self.qk_norms
                + self.post_norms + tuple(p for _, p in self.dropouts))

    @property
    def features(self) -> Tuple[str, ...]:
        """The optional parts of :mod:`hyclora.ops.tensor_specs` this layer has (which feature rows
        of the table it keeps)."""
        return (POST_NORMS,) if self.post_norms else ()


def get_path(module, path: str):
    """``module.a.b.c`` for ``path = "a.b.c"`` (AttributeError when a part is missing)."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


__all__ = ["ArchitectureSpec", "ConfigRule", "get_path", "qualified_name"]
