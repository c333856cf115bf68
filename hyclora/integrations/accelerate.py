"""accelerate integration: a DeepSpeed-backed ``Accelerator`` from one of our JSON configs, the
ZeRO-3 preparation hyclora models need, and the CPU (gloo) set-up used by tests and CI.

Facts this relies on (``../shared/reference/peers-and-integration.md`` C.3):

* With a DeepSpeed JSON, precision, ZeRO stage, clipping and accumulation live in the JSON; "auto"
  values are filled by ``accelerator.prepare`` from the model, dataloader and optimizer.
* ``DeepSpeedPlugin`` has no activation-checkpointing knob; use
  :func:`hyclora.integrations.checkpointing.enable_activation_checkpointing` (``backend="deepspeed"``)
  after the Accelerator exists, so ``deepspeed.checkpointing.configure`` can run.
* On a machine without GPUs, accelerate only enables DeepSpeed when the process group backend is
  given explicitly (``InitProcessGroupKwargs(backend="gloo")``); otherwise it silently falls back to
  one process. :func:`make_accelerator` does that for you.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from .deepspeed import ConfigLike, load_config, prepare_zero3, zero_stage


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
    **accelerator_kwargs: Any,
):
    """An ``accelerate.Accelerator``, DeepSpeed-backed when ``ds_config`` is given.

    Adds ``InitProcessGroupKwargs(backend="gloo")`` when launched with several processes on a
    machine without CUDA (CI), which accelerate needs to run DeepSpeed there at all.
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
    return Accelerator(
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=handlers,
        **accelerator_kwargs,
    )


def prepare_model(accelerator, model: nn.Module, *, guard: bool = True) -> nn.Module:
    """Get a hyclora model ready for ``accelerator.prepare``: under a ZeRO-3 DeepSpeedPlugin the
    decoder layers become ZeRO-3 leaf modules (plus the gather check). Returns the model."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and zero_stage(plugin.deepspeed_config) == 3:
        prepare_zero3(model, guard=guard)
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
]
