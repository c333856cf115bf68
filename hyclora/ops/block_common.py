"""What the block Functions share (decoder blocks of :mod:`hyclora.ops.blocks`, encoder blocks
of :mod:`hyclora.ops.encoder`): the plan, the parameter layout and checks, keeping a linear's
saved tensors, one linear's backward, and the forward/backward bookkeeping (autocast, manifest).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

import torch

from .lora import LinearMeta, lora_linear_backward, lora_linear_backward_input_first
from .storage import StoragePolicy, TensorLoad, TensorStore

PARAMS_PER_LINEAR = 4  # weight, bias, lora_A, lora_B


@dataclass
class BlockPlan:
    """Non-tensor arguments of a block Function.

    Attributes:
        layer_name: module path used in error messages (e.g. ``model.layers.3``).
        eps: RMSNorm epsilon.
        linears: ``LinearMeta`` of the block's linears, in order.
        policy: the storage policy (layer type, bits).
        stats: ``ChannelStats`` per saved-tensor name (compressing policies), or empty.
        update: whether this forward updates the calibration statistics (``False`` on a
            checkpoint recompute, so calibration does not count it twice).
        check_finite: raise on NaN/Inf in the block input/output.
        record: a dict that receives the manifest of what was saved (names, shapes, dtypes,
            bytes) under ``"attention"`` / ``"mlp"``; ``None`` to skip.
        replay: on a checkpoint recompute, the names whose statistics were still calibrating
            in the counted forward (quantised again exactly as that forward did).
    """

    layer_name: str
    eps: float
    linears: Tuple[LinearMeta, ...]
    policy: StoragePolicy = field(default_factory=StoragePolicy)
    stats: Mapping[str, torch.nn.Module] = field(default_factory=dict)
    update: bool = False
    check_finite: bool = False
    record: Optional[Dict[str, list]] = None
    replay: FrozenSet[str] = frozenset()


# saved-tensor names of a linear's LoRA-A output and dropout generator state, made once
XA_NAMES = {n: f"xa_{n}" for n in ("q", "k", "v", "o", "gate", "up", "down")}
RNG_NAMES = {n: f"rng_{n}" for n in XA_NAMES}


# -- forward / backward bookkeeping ----------------------------------------------------------


def autocast_state(device_type: str):
    """``(device_type, dtype)`` of the autocast active now, or ``None``."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # very old torch: CUDA only
        enabled = device_type == "cuda" and torch.is_autocast_enabled()
    return (device_type, torch.get_autocast_dtype(device_type)) if enabled else None


def restore_autocast(state):
    """A context that re-enters the autocast of :func:`autocast_state` (a null context for ``None``)."""
    # The autograd engine runs backward without the forward's autocast state; restore it so the
    # backward matmuls run in the same precision as the forward ones (what custom_bwd does).
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=state[0], dtype=state[1])


def begin_forward(ctx, plan: BlockPlan, lin: Sequence, norm_w: torch.Tensor, x: torch.Tensor,
                  shared_input: int = 0) -> None:
    """Check the parameters (:func:`check_block_params`); keep the plan and the autocast state on ``ctx``."""
    check_block_params(plan, lin, norm_w, shared_input)
    ctx.plan = plan
    ctx.autocast = autocast_state(x.device.type)


def end_forward(ctx, plan: BlockPlan, store: TensorStore, key: str) -> None:
    """Save what ``store`` holds on ``ctx``; hand its manifest to ``plan.record[key]`` if recording."""
    store.save(ctx)
    if plan.record is not None:
        plan.record[key] = store.manifest


def backward_in_autocast(ctx, backward, dy):
    """``backward(ctx, ctx.plan, dy)`` under the forward's autocast state (see :func:`begin_forward`)."""
    with restore_autocast(ctx.autocast):
        return backward(ctx, ctx.plan, dy)


# -- parameters and saved tensors -------------------------------------------------------------


def linear_params(lin: Sequence, i: int):
    """``(W, bias, A, B)`` of the ``i``-th linear of the flat parameter list."""
    return tuple(lin[PARAMS_PER_LINEAR * i : PARAMS_PER_LINEAR * (i + 1)])


def check_block_params(plan: BlockPlan, lin: Sequence, norm_w: torch.Tensor, shared_input: int = 0):
    """Refuse empty (ZeRO-3 partitioned) parameters, trainable base weights, LoRA linears
    without A/B, and fused-linear parts (:class:`~hyclora.ops.lora.FusedPart`) outside the block's
    first ``shared_input`` linears (those that take the same input) or not laid out as one fused
    linear's consecutive parts."""
    empty = norm_w.numel() == 0
    for p in lin:  # a plain loop: this runs twice per layer and step (host time)
        if p is not None and p.numel() == 0:
            empty = True
    if empty:
        # ZeRO-3 partitions parameters to empty tensors outside their own module's forward.
        raise RuntimeError(
            f"hyclora: {plan.layer_name} got an empty parameter (a ZeRO-3 partitioned parameter that "
            "was not gathered?). Register the decoder layer as a ZeRO-3 leaf module."
        )
    for i, meta in enumerate(plan.linears):
        base = PARAMS_PER_LINEAR * i
        weight, lora_a, lora_b = lin[base], lin[base + 2], lin[base + 3]
        if weight.requires_grad:
            raise ValueError(
                f"hyclora: {plan.layer_name}.{meta.name} has a trainable base weight; hyclora "
                "trains LoRA adapters on frozen base weights. Freeze it (requires_grad_(False)), "
                "make it a LoRA target, or set use_hyclora=False."
            )
        if meta.has_lora and (lora_a is None or lora_b is None):
            raise RuntimeError(f"hyclora internal error: {meta.name} has LoRA but no A/B")
        if meta.part is not None:
            _check_part(plan, lin, i, shared_input)


def _check_part(plan: BlockPlan, lin: Sequence, i: int, shared_input: int):
    meta, part = plan.linears[i], plan.linears[i].part
    base = PARAMS_PER_LINEAR * i
    first = i - part.index
    ok = i < shared_input and 0 <= first and part.index < part.count and first + part.count <= shared_input
    if ok and part.index > 0:
        prev = plan.linears[i - 1]
        pbase = base - PARAMS_PER_LINEAR
        # the previous part: same fused linear, its rows just before, the same tensors and adapter
        ok = (prev.part is not None and prev.part.fused == part.fused and prev.part.index == part.index - 1
              and prev.part.stop == part.start and (prev.has_lora, prev.scaling, prev.dropout_p, prev.weight_fn)
              == (meta.has_lora, meta.scaling, meta.dropout_p, meta.weight_fn)
              and all(lin[pbase + j] is lin[base + j] for j in range(PARAMS_PER_LINEAR)))
    if ok and part.index < part.count - 1:  # the next part follows (it checks the rest itself)
        nxt = plan.linears[i + 1].part
        ok = nxt is not None and nxt.fused == part.fused and nxt.index == part.index + 1
    elif ok and meta.weight_fn is None:
        ok = lin[base].shape[0] == part.stop  # the last part: the parts cover the fused rows
    if not ok or (part.index == 0 and part.start != 0) or part.stop <= part.start:
        raise RuntimeError(f"hyclora internal error: {plan.layer_name}.{meta.name} is part {part} of a fused "
                           f"linear, which the block cannot run as laid out")


def keep(plan: BlockPlan, store: TensorStore, name: str, x: torch.Tensor):
    """Keep ``x`` under ``name`` as the plan's storage policy says."""
    plan.policy.keep(store, name, x, plan.stats.get(name), plan.update, replay=name in plan.replay)


def keep_linear_extras(store: TensorStore, name: str, meta: LinearMeta, out):
    """Keep a LoRA linear's ``XA`` and its dropout generator state (exactly, as is). A fused
    linear's later parts hold the first part's tensors: saved under their own names too (the
    backward reads every part alike), described once (they take no bytes of their own)."""
    if meta.has_lora:
        own = not meta.reuses_xa
        store.plain(XA_NAMES[name], out.xa, describe=own)
        if out.rng_state is not None:
            store.plain(RNG_NAMES[name], out.rng_state, describe=own)


# -- fused linears (FusedPart): whole parameters in, the part's rows to the ops, whole gradients out --


def part_inputs(linears: Sequence[LinearMeta], lin: Sequence) -> Tuple:
    """``lin`` with the bias and ``B`` of every fused part narrowed to its rows (views made inside
    the Function; its inputs stay the whole parameters). ``W`` stays whole: :func:`dense_weight`
    takes the rows after dequantising. ``lin`` itself when no linear is a part."""
    if all(m.part is None for m in linears):
        return lin
    out = list(lin)
    for i, meta in enumerate(linears):
        if meta.part is not None:
            rows = slice(meta.part.start, meta.part.stop)
            for j in (1, 3):  # bias, lora_B
                t = out[PARAMS_PER_LINEAR * i + j]
                if t is not None:
                    out[PARAMS_PER_LINEAR * i + j] = t[rows]
    return tuple(out)


def part_param_rows(linears: Sequence[LinearMeta], lin_offset: int) -> Optional[Dict[int, Tuple[int, int]]]:
    """``{input index: rows}`` of the fused parts' bias and ``B`` for :meth:`TensorStore.params`
    (the backward reads the same row views :func:`part_inputs` gives the forward); ``None`` without parts."""
    rows = {}
    for i, meta in enumerate(linears):
        if meta.part is not None:
            for j in (1, 3):
                rows[lin_offset + PARAMS_PER_LINEAR * i + j] = (meta.part.start, meta.part.stop)
    return rows or None


def merge_part_grads(linears: Sequence[LinearMeta], grads: list) -> list:
    """The gradients of the Function's linear inputs from the per-part ones: every part of a fused
    linear received its whole parameters, so the first part's slots get the fused gradients (bias
    and ``B`` rows concatenated in part order, the ``A`` gradients summed) and the other parts'
    ``None``. ``grads``: ``(W, bias, A, B)`` per linear, changed in place and returned."""
    i = 0
    while i < len(linears):
        part = linears[i].part
        if part is None:
            i += 1
            continue
        slots = range(i, i + part.count)
        for j, combine in ((1, torch.cat), (2, _summed), (3, torch.cat)):
            got = [grads[PARAMS_PER_LINEAR * k + j] for k in slots]
            if all(g is None for g in got):
                continue
            if any(g is None for g in got):
                raise RuntimeError(f"hyclora internal error: some parts of {part.fused} have no gradient")
            grads[PARAMS_PER_LINEAR * i + j] = combine(got)
            for k in slots[1:]:
                grads[PARAMS_PER_LINEAR * k + j] = None
        i += part.count
    return grads


def _summed(tensors):
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


# -- one linear's backward -------------------------------------------------------------------


def linear_grads_input_first(ctx, plan: BlockPlan, load: TensorLoad, i: int, name: str, dy, lin_offset: int):
    """:func:`linear_grads` for a linear whose input the backward rebuilds afterwards (down_proj's
    ``D``, o_proj's attention output): ``(dx, dbias, dB, grad_a)`` with ``grad_a(x_hat) -> dA``."""
    base = lin_offset + PARAMS_PER_LINEAR * i
    need = ctx.needs_input_grad
    return lora_linear_backward_input_first(
        plan.linears[i], dy, load.get(XA_NAMES[name]), *(load.param(base + j) for j in range(PARAMS_PER_LINEAR)),
        rng_state=load.get(RNG_NAMES[name]), need_da=bool(need[base + 2]), need_db=bool(need[base + 3]),
        need_dbias=bool(need[base + 1]), fused=plan.policy.fused_lora)


def linear_grads(ctx, plan: BlockPlan, load: TensorLoad, i: int, name: str, dy, x_hat, lin_offset: int):
    """Run one linear's backward; returns ``(dx, (None, dbias, dA, dB))``."""
    meta = plan.linears[i]
    base = lin_offset + PARAMS_PER_LINEAR * i
    param = load.param
    weight, bias, lora_a, lora_b = param(base), param(base + 1), param(base + 2), param(base + 3)
    need = ctx.needs_input_grad
    dx, dbias, da, db = lora_linear_backward(
        meta, dy, x_hat, load.get(XA_NAMES[name]), weight, bias, lora_a, lora_b,
        rng_state=load.get(RNG_NAMES[name]),
        need_dx=True,
        need_da=bool(need[base + 2]),
        need_db=bool(need[base + 3]),
        need_dbias=bool(need[base + 1]),
        fused=plan.policy.fused_lora,
    )
    return dx, (None, dbias, da, db)


__all__ = [
    "PARAMS_PER_LINEAR",
    "BlockPlan",
    "XA_NAMES",
    "RNG_NAMES",
    "autocast_state",
    "restore_autocast",
    "begin_forward",
    "end_forward",
    "backward_in_autocast",
    "linear_params",
    "check_block_params",
    "keep",
    "keep_linear_extras",
    "part_inputs",
    "part_param_rows",
    "merge_part_grads",
    "linear_grads_input_first",
    "linear_grads",
]
