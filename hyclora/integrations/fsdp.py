"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) for hyclora models: the decoder layer as
the sharding unit, a check that fused blocks never read sharded weights, mixed precision and
parameter CPU offload policies, the accelerate plugin, and a plain PEFT adapter saved from shards.

How FSDP2 meets hyclora (checked by ``tests/integrations/test_fsdp2.py``):

* ``fully_shard(layer)`` turns every parameter *below* ``layer`` into a ``DTensor`` shard, unshards
  them all in the layer's forward pre-hook, reshards after the forward (``reshard_after_forward``)
  and unshards again in a pre-backward hook that it registers on the layer's *output* tensors.
  hyclora's patched decoder layer reads its children's weights (q/k/v/o, gate/up/down, LoRA A/B,
  norms) inside one autograd Function without calling the children, so the decoder layer must be
  the unit: then the forward sees full weights, and the Function's backward, which runs after the
  output's gradient hook, sees them re-gathered. A child wrapped as its own unit (a size-based
  policy, a ``transformer_cls_names_to_wrap`` naming ``LlamaMLP`` ...) is never unsharded, because
  its forward is never called: :func:`install_shard_guards` raises :class:`FSDPShardError` at the
  forward and before the backward instead of letting a kernel read a shard.
* The calibration statistics (``hyclora_state`` buffers, :mod:`hyclora.models.state`) are buffers,
  which FSDP2 neither shards nor broadcasts: **each rank keeps its own**, calibrated on its own
  micro-batches, exactly as under DDP-free DeepSpeed ZeRO and in the per-rank
  ``hyclora_state_rank<r>.pt`` files of :mod:`hyclora.training.callbacks`. With
  ``iteration_threshold=0`` (statistics from each micro-batch) the ranks and a 1-process run
  quantise identically; with calibration windows each rank freezes ranges that cover its own
  batches, which is as valid as one process's and needs no collective on the hot path.
  (Checkpoints written through torch.distributed.checkpoint save such replicated buffers once, from
  rank 0; the per-rank files, loaded at ``on_train_begin`` after the Trainer's own load, restore
  each rank's statistics.)
* LoRA is the only trainable state: the adapter is gathered from its shards
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)``,
  rank 0 only, frozen base weights never gathered) and saved by PEFT as a plain adapter
  (:func:`save_lora_adapter`).
* Parameter CPU offload (``CPUOffloadPolicy``) pins host memory by default, which needs an
  accelerator: :func:`cpu_offload_policy` turns pinning off on a CPU-only machine (torch would
  raise "Cannot access accelerator device when none is available").
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from hyclora.models.peft_utils import is_sharded

from .deepspeed import hyclora_blocks
from .wrappers import unwrap_engine

_FSDP_FIX = (
    "Shard the decoder layer as one FSDP2 unit (fully_shard(layer), or accelerate's "
    "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP with fsdp_transformer_layer_cls_to_wrap naming the "
    "decoder layer class; hyclora.integrations.fsdp.shard_model does it for a plain loop) and do not "
    "wrap any module inside it (no SIZE_BASED_WRAP, no LlamaMLP / Linear units)."
)


class FSDPShardError(RuntimeError):
    """A hyclora block met a weight that FSDP2 still holds sharded."""


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------
def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6 or without distributed
        return None
    return FSDPModule


def is_fsdp_unit(module: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``module`` itself."""
    fsdp_module = _fsdp_module_type()
    return fsdp_module is not None and isinstance(module, fsdp_module)


def is_fsdp2(model: nn.Module) -> bool:
    """True when ``fully_shard`` has been applied to ``model`` or anything inside it."""
    fsdp_module = _fsdp_module_type()
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in unwrap_engine(model).modules())


def fsdp2_enabled(accelerator) -> bool:
    """True when an accelerate ``Accelerator`` (or its state) runs FSDP version 2."""
    state = getattr(accelerator, "state", accelerator)
    plugin = getattr(state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


# ----------------------------------------------------------------------------------------------
# the shard check
# ----------------------------------------------------------------------------------------------
def assert_unsharded(tensors: Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]], where: str) -> None:
    """Raise :class:`FSDPShardError` when one of ``tensors`` (``{name: tensor}`` or
    ``named_parameters()`` pairs) is an FSDP2 shard."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = [f"{name} (local {tuple(t.to_local().shape)} of {tuple(t.shape)})" for name, t in items if is_sharded(t)]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise FSDPShardError(
            f"hyclora: {where} received weights that FSDP2 still holds sharded: {shown}. The block reads its "
            f"children's weights directly, so a child's own FSDP unit is never unsharded. {_FSDP_FIX}"
        )


class _NewOutput(torch.autograd.Function):
    """Identity whose output is a new tensor (not a view; same storage): FSDP2 registers its
    pre-backward unshard on it, and warns about views, whose in-place ops drop that hook."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def stale_instance_forward(module: nn.Module) -> bool:
    """True when ``module`` has an instance-level ``forward`` bound to an ancestor class's forward
    that its class has since overridden (``fully_shard`` subclassing the layer after it was bound).
    From transformers 5.23 the decoder layer's checkpointing is that override, run only by the
    outermost class: such a forward runs the layer without checkpointing, silently. Wrappers are
    looked through along ``__wrapped__`` (``functools.wraps``, accelerate's hooks); a closure without
    it is not seen."""
    forward, function = module.__dict__.get("forward"), None
    for _ in range(8):  # a few wrappers deep at most; a cycle must not hang the forward
        function = getattr(forward, "__func__", None)
        if function is not None or forward is None:
            break
        forward = getattr(forward, "__wrapped__", None)
    cls = type(module)
    return function is not None and cls.forward is not function \
        and any(c.__dict__.get("forward") is function for c in cls.__mro__[1:])


def _check_before_forward(module: nn.Module, args) -> None:
    assert_unsharded(module.named_parameters(), f"{type(module).__name__}.forward")
    if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled() \
            and stale_instance_forward(module):
        raise RuntimeError(
            f"hyclora: {type(module).__name__} has an instance-level forward ({module.__dict__['forward']!r}) bound "
            "before fully_shard subclassed the layer; it skips the class forward, where transformers >= 5.23 "
            "checkpoints, so activation checkpointing would silently not run. Install that wrapper after "
            "fully_shard / accelerator.prepare, or as module hooks (register_forward_pre_hook / "
            "register_forward_hook) instead of a forward."
        )


def _check_before_backward(module: nn.Module, args, out):
    first = out[0] if isinstance(out, (tuple, list)) else out
    if not (isinstance(first, torch.Tensor) and first.requires_grad):
        return None
    name = type(module).__name__

    def check_before_backward(grad):
        assert_unsharded(module.named_parameters(), f"{name} backward")
        return grad

    # FSDP2's pre-backward unshard goes on the tensor the module returns: on `returned` when its
    # post-forward hook runs after this one, else on `first` before this check (tensor hooks run in
    # registration order). Either way the unshard precedes the check.
    first.register_hook(check_before_backward)
    returned = _NewOutput.apply(first)
    if isinstance(out, tuple):
        return (returned,) + tuple(out[1:])
    if isinstance(out, list):
        return [returned] + list(out[1:])
    return returned


class ShardGuardHandle:
    """Returned by :func:`install_shard_guards`; ``remove()`` removes the guards' hooks."""

    def __init__(self, modules: List[nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            for handle in module.__dict__.pop("_hyclora_shard_guard", ()):
                handle.remove()


def install_shard_guards(model: nn.Module, modules: Optional[Sequence[nn.Module]] = None) -> ShardGuardHandle:
    """Check at every forward and before every backward of ``modules`` (default: the hyclora
    blocks, :func:`hyclora.integrations.deepspeed.hyclora_blocks`) that no parameter below them is
    an FSDP2 shard; raise :class:`FSDPShardError` naming the fix otherwise. Idempotent.

    The checks are module hooks, not an instance-level ``forward``: from transformers 5.23 the
    decoder layer's checkpointing lives in its class ``forward`` and runs only in the outermost
    class's wrapper; an instance ``forward`` bound before ``fully_shard`` subclasses the layer is
    not the outermost one, so checkpointing would silently stop (FSDP2 parity test, ``f_ii_ckpt``).
    FSDP2 prepends its unshard pre-hook, so the forward check sees gathered weights either way."""
    targets = list(modules) if modules is not None else hyclora_blocks(model)
    installed = []
    for module in targets:
        if "_hyclora_shard_guard" in module.__dict__:
            continue
        module.__dict__["_hyclora_shard_guard"] = (
            module.register_forward_pre_hook(_check_before_forward),
            module.register_forward_hook(_check_before_backward),
        )
        installed.append(module)
    return ShardGuardHandle(installed)


# ----------------------------------------------------------------------------------------------
# the wrap plan
# ----------------------------------------------------------------------------------------------
def layer_class_names(model: nn.Module) -> List[str]:
    """The class names of the hyclora blocks (else the decoder layers): the value for accelerate's
    ``fsdp_transformer_layer_cls_to_wrap``. hyclora's patched class keeps the original name, so the
    name is the same before and after ``apply_hyclora``."""
    blocks = hyclora_blocks(model)
    if not blocks:
        raise ValueError(
            f"No decoder layers found in {type(unwrap_engine(model)).__name__}: FSDP2 needs the layer "
            "class to shard by; pass the class names yourself."
        )
    return list(dict.fromkeys(type(m).__name__ for m in blocks))


def check_wrap_plan(model: nn.Module, class_names: Optional[Sequence[str]]) -> None:
    """Refuse a transformer-based wrap plan that would make a module *inside* a hyclora block its
    own FSDP2 unit (its weights would stay sharded when the block reads them)."""
    if not class_names:
        return
    names = set(class_names)
    for block in hyclora_blocks(model):
        for sub_name, sub in block.named_modules():
            if sub_name and type(sub).__name__ in names:
                raise ValueError(
                    f"fsdp_transformer_layer_cls_to_wrap names {type(sub).__name__}, which sits inside the hyclora "
                    f"block {type(block).__name__} ({sub_name}): wrap {layer_class_names(model)} instead. {_FSDP_FIX}"
                )


# ----------------------------------------------------------------------------------------------
# policies
# ----------------------------------------------------------------------------------------------
def mixed_precision_policy(param_dtype: torch.dtype = torch.bfloat16, reduce_dtype: torch.dtype = torch.float32):
    """``MixedPrecisionPolicy`` computing in ``param_dtype`` and reducing gradients in
    ``reduce_dtype`` (fp32 by default: LoRA gradients are small, their all-reduce costs little)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def cpu_offload_policy(pin_memory: Optional[bool] = None):
    """``CPUOffloadPolicy`` (sharded parameters, gradients and optimizer step on the host);
    ``pin_memory`` defaults to whether CUDA is available (pinning needs an accelerator)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return CPUOffloadPolicy(pin_memory=bool(pin_memory))


def _default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (torch.distributed.get_world_size(),))


def shard_model(
    model: nn.Module,
    *,
    mesh=None,
    mp_policy=None,
    offload_policy=None,
    reshard_after_forward: bool = True,
    guard: bool = True,
) -> nn.Module:
    """``fully_shard`` every hyclora block (or decoder layer), then the whole model (embeddings,
    final norm and LM head form the root unit), for a plain training loop. Returns ``model`` (now
    an ``FSDPModule``). Needs ``torch.distributed`` initialised; ``mesh`` defaults to a 1-D mesh
    over all ranks on CUDA, else CPU (gloo). ``guard``: :func:`install_shard_guards`.

    Optimizers must be built *after* this call, from ``model.parameters()`` (the shards)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("shard_model needs torch.distributed initialised (torchrun / init_process_group).")
    blocks = hyclora_blocks(model)
    if not blocks:
        raise ValueError(f"No decoder layers found in {type(model).__name__}: nothing to shard by layer.")
    kwargs = dict(mesh=mesh if mesh is not None else _default_mesh(),
                  mp_policy=mp_policy or MixedPrecisionPolicy(),
                  offload_policy=offload_policy or OffloadPolicy())
    if guard:
        install_shard_guards(model, blocks)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


# ----------------------------------------------------------------------------------------------
# accelerate
# ----------------------------------------------------------------------------------------------
def fsdp2_plugin(model: Optional[nn.Module] = None, *, cpu_offload: bool = False,
                 mixed_precision: Optional[torch.dtype] = None, **plugin_kwargs: Any):
    """``accelerate.FullyShardedDataParallelPlugin`` with hyclora's FSDP2 settings: version 2,
    transformer-based wrap of the decoder layer classes (of ``model``, else the model's
    ``_no_split_modules``), reshard after forward, sharded checkpoints, no RAM-efficient loading,
    no FSDP activation checkpointing (use hyclora's), parameter CPU offload when ``cpu_offload``,
    and ``mixed_precision`` params with fp32 gradient reduction when given."""
    from accelerate import FullyShardedDataParallelPlugin

    kwargs: Dict[str, Any] = dict(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False, activation_checkpointing=False,
    )
    if model is not None:
        kwargs["transformer_cls_names_to_wrap"] = layer_class_names(model)
    if cpu_offload:
        kwargs["cpu_offload"] = cpu_offload_policy()
    if mixed_precision is not None:
        kwargs["mixed_precision_policy"] = mixed_precision_policy(mixed_precision)
    kwargs.update(plugin_kwargs)
    return FullyShardedDataParallelPlugin(**kwargs)


def prepare_fsdp2(accelerator, model: nn.Module, *, guard: bool = True, fp32_reduce: bool = True) -> nn.Module:
    """Get a hyclora model ready for ``accelerator.prepare`` under an FSDP2 plugin (Trainer: call it
    on ``trainer.accelerator`` before ``train()``). A no-op without FSDP2. It

    1. refuses plans that would shard inside a hyclora block (size-based wrap; a wrapped class
       inside the block) or FSDP's own activation checkpointing (which would wrap hyclora's
       layers in ``CheckpointWrapper``; use :mod:`hyclora.integrations.checkpointing`);
    2. fills ``transformer_cls_names_to_wrap`` from the model when the config leaves it empty
       (a wrapper such as ``CausalLMChunkedLoss`` has no ``_no_split_modules`` to fall back on);
    3. ``fp32_reduce``: keeps the plugin's compute dtype but reduces gradients in fp32 (accelerate's
       ``mixed_precision: bf16`` reduces in bf16);
    4. turns off pinned memory for parameter CPU offload on a machine without CUDA;
    5. ``guard``: installs :func:`install_shard_guards`.
    """
    if not fsdp2_enabled(accelerator):
        return model
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.activation_checkpointing:
        raise ValueError(
            "fsdp_activation_checkpointing wraps hyclora's decoder layers in torch's CheckpointWrapper, which "
            "hyclora does not support: set fsdp_activation_checkpointing: false and use hyclora's checkpointing "
            "(--activation_checkpointing true / --checkpoint_every_k / --checkpoint_boundary_bits, or "
            "hyclora.integrations.checkpointing.enable_activation_checkpointing)."
        )
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is size_based_auto_wrap_policy:
        raise ValueError(f"fsdp_auto_wrap_policy: SIZE_BASED_WRAP can shard modules inside a hyclora layer. {_FSDP_FIX}")
    if policy is transformer_auto_wrap_policy:
        if not plugin.transformer_cls_names_to_wrap:
            plugin.transformer_cls_names_to_wrap = layer_class_names(model)
        check_wrap_plan(model, plugin.transformer_cls_names_to_wrap)
    mp = plugin.mixed_precision_policy
    if fp32_reduce and mp is not None and mp.param_dtype not in (None, torch.float32) \
            and mp.reduce_dtype != torch.float32:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=mp.param_dtype, reduce_dtype=torch.float32, output_dtype=mp.output_dtype,
            cast_forward_inputs=mp.cast_forward_inputs)
    offload = plugin.cpu_offload
    if getattr(offload, "pin_memory", False) and not torch.cuda.is_available():
        plugin.cpu_offload = cpu_offload_policy(pin_memory=False)
    if guard:
        install_shard_guards(model)
    return model


# ----------------------------------------------------------------------------------------------
# saving the adapter
# ----------------------------------------------------------------------------------------------
def gather_trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Full (unsharded) trainable parameters of an FSDP2 model, on CPU, on rank 0 (an empty dict
    on the other ranks). A collective: every rank must call it. Frozen base weights are not
    gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    # buffers (hyclora_state statistics, rotary tables) are rank-local and not the adapter
    buffer_names = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k not in buffer_names}


def save_lora_adapter(
    model: nn.Module,
    output_dir: Union[str, os.PathLike],
    *,
    is_main_process: Optional[bool] = None,
    **save_kwargs: Any,
) -> None:
    """Save a PEFT adapter from a model that may be sharded by FSDP2 as a plain PEFT adapter
    (``adapter_model.safetensors`` + ``adapter_config.json``, loadable by
    ``PeftModel.from_pretrained`` without FSDP). Under FSDP2 the LoRA shards are gathered (a
    collective: **every rank must call this**) and rank 0 writes. ``save_kwargs`` go to PEFT's
    ``save_pretrained``. Without FSDP2 this is a plain ``save_pretrained`` on the main process."""
    if not hasattr(model, "peft_config"):
        raise TypeError(
            f"save_lora_adapter needs a PEFT model (got {type(model).__name__}): wrap the model with "
            "peft.get_peft_model first."
        )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if is_main_process is None:
        is_main_process = not distributed or torch.distributed.get_rank() == 0
    save_kwargs.setdefault("save_embedding_layers", False)
    if is_fsdp2(model):
        state = gather_trainable_state_dict(model)
        if is_main_process:
            model.save_pretrained(str(output_dir), state_dict=state, **save_kwargs)
    elif is_main_process:
        model.save_pretrained(str(output_dir), **save_kwargs)
    if distributed:
        torch.distributed.barrier()


__all__ = [
    "FSDPShardError",
    "ShardGuardHandle",
    "assert_unsharded",
    "check_wrap_plan",
    "cpu_offload_policy",
    "fsdp2_enabled",
    "fsdp2_plugin",
    "gather_trainable_state_dict",
    "install_shard_guards",
    "is_fsdp2",
    "is_fsdp_unit",
    "is_sharded",
    "layer_class_names",
    "mixed_precision_policy",
    "prepare_fsdp2",
    "save_lora_adapter",
    "shard_model",
    "stale_instance_forward",
]
