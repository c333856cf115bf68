"""The one table of the tensors hyclora's blocks keep for the backward, and how each is stored.

Every rule that depends on *which* tensor is kept reads this table: the storage policy
(:mod:`hyclora.ops.storage`: bits, row groups, exact outlier rows), the calibration statistics a
patched layer owns (:mod:`hyclora.models.state`: which names, their widths, outlier channels) and
the analytic byte counts (:mod:`hyclora.memory`). A name is local to a family of blocks: the
decoder blocks (:mod:`hyclora.ops.blocks`, Llama-style) and the encoder blocks
(:mod:`hyclora.ops.encoder`, BERT-style) name tensors by role, so ``"k"`` is the key projection in
both, but each family has its own row (the encoder keeps only K at twice the bits).

Why the storage flags are set as they are (LoRA-gradient cosine on SmolLM2-135M,
``benchmarks/bench_fidelity.py``; numbers in BENCHMARKS.md):

* exact outlier rows: a few tokens (attention sinks, BOS) are orders of magnitude above the
  others; the ``ceil(rows / ROW_OUTLIER_EVERY)`` rows of largest |x| are kept exactly so that
  they stop stretching the per-channel ranges. gate/up go without: the fused SwiGLU / GELU
  kernels read their codes directly and must match ``intra_inter``'s numerics.
* per-row groups of ``GROUP_SIZE`` for V, O and the down-projection input: more accurate than
  per-channel ranges for these tensors (``hyclora/quant/core.py``).
* twice the bits (at most 8) for the inputs of the non-linear operators (norm inputs, Q and K
  through the softmax, G through SiLU): their error reaches every earlier layer, while an error
  in a linear map's input only perturbs that layer's weight gradients (the paper's Fig. 2d).
  The encoder keeps only K doubled, which is what was measured there.

Rows with a ``feature`` are kept only by architectures whose layers have that feature (Gemma's
sandwich norms: :data:`POST_NORMS`); the other layers neither keep them nor own statistics for
them, so a Llama layer's statistics and bytes do not change with them.

This module imports nothing from the rest of hyclora but the config's layer-type names.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, FrozenSet, Iterable, Mapping, Optional, Tuple

from hyclora.config import LAYER_TYPES

DECODER = "decoder"  # Llama-style pre-norm blocks (hyclora.ops.blocks)
ENCODER = "encoder"  # BERT-style post-LN blocks (hyclora.ops.encoder)
FAMILIES = (DECODER, ENCODER)

GROUP_SIZE = 64  # elements per row group of the grouped tensors
ROW_OUTLIER_EVERY = 256  # one exact row per this many rows (rounded up)

# roles: what the tensor is in the block
NORM_INPUT = "norm input"
NORM_STAT = "norm statistic"  # per-token fp32 rstd / mean
QKV_INPUT = "q/k/v input"
QUERY, KEY, VALUE = "attention q", "attention k", "attention v"
ATTENTION_MAP = "attention map"
O_INPUT = "o_proj input"
UP_INPUT = "up input"
GATE, UP = "mlp gate", "mlp up"
ACTIVATION = "activation output"  # SiLU(G), kept only by intra
DOWN_INPUT = "down_proj input"  # SiLU(G) * U or GELU(U)
LORA_XA = "lora xa"  # drop(X) A^T of a LoRA linear
RNG = "rng state"  # generator state of a dropout mask, drawn again in the backward
SHARED = "shared by all layers"  # RoPE tables, the mask (kept, not described per layer)
POST_NORM_INPUT = "post-norm input"  # a branch output before its post-norm (Gemma's sandwich norms)

# features: parts of a layer that only some architectures have (TensorSpec.feature)
POST_NORMS = "post_norms"  # a norm on each branch output before the residual add (Gemma 2/3)
FEATURES = (POST_NORMS,)

# widths: which dimension a tensor's last axis has (LayerShape / the layer's geometry gives them)
HIDDEN, Q_HEADS, KV_HEADS, D_FF, RANK, ONE = "hidden", "q_heads", "kv_heads", "d_ff", "rank", "one"
WIDTHS = (HIDDEN, Q_HEADS, KV_HEADS, D_FF, RANK, ONE)

ALL_LAYER_TYPES = frozenset(LAYER_TYPES)


def outlier_row_count(rows: int) -> int:
    """How many exact outlier rows a tensor of ``rows`` rows keeps: ``ceil(rows /
    ROW_OUTLIER_EVERY)``, 0 when there are too few rows for it to pay off."""
    k = -(-rows // ROW_OUTLIER_EVERY)
    return 0 if (rows < 2 * k + 1 or rows < 16) else k


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a block keeps for the backward.

    ``quantised``: compressing layer types quantise it (with calibration statistics); the other
    flags say how: ``double_bits`` (2 x ``q_bit``, at most 8), ``grouped`` (per-row groups, ranges
    from the tensor itself), ``row_outliers`` (exact outlier rows), ``outlier_channels`` (exact
    outlier channels, ``layernorm_outlier_ratio`` of them). ``layer_types``: the layer types that
    keep it at all (quantised or as is). ``with_map``: kept only beside the eager attention map
    (the o_proj input; sdpa and the recomputed map rebuild it)."""

    name: str
    family: str
    role: str
    width: Optional[str] = None  # None: not a (tokens, width) tensor
    quantised: bool = False
    double_bits: bool = False
    grouped: bool = False
    row_outliers: bool = False
    outlier_channels: bool = False
    layer_types: FrozenSet[str] = ALL_LAYER_TYPES
    with_map: bool = False
    feature: Optional[str] = None  # kept only by layers with this feature (FEATURES); None: by all


def _act(name, family, role, width, *, row_outliers=True, **flags) -> TensorSpec:
    """A quantised activation (exact outlier rows unless said otherwise)."""
    return TensorSpec(name, family, role, width, quantised=True, row_outliers=row_outliers, **flags)


def _per_linear(family, role, prefix, linears, width=None):
    return tuple(TensorSpec(f"{prefix}_{n}", family, role, width) for n in linears)


_INTRA = frozenset({"intra"})
DECODER_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
ENCODER_LINEARS = ("q", "k", "v", "o", "up", "down")

# Row order within a family is the order of a layer's calibration statistics (state_dict keys).
SPECS: Tuple[TensorSpec, ...] = (
    # -- decoder: x -> RMSNorm -> q/k/v -> RoPE -> attention -> o; x -> RMSNorm -> gate/up -> SwiGLU -> down
    _act("x_in", DECODER, NORM_INPUT, HIDDEN, outlier_channels=True, double_bits=True),
    TensorSpec("rstd1", DECODER, NORM_STAT, ONE),
    _act("q", DECODER, QUERY, Q_HEADS, double_bits=True),  # before RoPE
    _act("k", DECODER, KEY, KV_HEADS, double_bits=True),  # before RoPE
    _act("v", DECODER, VALUE, KV_HEADS, grouped=True),
    TensorSpec("probs", DECODER, ATTENTION_MAP, with_map=True),
    _act("o", DECODER, O_INPUT, Q_HEADS, grouped=True, with_map=True),
    _act("x_mid", DECODER, NORM_INPUT, HIDDEN, outlier_channels=True, double_bits=True),
    TensorSpec("rstd2", DECODER, NORM_STAT, ONE),
    _act("gate", DECODER, GATE, D_FF, double_bits=True, row_outliers=False),
    _act("up", DECODER, UP, D_FF, row_outliers=False),
    _act("silu", DECODER, ACTIVATION, D_FF, layer_types=_INTRA),
    _act("hidden", DECODER, DOWN_INPUT, D_FF, grouped=True, layer_types=_INTRA),
    # sandwich norms (Gemma 2/3): the o_proj and down_proj outputs before their post-norms, kept
    # like the pre-norm inputs (norm inputs: exact outlier channels and rows, twice the bits)
    _act("attn_out", DECODER, POST_NORM_INPUT, HIDDEN, outlier_channels=True, double_bits=True, feature=POST_NORMS),
    TensorSpec("rstd_attn_out", DECODER, NORM_STAT, ONE, feature=POST_NORMS),
    _act("mlp_out", DECODER, POST_NORM_INPUT, HIDDEN, outlier_channels=True, double_bits=True, feature=POST_NORMS),
    TensorSpec("rstd_mlp_out", DECODER, NORM_STAT, ONE, feature=POST_NORMS),
    *_per_linear(DECODER, LORA_XA, "xa", DECODER_LINEARS, RANK),
    *_per_linear(DECODER, RNG, "rng", DECODER_LINEARS),
    TensorSpec("cos", DECODER, SHARED), TensorSpec("sin", DECODER, SHARED), TensorSpec("mask", DECODER, SHARED),
    # -- encoder: x -> q/k/v -> attention -> o -> + x -> LayerNorm; h -> up -> GELU -> down -> + h -> LayerNorm
    _act("x_n1", ENCODER, QKV_INPUT, HIDDEN),
    _act("q", ENCODER, QUERY, Q_HEADS),
    _act("k", ENCODER, KEY, KV_HEADS, double_bits=True),
    _act("v", ENCODER, VALUE, KV_HEADS, grouped=True),
    TensorSpec("probs", ENCODER, ATTENTION_MAP, with_map=True),
    _act("o", ENCODER, O_INPUT, Q_HEADS, grouped=True, with_map=True),
    _act("z1", ENCODER, NORM_INPUT, HIDDEN, outlier_channels=True),
    TensorSpec("mean1", ENCODER, NORM_STAT, ONE), TensorSpec("rstd1", ENCODER, NORM_STAT, ONE),
    _act("x_n2", ENCODER, UP_INPUT, HIDDEN),
    _act("up", ENCODER, UP, D_FF, row_outliers=False),
    _act("z2", ENCODER, NORM_INPUT, HIDDEN, outlier_channels=True),
    TensorSpec("mean2", ENCODER, NORM_STAT, ONE), TensorSpec("rstd2", ENCODER, NORM_STAT, ONE),
    _act("hidden", ENCODER, DOWN_INPUT, D_FF, grouped=True, layer_types=_INTRA),
    *_per_linear(ENCODER, LORA_XA, "xa", ENCODER_LINEARS, RANK),
    *_per_linear(ENCODER, RNG, "rng", ENCODER_LINEARS),
    TensorSpec("rng_attn", ENCODER, RNG), TensorSpec("rng_hidden", ENCODER, RNG),
    TensorSpec("mask", ENCODER, SHARED),
)


def _by_family() -> Dict[str, Mapping[str, TensorSpec]]:
    out: Dict[str, Dict[str, TensorSpec]] = {f: {} for f in FAMILIES}
    for s in SPECS:
        if s.name in out[s.family]:
            raise RuntimeError(f"hyclora internal error: tensor {s.name!r} listed twice for the {s.family}")
        if not s.quantised and (s.double_bits or s.grouped or s.row_outliers or s.outlier_channels):
            raise RuntimeError(f"hyclora internal error: storage flags on the unquantised tensor {s.name!r}")
        if s.width is not None and s.width not in WIDTHS:
            raise RuntimeError(f"hyclora internal error: unknown width {s.width!r} of {s.name!r}")
        if s.feature is not None and s.feature not in FEATURES:
            raise RuntimeError(f"hyclora internal error: unknown feature {s.feature!r} of {s.name!r}")
        out[s.family][s.name] = s
    # the name-keyed views below (read by kernel glue that has no family at hand) need these two
    # flags to agree wherever a name appears in both families
    for name in set(out[DECODER]) & set(out[ENCODER]):
        a, b = out[DECODER][name], out[ENCODER][name]
        if (a.grouped, a.row_outliers) != (b.grouped, b.row_outliers):
            raise RuntimeError(f"hyclora internal error: {name!r} is stored differently by the two families")
    return {f: MappingProxyType(d) for f, d in out.items()}


_BY_FAMILY = _by_family()


def family_specs(family: str) -> Mapping[str, TensorSpec]:
    """``{name: TensorSpec}`` of one family (read-only)."""
    try:
        return _BY_FAMILY[family]
    except KeyError:
        raise ValueError(f"hyclora: unknown block family {family!r}; expected one of {', '.join(FAMILIES)}") from None


def tensor_spec(family: str, name: str) -> TensorSpec:
    spec = family_specs(family).get(name)
    if spec is None:
        raise RuntimeError(f"hyclora internal error: the {family} blocks keep no tensor named {name!r} "
                           "(hyclora.ops.tensor_specs.SPECS)")
    return spec


def has_feature(spec: TensorSpec, features: Iterable[str] = ()) -> bool:
    """Whether a layer with ``features`` keeps the tensor ``spec`` describes (feature rows only
    with their feature)."""
    return spec.feature is None or spec.feature in features


def kept_activations(family: str, layer_type: str, keeps_map: bool, features: Iterable[str] = ()
                     ) -> Tuple[TensorSpec, ...]:
    """The (tokens, width) activations a layer of ``layer_type`` keeps, in table order: the
    quantised rows when compressing, the same tensors as is for ``baseline``; those kept only
    beside the attention map only when ``keeps_map``; the rows of a feature only for a layer
    with it (``features``)."""
    features = frozenset(features)
    return tuple(s for s in family_specs(family).values()
                 if s.quantised and layer_type in s.layer_types and (keeps_map or not s.with_map)
                 and has_feature(s, features))


def stats_names(family: str, layer_type: str, features: Iterable[str] = ()) -> Tuple[str, ...]:
    """The tensors a patched layer keeps calibration statistics for (none for ``baseline``)."""
    if layer_type == "baseline":
        return ()
    return tuple(s.name for s in kept_activations(family, layer_type, keeps_map=True, features=features))


def tensor_widths(family: str, dims: Mapping[str, int]) -> Dict[str, int]:
    """``{name: width}`` of the family's quantised tensors; ``dims`` maps the width keys
    (``hidden``, ``q_heads``, ``kv_heads``, ``d_ff``) to a layer's sizes."""
    return {s.name: dims[s.width] for s in family_specs(family).values() if s.quantised}


def double_bit_names(family: str) -> FrozenSet[str]:
    return frozenset(s.name for s in family_specs(family).values() if s.double_bits)


# Name-keyed views for the kernel glue (hyclora.ops.fused_rmsnorm / fused_swiglu), valid for both
# families (checked above); a family-aware caller reads StoragePolicy.spec(name) instead.
GROUPED_TENSORS = frozenset(s.name for s in SPECS if s.grouped)
ROW_OUTLIER_EXEMPT = frozenset(s.name for s in SPECS if s.quantised and not s.row_outliers)
XA_NAMES = MappingProxyType({s.name[len("xa_"):]: s.name for s in SPECS if s.role == LORA_XA})

__all__ = [
    "TensorSpec", "SPECS", "DECODER", "ENCODER", "FAMILIES", "GROUP_SIZE", "ROW_OUTLIER_EVERY", "WIDTHS",
    "POST_NORMS", "FEATURES", "has_feature", "family_specs", "tensor_spec", "kept_activations", "stats_names", "tensor_widths", "double_bit_names",
    "GROUPED_TENSORS", "ROW_OUTLIER_EXEMPT", "XA_NAMES",
]
