"""accelerate integration: a DeepSpeed- or FSDP2-backed ``Accelerator``, the ZeRO-3 / FSDP2
preparation hyclora models need, and the CPU (gloo) set-up used by tests and CI.

Facts this relies on (``../shared/reference/peers-and-integration.md`` C.3):

* With a DeepSpeed JSON, precision, ZeRO stage, clipping and accumulation live in the JSON; "auto"
  values are filled by ``accelerator.prepare`` from the model, dataloader and optimizer.
* ``DeepSpeedPlugin`` has no activation-checkpointing knob; use
  :func:`hyclora.integrations.checkpointing.enable_activation_checkpointing` (``backend="deepspeed"``)
  after the Accelerator exists, so ``deepspeed.checkpointing.configure`` can run.
* On a machine without GPUs, accelerate only enables DeepSpeed when the process group backend is
  given explicitly (``InitProcessGroupKwargs(backend="gloo")``); otherwise it silently falls back to
  one process. :func:`make_accelerator` does that for you.
* accelerate only turns an FSDP plugin on for GPU-like process groups (``MULTI_GPU`` ...); on
  CPU it runs plain DDP and ignores the plugin. :func:`use_fsdp_on_cpu` switches the state to
  FSDP for tests and CI (``fully_shard`` itself works on CPU with gloo).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from .deepspeed import ConfigLike, load_config, prepare_zero3, zero_stage
from .fsdp import prepare_fsdp2


def _distributed_env() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1


def cpu_backend_needed() -> bool:
    """True when accelerate would miss the distributed run: launched with several processes on
    a machine without CUDA."""
    return _distributed_env() and not torch.cuda.is_available()


def deepspeed_plugin(config: ConfigLike, **plugin_kwargs: Any):
    """``accelerate.DeepSpeedPlugin`` around a DeepSpeed JSON (path, dict, or shipped name such
    as ``"zero3"``). Extra keyword arguments go to the plugin (e.g. ``zero3_init_flag=True``); the
    values the JSON owns (stage, clipping, accumulation, precision) must stay in the JSON, since
    accelerate raises when both set them."""
    from accelerate import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=load_config(config), **plugin_kwargs)


def make_accelerator(
    ds_config: Optional[ConfigLike] = None,
    *,
    gradient_accumulation_steps: int = 1,
    plugin_kwargs: Optional[Dict[str, Any]] = None,
    fsdp_plugin=None,
    **accelerator_kwargs: Any,
):
    """An ``accelerate.Accelerator``, DeepSpeed-backed when ``ds_config`` is given, FSDP-backed
    when ``fsdp_plugin`` is (e.g. :func:`hyclora.integrations.fsdp.fsdp2_plugin`).

    Adds ``InitProcessGroupKwargs(backend="gloo")`` when launched with several processes on a
    machine without CUDA (CI), which accelerate needs to run DeepSpeed there at all; FSDP there is
    switched on with :func:`use_fsdp_on_cpu`.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = list(accelerator_kwargs.pop("kwargs_handlers", []) or [])
    if cpu_backend_needed() and not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    plugin = None
    if ds_config is not None:
        plugin = deepspeed_plugin(ds_config, **(plugin_kwargs or {}))
    elif plugin_kwargs:
        raise ValueError("plugin_kwargs were given without ds_config: pass ds_config= too.")
    if plugin is not None and fsdp_plugin is not None:
        raise ValueError("ds_config and fsdp_plugin were both given: DeepSpeed and FSDP exclude each other.")
    if fsdp_plugin is not None and cpu_backend_needed():
        # accelerate's CPU process group (MULTI_CPU, gloo), switched to FSDP below
        accelerator_kwargs.setdefault("cpu", True)
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        fsdp_plugin=fsdp_plugin,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=handlers,
        **accelerator_kwargs,
    )
    if fsdp_plugin is not None:
        use_fsdp_on_cpu(accelerator, fsdp_plugin)
    return accelerator


def use_fsdp_on_cpu(accelerator_or_trainer, plugin=None) -> bool:
    """Run the FSDP plugin that accelerate ignored on a CPU process group (tests, CI, smoke runs).

    accelerate selects FSDP only for GPU-like distributed types and falls back to DDP
    (``MULTI_CPU``) on gloo, silently dropping the plugin. This puts the plugin back into the
    accelerator state (``distributed_type=FSDP``; ``plugin``, else the Trainer's ``fsdp_config``, else
    one built from the environment as accelerate would) and, given a ``transformers.Trainer``, sets its
    ``is_fsdp_enabled``; call it right after building the Accelerator / Trainer, before
    ``prepare`` / ``train``. Returns True when it switched; does nothing (False) with CUDA, in one
    process without a process group, or when FSDP is already on.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    trainer = accelerator_or_trainer if hasattr(accelerator_or_trainer, "accelerator") else None
    accelerator = trainer.accelerator if trainer is not None else accelerator_or_trainer
    state = accelerator.state
    if torch.cuda.is_available():
        return False
    if state.distributed_type == DistributedType.FSDP and getattr(state, "fsdp_plugin", None) is not None:
        return False  # a second Accelerator in the process: the shared state may lack the plugin
    if state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        raise RuntimeError(
            f"use_fsdp_on_cpu: accelerate set up {state.distributed_type}, not a CPU process group; launch "
            "with several processes (torchrun / accelerate launch) or initialise gloo first."
        )
    plugin = plugin if plugin is not None else getattr(state, "fsdp_plugin", None)
    if plugin is None:
        if trainer is not None and trainer.args.fsdp_plugin_args is not None:
            plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
        elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            plugin = FullyShardedDataParallelPlugin()
    if plugin is None:
        raise ValueError("use_fsdp_on_cpu: no FSDP plugin was given (fsdp_plugin=, --fsdp, or an FSDP accelerate config).")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # every later AcceleratorState() copies PartialState's fields over its own: switch both
    PartialState().distributed_type = DistributedType.FSDP
    if trainer is not None:
        trainer.is_fsdp_enabled = True
    return True


def prepare_model(accelerator, model: nn.Module, *, guard: bool = True) -> nn.Module:
    """Get a hyclora model ready for ``accelerator.prepare``: under a ZeRO-3 DeepSpeedPlugin the
    decoder layers become ZeRO-3 leaf modules (plus the gather check); under an FSDP2 plugin the
    wrap plan is checked and the shard check installed (:func:`hyclora.integrations.fsdp.prepare_fsdp2`).
    Returns the model."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and zero_stage(plugin.deepspeed_config) == 3:
        prepare_zero3(model, guard=guard)
    prepare_fsdp2(accelerator, model, guard=guard)
    return model


def trainer_cpu_deepspeed_kwargs() -> Dict[str, Any]:
    """For HF Trainer + DeepSpeed with several processes on CPU (tests, CI): set up accelerate's
    process state with gloo and return the ``TrainingArguments`` keyword arguments that make the
    Trainer reuse it. Returns ``{}`` when nothing is needed (GPUs present, or one process).

    Why: ``TrainingArguments(deepspeed=...)`` never passes ``ddp_backend`` to accelerate, and
    without CUDA accelerate then believes it runs one process while DeepSpeed sees them all.
    """
    if not cpu_backend_needed():
        return {}
    from accelerate import PartialState

    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend="gloo")
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    from accelerate.utils import DistributedType

    if state.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError(
            f"accelerate set up {state.distributed_type} instead of DeepSpeed; another PartialState "
            "was created first. Call trainer_cpu_deepspeed_kwargs() before anything else builds one."
        )
    return {"accelerator_config": {"use_configured_state": True}}


__all__ = [
    "cpu_backend_needed",
    "deepspeed_plugin",
    "make_accelerator",
    "prepare_model",
    "trainer_cpu_deepspeed_kwargs",
    "use_fsdp_on_cpu",
]
