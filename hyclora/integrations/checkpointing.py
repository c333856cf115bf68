"""Activation checkpointing of decoder layers, with a hybrid policy for hyclora.

Two backends, one switch:

* ``backend="torch"``: ``torch.utils.checkpoint`` (non-reentrant by default), what HF's
  ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before transformers 5.23) installs.
* ``backend="deepspeed"``: ``deepspeed.checkpointing.checkpoint``, configured from the DeepSpeed
  JSON's ``activation_checkpointing`` block (``partition_activations``, ``cpu_checkpointing``,
  ``contiguous_memory_optimization``, ``number_checkpoints``). That block is otherwise ignored under
  HF Trainer and accelerate, because nothing calls ``deepspeed.checkpointing.configure``.

Hybrid policy (``every_k``): checkpoint layers 0, k, 2k, ... and leave the others to keep their
(hyclora-compressed) activations. ``every_k=1`` is classic full checkpointing; larger k trades
memory back for less recompute. A hyclora layer that *is* checkpointed still compresses what its
recompute saves, so its backward peak shrinks too; only the layer input (the checkpoint boundary)
is kept exactly, because the recompute must see the same input the forward saw.

The hook point is transformers' ``GradientCheckpointingLayer.__call__``, which routes through
``self._gradient_checkpointing_func`` when ``self.gradient_checkpointing`` is set and the model is
training. Do not also pass ``activation_checkpointing=True`` (or its alias ``gradient_checkpointing=True``)
to ``TrainingArguments``: the Trainer would call ``activation_checkpointing_enable`` and overwrite this
choice (the examples clear it after installing theirs).

Compressed boundaries (``boundary_bits``, torch backend, non-reentrant): with every layer
checkpointed, the layer inputs are what stays alive through the whole step (for Llama-2-7B at
32k tokens, 32 x 32k x 4096 x 2 B = 8 GiB in bf16), more than everything else together. The
boundary is the same tensor hyclora already stores quantised as the layer's ``x_in``, so
:func:`compressed_checkpoint` keeps it the same way: per-channel ranges at ``boundary_bits``
with the largest channels (``boundary_outlier_ratio``) kept exactly, and recomputes the layer in
the backward from the dequantised input. The forward and the loss are unchanged (the first pass
sees the exact input); the backward of each checkpointed layer sees an approximate input, like
every other activation hyclora compresses. The residual path's gradient (the identity) is exact.
On inputs of at most ``PLAIN_FIRST_PASS_ELEMENTS`` (8k tokens at 7B), a hyclora layer's first
pass is its original forward under ``no_grad`` (:class:`_PlainFirstPass`): the non-reentrant
first pass would run hyclora's compressed forward only to drop what it keeps.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from hyclora.models.peft_utils import is_zero3_param

from .wrappers import hf_model, unwrap_engine
from .fsdp import is_fsdp_unit, is_sharded
from .deepspeed import (
    ConfigLike,
    activation_checkpointing_settings,
    configure_activation_checkpointing,
    decoder_layers,
)

BACKENDS = ("torch", "deepspeed")
BOUNDARY_BITS = (2, 4, 8)


class BoundaryCodec:
    """Lossy storage of a checkpoint boundary (a decoder layer's input ``(..., d)``).

    Per-channel min/max ranges of this tensor at ``bits`` (zero point, packed codes) and the
    ``ceil(outlier_ratio * d)`` channels of largest magnitude kept exactly: the residual stream
    of a trained Llama has a few massive channels that would otherwise set every range (the
    layout hyclora uses for its ``x_in``; see ``hyclora.quant.core`` on granularity).
    """

    def __init__(self, bits: int = 8, outlier_ratio: float = 0.01, backend: str = "auto") -> None:
        if isinstance(bits, bool) or bits not in BOUNDARY_BITS:
            raise ValueError(f"boundary_bits={bits!r} is invalid: expected one of {BOUNDARY_BITS}.")
        if isinstance(outlier_ratio, bool) or not isinstance(outlier_ratio, (int, float)) or not 0.0 <= outlier_ratio < 1.0:
            raise ValueError(f"boundary_outlier_ratio={outlier_ratio!r} is invalid: expected a number in [0, 1).")
        self.bits, self.outlier_ratio, self.backend = int(bits), float(outlier_ratio), backend

    def compress(self, x: torch.Tensor):
        from hyclora.quant import quantize

        with torch.no_grad():
            x2d = x.detach().reshape(-1, x.shape[-1])
            k = min(x2d.shape[1] - 1, math.ceil(self.outlier_ratio * x2d.shape[1]))
            idx = None
            if k > 0:
                lo, hi = torch.aminmax(x2d, dim=0)  # no (s, d) temporary
                mag = torch.maximum(hi.float(), lo.float().neg())
                idx = torch.topk(mag, k).indices.sort().values
            return quantize(x.detach(), self.bits, outlier_idx=idx, backend=self.backend)

    def restore(self, q) -> torch.Tensor:
        from hyclora.quant import dequantize

        return dequantize(q, backend=self.backend)


# Hidden-state elements (tokens x hidden) up to which a hyclora layer's first checkpointed pass
# runs the layer's original forward under no_grad (see _PlainFirstPass): at 7B that is 8k tokens,
# where the original forward's (tokens, d_ff) temporaries are ~0.2 GiB each; beyond it the first
# pass takes hyclora's own path, which frees and chunks its temporaries for long contexts.
PLAIN_FIRST_PASS_ELEMENTS = 1 << 25


class _PlainFirstPass(torch.autograd.Function):
    """A checkpointed hyclora layer whose first pass is the layer's original forward under
    ``no_grad`` and whose backward recomputes it on the restored boundary with grad (hyclora's
    compressed path, counted for calibration through the layer's ``owed`` mark) and
    differentiates that recompute with ``torch.autograd.grad``.

    Why: under non-reentrant checkpointing the first pass runs hyclora's compressed forward only
    for the checkpoint to drop everything it keeps; quantising, picking outliers and building the
    stores is then wasted, and on a short sequence its host time (several ms of Python per block)
    is what bounds the step. The original forward returns the same output (the loss is
    unchanged); the gradients come from the recompute as before. The trainable parameters are
    inputs of this Function, so their gradients reach autograd (and DDP/ZeRO hooks) the usual
    way."""

    @staticmethod
    def forward(ctx, run, codec, x, *params):
        ctx.run, ctx.codec, ctx.params, ctx.x_requires_grad = run, codec, params, x.requires_grad
        ctx.packed = codec.compress(x)
        with torch.no_grad():
            out = run(x)
        return out

    @staticmethod
    def backward(ctx, *grads):
        params = ctx.params
        x = ctx.codec.restore(ctx.packed).requires_grad_(ctx.x_requires_grad)
        ctx.packed = None
        with torch.enable_grad():
            out = ctx.run(x)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        inputs = ([x] if ctx.x_requires_grad else []) + list(params)
        got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True) \
            if pairs else (None,) * len(inputs)
        dx = got[0] if ctx.x_requires_grad else None
        return (None, None, dx, *got[1 if ctx.x_requires_grad else 0:])


# Bumped by global module/parameter registration hooks (installed on first use): a layer's cached
# parameter and dropout lists stay valid until something registers a submodule or a parameter
# anywhere. Removals (``del``, set to None) do not bump it, and need not: a removed parameter
# passed to _PlainFirstPass gets no gradient (allow_unused), a removed dropout still counted only
# sends the call down the ordinary checkpoint path.
_structure_generation = 0
_registration_hooks = []


def _bump_structure_generation(*_args):
    global _structure_generation
    _structure_generation += 1  # returns None: the registration itself is unchanged


def _layer_structure(layer: nn.Module):
    """``(parameters, dropout modules)`` of ``layer``, walked once per structure generation
    instead of three walks over the PEFT layer's modules per call: on short checkpointed steps
    those walks were a measurable part of the host time (BENCHMARKS.md)."""
    if not _registration_hooks:
        _registration_hooks.append(nn.modules.module.register_module_module_registration_hook(
            _bump_structure_generation))
        _registration_hooks.append(nn.modules.module.register_module_parameter_registration_hook(
            _bump_structure_generation))
    cached = layer.__dict__.get("_hyclora_structure")
    if cached is None or cached[0] != _structure_generation:
        cached = (_structure_generation, tuple(layer.parameters()),
                  tuple(m for m in layer.modules() if isinstance(m, nn.Dropout)))
        layer.__dict__["_hyclora_structure"] = cached
    return cached[1], cached[2]


def _plain_first_pass_ok(layer: Optional[nn.Module], function: Callable, x: torch.Tensor) -> bool:
    """Whether :class:`_PlainFirstPass` gives this call the same gradients as plain checkpointing:
    a hyclora-patched layer in training, a short enough input, no dropout (the two passes would
    draw different masks: the non-reentrant checkpoint replays the RNG), no tensor outside the
    first argument that needs a gradient (it would not get one), and no ZeRO-3-partitioned
    parameters (as Function inputs their gradients would not match their partitioned shapes), and no
    FSDP2 unit (this call sees the shards; the recompute's unsharded parameters would get the
    gradients and the Function would pass none on)."""
    if layer is None or getattr(layer, "_hyclora_patch", None) is None or not layer.training:
        return False
    if x.numel() > PLAIN_FIRST_PASS_ELEMENTS:
        return False
    params, dropouts = _layer_structure(layer)
    if any(is_zero3_param(p) for p in params):  # checked per call: DeepSpeed marks parameters in place
        return False
    if is_fsdp_unit(layer) or any(is_sharded(p) for p in params):
        return False
    if float(getattr(getattr(layer, "self_attn", None), "attention_dropout", 0.0) or 0.0) > 0.0:
        return False
    if any(m.p > 0 for m in dropouts):
        return False
    bound = getattr(function, "keywords", {}) or {}
    return not any(torch.is_tensor(v) and v.requires_grad for v in bound.values())


def compressed_checkpoint(function: Callable, *args, codec: Optional[BoundaryCodec] = None,
                          layer: Optional[nn.Module] = None, **kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)`` that keeps the
    first positional argument (the layer input) compressed by ``codec`` instead of exactly.

    The forward runs on the exact input; the recompute in the backward runs on its
    reconstruction (same shape/dtype/requires_grad, so the recomputed saved tensors match the
    forward's metadata). Gradients reach the real input through the forward's graph, as with
    plain non-reentrant checkpointing. Without grad, or when the first argument is not a
    floating tensor, this is plain non-reentrant checkpointing. ``layer`` (the decoder layer
    ``function`` runs; :func:`enable_activation_checkpointing` binds it): for a hyclora-patched
    layer and a short input the first pass is the layer's original forward (:class:`_PlainFirstPass`).
    """
    import torch.utils.checkpoint

    codec = codec or BoundaryCodec()
    kwargs.pop("use_reentrant", None)
    if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point() or not torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
    if len(args) == 1 and _plain_first_pass_ok(layer, function, args[0]):
        params = [p for p in _layer_structure(layer)[0] if p.requires_grad]
        return _PlainFirstPass.apply(function, codec, args[0], *params)
    packed = codec.compress(args[0])
    needs_grad = args[0].requires_grad
    holder = [args[0]]  # dropped after the first call: the closure must not keep the exact input
    rest = args[1:]
    del args

    def run(*inner_args, **inner_kwargs):
        if holder[0] is not None:
            x = holder[0]
            holder[0] = None
        else:  # the recompute inside the backward
            x = codec.restore(packed).requires_grad_(needs_grad)
        return function(x, *inner_args, **inner_kwargs)

    return torch.utils.checkpoint.checkpoint(run, *rest, use_reentrant=False, **kwargs)


def checkpointed_indices(num_layers: int, every_k: int) -> List[int]:
    """Indices of the layers the hybrid policy checkpoints: 0, k, 2k, ..."""
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"every_k={every_k!r} is invalid: expected an integer >= 1 (1 = every layer).")
    return list(range(0, num_layers, every_k))


def _deepspeed_checkpoint(ds_func, function, *args):
    """``deepspeed.checkpointing`` with leaf inputs replaced by views of themselves.

    DeepSpeed's partitioned and CPU paths swap ``arg.data`` for a flat (or empty) copy and put a
    flat copy back for the recompute. That is harmless for an intermediate tensor, whose gradient
    autograd checks against recorded metadata, but a *leaf* input -- the embeddings' output once
    ``enable_input_require_grads`` marks it, i.e. the first decoder layer under LoRA -- then gets a
    ``[b, s, h]`` gradient accumulated into ``[b*s*h]`` data ("The size of tensor a (4096) must
    match ..."). A view is not a leaf and keeps the real input intact; it costs nothing.
    """
    args = tuple(
        a.view_as(a) if isinstance(a, torch.Tensor) and a.is_leaf and a.requires_grad else a for a in args
    )
    return ds_func(function, *args)


def enable_activation_checkpointing(
    model: nn.Module,
    *,
    every_k: int = 1,
    backend: str = "torch",
    ds_config: Optional[ConfigLike] = None,
    use_reentrant: Optional[bool] = None,
    boundary_bits: Optional[int] = None,
    boundary_outlier_ratio: float = 0.01,
    **ds_overrides: Any,
) -> Dict[str, Any]:
    """Checkpoint every ``every_k``-th decoder layer of ``model`` (a transformers model, a PEFT
    model around one, or a DeepSpeed engine).

    ``backend="deepspeed"`` configures ``deepspeed.checkpointing`` from ``ds_config``'s
    ``activation_checkpointing`` block (``ds_overrides`` win over the JSON; ``number_checkpoints``
    defaults to the number of checkpointed layers when contiguous memory is asked for) and uses its
    reentrant ``checkpoint`` (``use_reentrant=False`` picks ``non_reentrant_checkpoint``).
    ``backend="torch"`` uses ``torch.utils.checkpoint.checkpoint`` (non-reentrant unless
    ``use_reentrant=True``).

    Reentrant checkpointing only passes gradients to layer inputs that require grad, which frozen
    embeddings under LoRA do not produce, so input gradients are switched on
    (``enable_input_require_grads``) for the reentrant variants.

    ``boundary_bits`` (2, 4 or 8; torch backend, non-reentrant only): keep each checkpointed
    layer's input compressed (:class:`BoundaryCodec`, ``boundary_outlier_ratio`` of the channels
    exact) instead of exactly, see :func:`compressed_checkpoint`. The forward is unchanged; the
    backward recomputes each layer from its reconstructed input.

    Returns a summary: backend, reentrant, every_k, checkpointed layer indices, boundary_bits, and
    (DeepSpeed) the applied ``activation_checkpointing`` settings.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}.")
    if ds_config is not None and backend != "deepspeed":
        raise ValueError(
            "ds_config only configures backend='deepspeed' (its activation_checkpointing block); "
            "pass backend='deepspeed' or drop ds_config."
        )
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(unwrap_engine(model)).__name__} has no checkpointable decoder layers "
            "(transformers GradientCheckpointingLayer): activation checkpointing cannot be enabled."
        )
    chosen = checkpointed_indices(len(layers), every_k)
    summary: Dict[str, Any] = {"backend": backend, "every_k": every_k, "layers": chosen,
                               "boundary_bits": boundary_bits}
    codec = None
    if boundary_bits is not None:
        if backend != "torch" or use_reentrant:
            raise ValueError(
                "boundary_bits (compressed checkpoint boundaries) needs backend='torch' with "
                "non-reentrant checkpointing (use_reentrant False or None)."
            )
        codec = BoundaryCodec(boundary_bits, boundary_outlier_ratio)

    if backend == "deepspeed":
        import deepspeed

        overrides = dict(ds_overrides)
        settings = activation_checkpointing_settings(ds_config, **overrides)
        if settings["contiguous_memory_optimization"] and settings["number_checkpoints"] is None:
            overrides["number_checkpoints"] = len(chosen)
        summary["settings"] = configure_activation_checkpointing(ds_config, **overrides)
        reentrant = True if use_reentrant is None else bool(use_reentrant)
        ds_func = deepspeed.checkpointing.checkpoint if reentrant else deepspeed.checkpointing.non_reentrant_checkpoint
        func = functools.partial(_deepspeed_checkpoint, ds_func)
    else:
        if ds_overrides:
            raise ValueError(
                f"{sorted(ds_overrides)} are DeepSpeed activation-checkpointing options: pass "
                "backend='deepspeed'."
            )
        import torch.utils.checkpoint

        reentrant = False if use_reentrant is None else bool(use_reentrant)
        if codec is not None:
            func = functools.partial(compressed_checkpoint, codec=codec)
        else:
            func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=reentrant)
    summary["reentrant"] = reentrant

    chosen_set = set(chosen)
    for index, layer in enumerate(layers):
        # compressed boundaries: the layer itself is passed on, for _PlainFirstPass
        layer._gradient_checkpointing_func = functools.partial(func, layer=layer) if codec is not None else func
        layer.gradient_checkpointing = index in chosen_set
    if reentrant:
        hf = hf_model(model)
        enable = getattr(hf, "enable_input_require_grads", None)
        if enable is None:
            raise TypeError(
                f"Reentrant checkpointing needs input gradients but {type(hf).__name__} has no "
                "enable_input_require_grads(): use backend='torch' with use_reentrant=False."
            )
        enable()
    return summary


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_activation_checkpointing` (input gradients are switched back off too)."""
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = False
    hf = hf_model(model)
    disable = getattr(hf, "disable_input_require_grads", None)
    if callable(disable):  # a no-op when no input-grad hook is installed
        disable()


__all__ = [
    "BACKENDS",
    "BOUNDARY_BITS",
    "BoundaryCodec",
    "compressed_checkpoint",
    "checkpointed_indices",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
]
