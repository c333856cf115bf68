"""HyCLoRAConfig: every knob of hyclora, validated when the config is built.

The field names are the HyC-LoRA reference's command-line names, so scripts written for it keep
working: ``--use_hyclora --layer_type --q_bit --softmax_outlier_ratio --layernorm_outlier_ratio
--iteration_threshold``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

LAYER_TYPES = ("baseline", "intra", "intra_inter", "intra_inter_full_fuse")
Q_BITS = (2, 4, 8)
ON_NONFINITE = ("raise", "ignore")
RECALIBRATE_MODES = ("refresh", "reset")
CALIBRATIONS = ("auto", "quick", "eager")
KERNEL_BACKENDS = ("auto", "triton", "torch")
ATTENTION_PROBS = ("auto", "dense", "sparse", "recompute")
S2_BLOCK_KERNELS = ("auto", "sdpa", "flash")
LM_LOSSES = ("auto", "chunked", "model")


def str2bool(value: Any) -> bool:
    """argparse type for booleans: ``type=bool`` would turn any non-empty string into True."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


class ConfigInUseError(dataclasses.FrozenInstanceError):
    """A field of a :class:`HyCLoRAConfig` was assigned while a model patched with it is in use
    (an ``AttributeError``, like assigning to a frozen dataclass)."""


@dataclass
class HyCLoRAConfig:
    """What hyclora compresses and how.

    Attributes:
        use_hyclora: master switch. ``False`` leaves the model untouched.
        layer_type: ``baseline`` (our backward, nothing compressed), ``intra`` (every buffered
            activation quantised, outlier channels on norm inputs, sparse softmax map),
            ``intra_inter`` (intra + LoRA-aware reconstruction and recomputation) or
            ``intra_inter_full_fuse`` (intra_inter with fused Triton epilogues).
        q_bit: bits per quantised activation element: 2, 4 or 8.
        softmax_outlier_ratio: fraction of attention-probability entries kept (eager attention).
        layernorm_outlier_ratio: fraction of channels of every norm input kept exactly.
        iteration_threshold: training forwards per layer during which quantisation statistics
            are calibrated; frozen afterwards. ``0`` recomputes them on every step.
        recalibrate_every: training forwards per layer after which frozen statistics expire and
            are calibrated again (``iteration_threshold`` forwards), so that ranges follow the
            activations as fine-tuning moves them; ``0`` freezes for good (the paper). Default 50:
            frozen ranges measurably cost eval loss on ``make demo`` and re-calibrating recovered
            it (BENCHMARKS.md), for ``iteration_threshold`` calibrating forwards per 50.
        recalibrate_mode: how frozen statistics are renewed every ``recalibrate_every`` forwards.
            ``refresh`` (default): the next ``iteration_threshold`` forwards gather new statistics
            beside the frozen ones, which stay in use, and the new ones replace them in place;
            captured CUDA graphs keep replaying through it (no release, no eager step, no
            re-capture). ``reset``: the statistics expire and calibrate again from scratch, each
            calibrating forward quantising with its own range (graphs are released and re-captured).
        calibration: how the first statistics are gathered. ``quick``: they freeze after the
            first forward and the next ``iteration_threshold - 1`` forwards refine them as a
            refresh window, each quantising with the range of the forwards before it (CUDA graphs
            capture at the second step; the frozen statistics end up the same). ``eager``: ``iteration_threshold`` forwards each
            quantise with their own range before the statistics freeze (the paper). ``auto``
            (default): ``quick`` with ``recalibrate_mode="refresh"`` and ``iteration_threshold
            >= 1``, else ``eager``.
        on_nonfinite: ``raise`` (default) stops on a NaN/Inf activation naming the layer;
            ``ignore`` skips the check.
        kernel_backend: ``auto`` (Triton on CUDA tensors, torch on CPU), ``triton`` or ``torch``.
        lm_loss: how a causal LM's training loss is computed. ``chunked``: in chunks of tokens
            through the LM head (``hyclora.ops.chunked_ce``), so the ``(tokens, vocab)`` logits, their
            fp32 upcast and their gradient never exist at once; a training forward with labels
            then returns ``logits=None`` (evaluation and generation keep the model's own
            forward). Refused on a model whose loss it cannot reproduce. ``model``: the model's
            own loss. ``auto`` (default): ``chunked`` where it can reproduce the model's loss,
            else ``model``.
        attention_probs: how the eager attention path keeps the softmax map for the backward:
            ``sparse`` (the paper: the top ``softmax_outlier_ratio`` entries), ``recompute``
            (nothing: the backward recomputes it from the rebuilt Q/K, like the sdpa path),
            ``dense`` (as is) or ``auto`` (dense for ``baseline``, recompute when compressing:
            the paper's sparse map alone ruins the worst LoRA gradients on a real model even at
            8 bits; BENCHMARKS.md).

    Kernel options (defaults chosen by the benchmarks; for A/B runs and debugging):
        fused_lora_ops: ``intra_inter_full_fuse`` computes the LoRA terms with the fused LoRA
            ops (one rounding); ``False`` runs them op by op with PEFT's roundings.
        lora_kernels_min_tokens: the fused LoRA ops launch their Triton kernels outside CUDA
            graph capture from this many tokens per call; ``None`` only under capture (eager
            launches cost more host time than they save).
        s2_block_kernels: S²-Attn block kernels: ``sdpa``, ``flash`` (aten FA2 ops) or ``auto``
            (sdpa for blocks of at least 4096 tokens, flash below).
        mlp_chunk_elements: the MLP backward works on row chunks of at most this many ``d_ff``
            elements (bounds its transient memory); ``0`` works on all rows at once.
    """

    use_hyclora: bool = True
    layer_type: str = "intra_inter"
    q_bit: int = 4
    softmax_outlier_ratio: float = 0.05
    layernorm_outlier_ratio: float = 0.005
    iteration_threshold: int = 5
    recalibrate_every: int = 50
    recalibrate_mode: str = "refresh"
    calibration: str = "auto"
    on_nonfinite: str = "raise"
    kernel_backend: str = "auto"
    lm_loss: str = "auto"
    attention_probs: str = "auto"
    fused_lora_ops: bool = True
    lora_kernels_min_tokens: Optional[int] = None
    s2_block_kernels: str = "auto"
    mlp_chunk_elements: int = 1 << 26

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a field validates it at once (a bad value raises here, naming the field, and
        the config keeps its old value) and is refused while a model patched with this config
        is in use: ``apply_hyclora`` built the layers' calibration statistics and guards from it,
        so a change would apply partly or fail steps later."""
        if name not in _FIELDS or not self.__dict__.get("_validated", False):
            object.__setattr__(self, name, value)
            return
        if self.__dict__.get("_in_use", 0) > 0:
            raise ConfigInUseError(
                f"HyCLoRAConfig.{name} cannot be changed to {value!r}: a model was patched with this "
                f"config (apply_hyclora) and its layers were built from it. Call revert_hyclora(model), "
                f"then apply_hyclora(model, dataclasses.replace(config, {name}={value!r}))."
            )
        old = self.__dict__[name]
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except ValueError:
            object.__setattr__(self, name, old)
            raise

    # -- in use by a patched model ------------------------------------------------------------
    def _attach(self) -> None:
        """``apply_hyclora`` patched a model with this config: field assignments are refused
        until the matching :meth:`_detach` (``revert_hyclora``)."""
        object.__setattr__(self, "_in_use", self.__dict__.get("_in_use", 0) + 1)

    def _detach(self) -> None:
        object.__setattr__(self, "_in_use", max(0, self.__dict__.get("_in_use", 0) - 1))

    @property
    def in_use(self) -> bool:
        """Whether a model patched with this config (and not reverted) refuses changes to it."""
        return self.__dict__.get("_in_use", 0) > 0

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        if not isinstance(self.use_hyclora, bool):
            raise ValueError(
                f"HyCLoRAConfig.use_hyclora={self.use_hyclora!r} is invalid: expected True or False."
            )
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(
                f"HyCLoRAConfig.layer_type={self.layer_type!r} is invalid: expected one of "
                f"{', '.join(LAYER_TYPES)}."
            )
        # an int, not merely equal to one: 4.0 == 4 and True == 1 would pass a membership test
        if isinstance(self.q_bit, bool) or not isinstance(self.q_bit, int) or self.q_bit not in Q_BITS:
            raise ValueError(
                f"HyCLoRAConfig.q_bit={self.q_bit!r} is invalid: expected an int, one of "
                f"{', '.join(map(str, Q_BITS))}."
            )
        for name in ("softmax_outlier_ratio", "layernorm_outlier_ratio"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not 0.0 <= value <= 1.0
            ):
                raise ValueError(
                    f"HyCLoRAConfig.{name}={value!r} is invalid: expected a number in [0, 1]."
                )
        for name, zero_means in (("iteration_threshold", "recomputes statistics on every step"),
                                 ("recalibrate_every", "keeps frozen statistics for good")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"HyCLoRAConfig.{name}={value!r} is invalid: expected an integer >= 0 (0 {zero_means})."
                )
        if self.recalibrate_mode not in RECALIBRATE_MODES:
            raise ValueError(
                f"HyCLoRAConfig.recalibrate_mode={self.recalibrate_mode!r} is invalid: expected one of "
                f"{', '.join(RECALIBRATE_MODES)}."
            )
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"HyCLoRAConfig.calibration={self.calibration!r} is invalid: expected one of "
                f"{', '.join(CALIBRATIONS)}."
            )
        if self.calibration == "quick" and not (self.recalibrate_mode == "refresh" and self.iteration_threshold > 0):
            raise ValueError(
                "HyCLoRAConfig.calibration='quick' refines the first statistics the way "
                "recalibrate_mode='refresh' does and needs iteration_threshold >= 1 (got recalibrate_mode="
                f"{self.recalibrate_mode!r}, iteration_threshold={self.iteration_threshold!r}); use "
                "calibration='eager' or 'auto'."
            )
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"HyCLoRAConfig.on_nonfinite={self.on_nonfinite!r} is invalid: expected one of "
                f"{', '.join(ON_NONFINITE)}."
            )
        if self.attention_probs not in ATTENTION_PROBS:
            raise ValueError(
                f"HyCLoRAConfig.attention_probs={self.attention_probs!r} is invalid: expected one "
                f"of {', '.join(ATTENTION_PROBS)}."
            )
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"HyCLoRAConfig.kernel_backend={self.kernel_backend!r} is invalid: expected one "
                f"of {', '.join(KERNEL_BACKENDS)}."
            )
        if self.lm_loss not in LM_LOSSES:
            raise ValueError(
                f"HyCLoRAConfig.lm_loss={self.lm_loss!r} is invalid: expected one of {', '.join(LM_LOSSES)}."
            )
        if not isinstance(self.fused_lora_ops, bool):
            raise ValueError(f"HyCLoRAConfig.fused_lora_ops={self.fused_lora_ops!r} is invalid: expected True or False.")
        tokens = self.lora_kernels_min_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise ValueError(
                f"HyCLoRAConfig.lora_kernels_min_tokens={tokens!r} is invalid: expected None (only under "
                "CUDA graph capture) or an integer >= 0."
            )
        if self.s2_block_kernels not in S2_BLOCK_KERNELS:
            raise ValueError(
                f"HyCLoRAConfig.s2_block_kernels={self.s2_block_kernels!r} is invalid: expected one of "
                f"{', '.join(S2_BLOCK_KERNELS)}."
            )
        chunk = self.mlp_chunk_elements
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(
                f"HyCLoRAConfig.mlp_chunk_elements={chunk!r} is invalid: expected an integer >= 0 "
                "(0: no row chunks)."
            )

    # -- derived ------------------------------------------------------------------------------
    @property
    def compresses(self) -> bool:
        """True when saved activations are lossy (anything but ``baseline``)."""
        return self.use_hyclora and self.layer_type != "baseline"

    @property
    def quick_calibration(self) -> bool:
        """Whether the first statistics are calibrated quickly (``calibration``, ``auto`` resolved)."""
        if self.calibration == "auto":
            return self.recalibrate_mode == "refresh" and self.iteration_threshold > 0
        return self.calibration == "quick"

    @property
    def reconstructs(self) -> bool:
        """True for the LoRA-aware inter-operator reconstruction (intra_inter*)."""
        return self.use_hyclora and self.layer_type.startswith("intra_inter")

    @property
    def fused(self) -> bool:
        return self.use_hyclora and self.layer_type == "intra_inter_full_fuse"

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "HyCLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown HyCLoRAConfig field(s) {unknown}: expected a subset of {sorted(known)}."
            )
        return cls(**data)

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> "HyCLoRAConfig":
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path, "r", encoding="utf-8") as handle:
                text = handle.read()
        return cls.from_dict(json.loads(text))

    # -- command line -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add ``--use_hyclora --layer_type --q_bit ...`` to an argparse parser.

        Works with ``transformers.HfArgumentParser`` too (it is an ``ArgumentParser``); there
        you may also pass ``HyCLoRAConfig`` itself as one of its dataclasses.
        """
        defaults = cls.__dataclass_fields__
        group = parser.add_argument_group("hyclora")
        group.add_argument(
            "--use_hyclora", type=str2bool, nargs="?", const=True,
            default=defaults["use_hyclora"].default,
            help="compress buffered activations (true/false; bare flag = true)",
        )
        group.add_argument("--layer_type", choices=LAYER_TYPES, default=defaults["layer_type"].default)
        group.add_argument("--q_bit", type=int, choices=Q_BITS, default=defaults["q_bit"].default)
        group.add_argument(
            "--softmax_outlier_ratio", type=float, default=defaults["softmax_outlier_ratio"].default,
            help="fraction of attention-map entries kept (eager attention)",
        )
        group.add_argument(
            "--layernorm_outlier_ratio", type=float,
            default=defaults["layernorm_outlier_ratio"].default,
            help="fraction of norm-input channels kept exactly",
        )
        group.add_argument(
            "--iteration_threshold", type=int, default=defaults["iteration_threshold"].default,
            help="calibration forwards per layer before statistics freeze (0: never freeze)",
        )
        group.add_argument(
            "--recalibrate_every", type=int, default=defaults["recalibrate_every"].default,
            help="forwards per layer after which frozen statistics are calibrated again (0: never)",
        )
        group.add_argument(
            "--recalibrate_mode", choices=RECALIBRATE_MODES, default=defaults["recalibrate_mode"].default,
            help="refresh: gather new statistics beside the frozen ones and swap them in place (CUDA graphs "
                 "keep replaying); reset: calibrate again from scratch",
        )
        group.add_argument(
            "--calibration", choices=CALIBRATIONS, default=defaults["calibration"].default,
            help="quick: freeze the statistics after the first forward and refine them over the next forwards "
                 "(graphs capture at step 2); eager: calibrate iteration_threshold forwards first; auto: quick where "
                 "recalibrate_mode=refresh",
        )
        group.add_argument("--on_nonfinite", choices=ON_NONFINITE, default=defaults["on_nonfinite"].default)
        group.add_argument("--kernel_backend", choices=KERNEL_BACKENDS, default=defaults["kernel_backend"].default)
        group.add_argument(
            "--lm_loss", choices=LM_LOSSES, default=defaults["lm_loss"].default,
            help="causal LMs: chunked: the training loss in chunks through the LM head, no full logits; model: the "
                 "model's own loss; auto: chunked where it reproduces the model's loss",
        )
        group.add_argument(
            "--attention_probs", choices=ATTENTION_PROBS, default=defaults["attention_probs"].default,
            help="eager attention: keep the softmax map sparse/dense, or recompute it in backward",
        )
        return parser

    @classmethod
    def from_args(cls, args: Any) -> "HyCLoRAConfig":
        """Build from a parsed namespace (or any object with the field names as attributes)."""
        values = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(cls)
            if hasattr(args, f.name)
        }
        return cls(**values)


_FIELDS = frozenset(f.name for f in dataclasses.fields(HyCLoRAConfig))

__all__ = ["HyCLoRAConfig", "ConfigInUseError", "LAYER_TYPES", "Q_BITS", "str2bool"]
