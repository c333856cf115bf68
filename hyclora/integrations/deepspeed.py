"""DeepSpeed integration: configs with "auto", ZeRO-3 gathering for fused blocks, adapter saving,
and DeepSpeed activation checkpointing configured from the JSON block.

Why this module exists (see ``../shared/reference/peers-and-integration.md`` C.1/C.2):

* ZeRO-1/2 keep every weight replicated, so hyclora's fused blocks need nothing special there.
* ZeRO-3 partitions *every* parameter, the frozen base weights included. Its hooks gather a
  module's own parameters right before that module's ``forward`` and release them after. hyclora's
  compressed decoder layers read the weights of their children (q/k/v/o, gate/up/down, LoRA A/B,
  norm weights) inside one autograd Function without calling those children, so no hook would fire
  and the Function would see empty 0-element shards. The fix is to make the decoder layer a ZeRO-3
  *leaf module*: ZeRO-3 then gathers all descendant parameters in the layer's pre-forward and
  pre-backward hooks (:func:`register_zero3_leaf_modules`). :func:`install_gather_guards` turns a
  forgotten registration into a clear error naming ZeRO-3 instead of a shape error deep in a kernel.
* The ``activation_checkpointing`` block of a DeepSpeed JSON does nothing under HF Trainer or
  accelerate: nobody calls ``deepspeed.checkpointing.configure``. :func:`configure_activation_checkpointing`
  does, and :mod:`hyclora.integrations.checkpointing` routes decoder layers through
  ``deepspeed.checkpointing.checkpoint``.

``deepspeed`` itself is imported lazily, so this module imports (and its pure helpers work) on a
machine without DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from hyclora.models.peft_utils import is_zero3_param

from .wrappers import hf_model, unwrap_engine

ConfigLike = Union[str, os.PathLike, Mapping[str, Any]]

#: The ``ds_configs/`` folder shipped with the repository (absent in a wheel install).
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

_ZERO3_FIX = (
    "Call hyclora.integrations.deepspeed.prepare_zero3(model) (it registers the hyclora decoder "
    "layers as ZeRO-3 leaf modules) after building the model and before deepspeed.initialize / "
    "Trainer.train / accelerator.prepare, or list the layer class under "
    "zero_optimization.leaf_module.classes in the DeepSpeed config."
)


class ZeRO3GatherError(RuntimeError):
    """A weight reached a hyclora block while ZeRO-3 still held it partitioned."""


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def load_config(config: ConfigLike) -> Dict[str, Any]:
    """Return a private deep copy of a DeepSpeed config given as a dict, a JSON path, or the
    name of a shipped config (``"zero3"`` resolves to ``ds_configs/zero3.json``)."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    if not path.exists() and not path.suffix:
        shipped = DS_CONFIG_DIR / f"{path.name}.json"
        if shipped.exists():
            path = shipped
    if not path.exists():
        names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")) if DS_CONFIG_DIR.exists() else []
        raise FileNotFoundError(
            f"DeepSpeed config {str(config)!r} not found: pass a dict, a path to a JSON file, or one "
            f"of the shipped names {names}."
        )
    with open(path, "r", encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from err


def _get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def _set_if_auto(config: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    if node.get(keys[-1]) == "auto":
        node[keys[-1]] = value


def find_auto(config: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Dotted names of every value still equal to ``"auto"``."""
    found = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if value == "auto":
            found.append(name)
        elif isinstance(value, Mapping):
            found.extend(find_auto(value, prefix=name + "."))
    return found


def zero_stage(config: ConfigLike) -> int:
    """ZeRO stage of a config (0 when the config has no ``zero_optimization`` block)."""
    stage = _get(load_config(config), "zero_optimization.stage", 0)
    if stage == "auto":
        raise ValueError("zero_optimization.stage='auto' is not supported: write 0, 1, 2 or 3.")
    return int(stage)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def fill_auto(
    config: ConfigLike,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int = 1,
    world_size: Optional[int] = None,
    hidden_size: Optional[int] = None,
    model: Optional[nn.Module] = None,
    gradient_clipping: float = 1.0,
    bf16: bool = False,
    fp16: bool = False,
    learning_rate: Optional[float] = None,
    weight_decay: float = 0.0,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Dict[str, Any]:
    """Resolve ``"auto"`` the way HF Trainer / accelerate do, for a plain ``deepspeed.initialize``
    loop (DeepSpeed itself rejects ``"auto"``). Values that are not ``"auto"`` are kept; a value
    that stays ``"auto"`` raises with its name.

    The hidden-size rules are HF's: ``reduce_bucket_size = h*h``,
    ``stage3_prefetch_bucket_size = 0.9*h*h``, ``stage3_param_persistence_threshold = 10*h``.
    """
    cfg = load_config(config)
    if micro_batch_size < 1 or gradient_accumulation_steps < 1:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} and gradient_accumulation_steps="
            f"{gradient_accumulation_steps} must both be >= 1."
        )
    if bf16 and fp16:
        raise ValueError("bf16=True and fp16=True were both given: pick one.")
    world = _world_size() if world_size is None else int(world_size)
    _set_if_auto(cfg, "train_micro_batch_size_per_gpu", micro_batch_size)
    _set_if_auto(cfg, "gradient_accumulation_steps", gradient_accumulation_steps)
    _set_if_auto(cfg, "train_batch_size", micro_batch_size * gradient_accumulation_steps * world)
    _set_if_auto(cfg, "gradient_clipping", gradient_clipping)
    _set_if_auto(cfg, "bf16.enabled", bool(bf16))
    _set_if_auto(cfg, "fp16.enabled", bool(fp16))
    if learning_rate is not None:
        _set_if_auto(cfg, "optimizer.params.lr", learning_rate)
    _set_if_auto(cfg, "optimizer.params.weight_decay", weight_decay)
    _set_if_auto(cfg, "optimizer.params.betas", list(betas))
    _set_if_auto(cfg, "optimizer.params.eps", eps)

    hidden_keys = [
        "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
    ]
    if any(_get(cfg, key) == "auto" for key in hidden_keys):
        if hidden_size is None and model is not None:
            hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden_size is None:
            raise ValueError(
                "The DeepSpeed config sets bucket sizes to 'auto', which need the model's hidden "
                "size: pass hidden_size= or model= to fill_auto, or write integers in the config."
            )
        _set_if_auto(cfg, hidden_keys[0], hidden_size * hidden_size)
        _set_if_auto(cfg, hidden_keys[1], int(0.9 * hidden_size * hidden_size))
        _set_if_auto(cfg, hidden_keys[2], 10 * hidden_size)

    left = find_auto(cfg)
    if left:
        raise ValueError(
            f"DeepSpeed config still has 'auto' for {left} after fill_auto: pass the matching "
            "argument (e.g. learning_rate=) or write the value into the config."
        )
    return cfg


# ----------------------------------------------------------------------------------------------
# ZeRO-3 detection and the gather check
# ----------------------------------------------------------------------------------------------
def is_partitioned(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is a ZeRO-3 parameter whose data is not gathered right now.

    Duck-typed on purpose (``ds_status`` / ``ds_numel`` attributes) so it costs nothing and needs no
    DeepSpeed import: lower layers may copy this test verbatim.
    """
    status = getattr(tensor, "ds_status", None)
    if status is not None and getattr(status, "name", str(status)) == "NOT_AVAILABLE":
        return True
    # A ZeRO-3 placeholder is a 0-element tensor standing for ds_numel elements.
    return tensor.numel() == 0 and getattr(tensor, "ds_numel", 1) != 0


def assert_gathered(
    tensors: Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]], Iterable[torch.Tensor]],
    where: str,
) -> None:
    """Raise :class:`ZeRO3GatherError` when one of ``tensors`` is an un-gathered ZeRO-3 shard.

    ``tensors``: a ``{name: tensor}`` mapping, ``(name, tensor)`` pairs (``named_parameters()``) or
    bare tensors. ``where`` names the block for the message.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = []
    for index, item in enumerate(items):
        name, tensor = item if isinstance(item, tuple) else (f"#{index}", item)
        if tensor is not None and is_partitioned(tensor):
            status = getattr(getattr(tensor, "ds_status", None), "name", None)
            bad.append(
                f"{name} (numel={tensor.numel()}, ds_numel={getattr(tensor, 'ds_numel', '?')}, "
                f"ds_status={status})"
            )
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ZeRO3GatherError(
            f"hyclora: {where} received weights that DeepSpeed ZeRO-3 has not gathered: {shown}. "
            f"The block reads its children's weights directly, so ZeRO-3's per-module hooks never "
            f"fire for them. {_ZERO3_FIX}"
        )


def is_zero3(obj: Union[None, nn.Module, ConfigLike] = None) -> bool:
    """Is ZeRO-3 in use?

    * a DeepSpeed config (dict / path): its stage is 3;
    * a module (or DeepSpeed engine): some parameter carries ZeRO-3's ``ds_id``;
    * nothing: HF's global DeepSpeed config (set by ``TrainingArguments(deepspeed=...)``) says 3.
    """
    if obj is None:
        try:
            from transformers.integrations import is_deepspeed_zero3_enabled
        except ImportError:
            return False
        return bool(is_deepspeed_zero3_enabled())
    if isinstance(obj, nn.Module):
        return any(is_zero3_param(p) for p in obj.parameters())
    return zero_stage(obj) == 3


# ----------------------------------------------------------------------------------------------
# leaf modules and guards
# ----------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """transformers' ``GradientCheckpointingLayer`` instances: the decoder (or encoder) layers of
    every supported model, in order. These are what activation checkpointing wraps."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.50 is not supported by hyclora
        return []
    return [m for m in unwrap_engine(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def hyclora_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks whose forward reads their children's weights directly: the layers
    :func:`hyclora.models.apply_hyclora` patched (``_hyclora_patch``), or modules flagged
    ``_hyclora_block = True``; else (nothing patched yet) the decoder layers."""
    flagged = [
        m for m in unwrap_engine(model).modules()
        if "_hyclora_patch" in m.__dict__ or getattr(m, "_hyclora_block", False)
    ]
    return flagged or decoder_layers(model)


def _hooks_installed_below(module: nn.Module) -> bool:
    # ZeRO-3 sets ds_id on every module it hooks; a hooked child means initialize already ran
    # with the module treated as an ordinary (non-leaf) module.
    return any(hasattr(child, "ds_id") for child in module.modules() if child is not module)


def register_zero3_leaf_modules(
    model: nn.Module, classes: Optional[Sequence[Union[type, str]]] = None
) -> List[nn.Module]:
    """Flag the classes of :func:`hyclora_blocks` (or the given classes) as ZeRO-3 leaf modules.

    Must run before ZeRO-3 installs its hooks (``deepspeed.initialize``, ``accelerator.prepare``,
    ``Trainer.train``); registering later would silently do nothing, so it raises instead.
    Harmless without DeepSpeed ZeRO-3 (the flag is just an attribute).
    """
    from deepspeed.utils import set_z3_leaf_modules

    model = unwrap_engine(model)
    if classes is None:
        layers = hyclora_blocks(model)
        if not layers:
            raise ValueError(
                f"No decoder layers found in {type(model).__name__}: pass classes=[...] with the "
                "block classes whose forward reads their children's weights."
            )
        classes = list(dict.fromkeys(type(m) for m in layers))
    leaves = set_z3_leaf_modules(model, list(classes))
    late = [type(m).__name__ for m in leaves if _hooks_installed_below(m)]
    if late:
        raise RuntimeError(
            f"ZeRO-3 hooks are already installed inside {late[0]}: register_zero3_leaf_modules / "
            "prepare_zero3 must run before deepspeed.initialize (Trainer.train, accelerator.prepare)."
        )
    return leaves


def leaf_module_config(model: nn.Module) -> Dict[str, List[str]]:
    """The ``zero_optimization.leaf_module`` block naming the model's decoder-layer classes, for
    users who prefer putting it in the JSON (DeepSpeed applies it at ``initialize``). The bare class
    name, which DeepSpeed also matches: it is the same for a layer before and after
    ``apply_hyclora`` (whose subclass lives in another module)."""
    classes = dict.fromkeys(type(m).__name__ for m in hyclora_blocks(model))
    return {"classes": list(classes)}


def _guarded_forward(module: nn.Module, forward):
    where = f"{type(module).__name__}.forward"

    def forward_with_check(*args, **kwargs):
        assert_gathered(module.named_parameters(), where)
        out = forward(*args, **kwargs)
        # Backward check: a hook on the output *as the block returns it* runs after ZeRO-3's
        # pre-backward gather (which wraps the output later, in a forward hook) and before the
        # block's own backward reads the weights again.
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, torch.Tensor) and first.requires_grad:
            def check_before_backward(grad):
                assert_gathered(module.named_parameters(), f"{type(module).__name__} backward")
                return grad

            first.register_hook(check_before_backward)
        return out

    return forward_with_check


class GuardHandle:
    """Returned by :func:`install_gather_guards`; ``remove()`` restores the original forwards."""

    def __init__(self, modules: List[nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            original, had_instance_forward = module.__dict__.pop("_hyclora_gather_guard", (None, False))
            module.__dict__.pop("forward", None)
            if had_instance_forward and original is not None:
                module.forward = original


def install_gather_guards(model: nn.Module, modules: Optional[Sequence[nn.Module]] = None) -> GuardHandle:
    """Check, at every forward and before every backward of ``modules`` (default:
    :func:`hyclora_blocks`), that no parameter below them is an un-gathered ZeRO-3 shard; raise
    :class:`ZeRO3GatherError` naming ZeRO-3 otherwise.

    Install it on blocks whose forward reads descendant weights directly (hyclora's layers). On an
    unmodified HF layer under ZeRO-3 *without* leaf registration it would fire, correctly: there the
    children gather lazily when called, which is exactly what a fused block cannot rely on.
    """
    targets = list(modules) if modules is not None else hyclora_blocks(model)
    installed = []
    for module in targets:
        if "_hyclora_gather_guard" in module.__dict__:
            continue
        had_instance_forward = "forward" in module.__dict__
        original = module.__dict__["forward"] if had_instance_forward else None
        module.__dict__["_hyclora_gather_guard"] = (original, had_instance_forward)
        module.forward = _guarded_forward(module, module.forward)
        installed.append(module)
    return GuardHandle(installed)


def prepare_zero3(model: nn.Module, *, guard: bool = True, classes=None) -> List[nn.Module]:
    """Everything a hyclora model needs before ZeRO-3 wraps it. Returns the leaf modules.

    1. Registers the decoder layers (or ``classes``) as ZeRO-3 leaf modules.
    2. Switches on input gradients (``enable_input_require_grads``). ZeRO-3 reduces a leaf's
       gradients from a *full backward hook* on the leaf, and PyTorch fires such a hook as soon as
       the output gradient arrives when no input of the module requires grad -- the first decoder
       layer under LoRA, fed by frozen embeddings. DeepSpeed then reduces (and zero-fills) that
       layer's LoRA gradients before they are computed and the real ones hit a partitioned
       parameter ("The size of tensor a (0) must match ..."). With input gradients on, the hook
       fires after the layer's backward, as intended. The cost is one hidden-state-sized gradient.
    3. ``guard=True``: installs the gather check (:func:`install_gather_guards`).

    Harmless on ZeRO-1/2 and without DeepSpeed (the flag is an attribute, the check passes).
    """
    leaves = register_zero3_leaf_modules(model, classes)
    enable = getattr(hf_model(model), "enable_input_require_grads", None)
    if callable(enable):
        enable()
    if guard:
        install_gather_guards(model, leaves)
    return leaves


# ----------------------------------------------------------------------------------------------
# saving the adapter
# ----------------------------------------------------------------------------------------------
def _adapter_params(model: nn.Module) -> List[torch.nn.Parameter]:
    names = []
    for name, param in model.named_parameters():
        # Trainable params are the adapter; "lora_" catches frozen extra adapters too.
        if param.requires_grad or "lora_" in name or "modules_to_save" in name:
            names.append(param)
    return names


def save_lora_adapter(
    model: nn.Module,
    output_dir: Union[str, os.PathLike],
    *,
    is_main_process: Optional[bool] = None,
    **save_kwargs: Any,
) -> None:
    """Save a PEFT adapter from a model that may be under ZeRO-3, as a plain PEFT adapter.

    Under ZeRO-3 the LoRA weights are shards; they are gathered (a collective: **every rank must
    call this**) and rank 0 writes ``adapter_model.safetensors`` + ``adapter_config.json``, which
    ``PeftModel.from_pretrained`` loads without DeepSpeed. ``save_kwargs`` go to PEFT's
    ``save_pretrained`` (``save_embedding_layers`` defaults to False so PEFT does not look up the
    base model on the Hub).
    """
    model = unwrap_engine(model)
    if not hasattr(model, "peft_config"):
        raise TypeError(
            f"save_lora_adapter needs a PEFT model (got {type(model).__name__}): wrap the model "
            "with peft.get_peft_model first."
        )
    if is_main_process is None:
        is_main_process = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_rank() == 0
    save_kwargs.setdefault("save_embedding_layers", False)
    zero3 = is_zero3(model)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(_adapter_params(model), modifier_rank=None):
            if is_main_process:
                model.save_pretrained(str(output_dir), **save_kwargs)
    elif is_main_process:
        model.save_pretrained(str(output_dir), **save_kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# DeepSpeed activation checkpointing
# ----------------------------------------------------------------------------------------------
_AC_KEYS = {
    # JSON key -> deepspeed.checkpointing.configure() argument
    "partition_activations": "partition_activations",
    "contiguous_memory_optimization": "contiguous_checkpointing",
    "number_checkpoints": "num_checkpoints",
    "cpu_checkpointing": "checkpoint_in_cpu",
    "synchronize_checkpoint_boundary": "synchronize",
    "profile": "profile",
}


def activation_checkpointing_settings(config: Optional[ConfigLike] = None, **overrides: Any) -> Dict[str, Any]:
    """The JSON ``activation_checkpointing`` block (DeepSpeed's key names, defaults filled) with
    ``overrides`` applied. Unknown keys raise, listing the known ones."""
    block = dict(_get(load_config(config), "activation_checkpointing", {}) or {}) if config is not None else {}
    unknown = sorted(set(block) - set(_AC_KEYS))
    bad_over = sorted(set(overrides) - set(_AC_KEYS))
    if unknown or bad_over:
        raise ValueError(
            f"Unknown activation_checkpointing key(s) {unknown + bad_over}: expected a subset of "
            f"{sorted(_AC_KEYS)}."
        )
    settings = {key: False for key in _AC_KEYS}
    settings["number_checkpoints"] = None
    settings.update(block)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in settings.items():
        if key != "number_checkpoints" and not isinstance(value, bool):
            raise ValueError(f"activation_checkpointing.{key}={value!r} must be true or false.")
    n = settings["number_checkpoints"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"activation_checkpointing.number_checkpoints={n!r} must be a positive integer.")
    if settings["contiguous_memory_optimization"] and not settings["partition_activations"]:
        raise ValueError(
            "activation_checkpointing.contiguous_memory_optimization needs partition_activations=true "
            "(DeepSpeed only makes partitioned checkpoints contiguous)."
        )
    return settings


def configure_activation_checkpointing(
    config: Optional[ConfigLike] = None, *, mpu=None, **overrides: Any
) -> Dict[str, Any]:
    """Call ``deepspeed.checkpointing.configure`` from a DeepSpeed config's
    ``activation_checkpointing`` block (HF Trainer and accelerate never do). Returns the settings
    applied. Needs DeepSpeed's communication backend up (``deepspeed.init_distributed``, which
    ``TrainingArguments(deepspeed=...)``, accelerate and ``deepspeed.initialize`` all call).

    ``partition_activations`` only splits checkpoints across *model-parallel* ranks (``mpu``); with
    pure data parallelism there is nothing to split it over, so expect no memory change from it.
    """
    import deepspeed
    from deepspeed import comm as ds_comm

    settings = activation_checkpointing_settings(config, **overrides)
    if settings["contiguous_memory_optimization"] and settings["number_checkpoints"] is None:
        raise ValueError(
            "activation_checkpointing.contiguous_memory_optimization needs number_checkpoints (the "
            "number of checkpointed layers); hyclora.integrations.checkpointing.enable_activation_"
            "checkpointing fills it for you."
        )
    if settings["cpu_checkpointing"] and not settings["partition_activations"]:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            # DeepSpeed's "copy to host" is x.to("cpu"), which returns x itself on a CPU
            # accelerator; it then empties x and the recompute reads an empty tensor.
            raise ValueError(
                "activation_checkpointing.cpu_checkpointing without partition_activations cannot run "
                "on a CPU-only DeepSpeed run (DeepSpeed would empty the checkpoint it means to copy, "
                "and there is no device memory to save): set cpu_checkpointing=false, or also set "
                "partition_activations=true."
            )
    if not ds_comm.is_initialized():
        raise RuntimeError(
            "deepspeed.checkpointing.configure needs DeepSpeed's communication backend: call "
            "deepspeed.init_distributed() first (TrainingArguments(deepspeed=...), accelerate with a "
            "DeepSpeedPlugin and deepspeed.initialize do it for you)."
        )
    deepspeed.checkpointing.configure(
        mpu, **{_AC_KEYS[key]: value for key, value in settings.items()}
    )
    return settings


__all__ = [
    "DS_CONFIG_DIR",
    "ZeRO3GatherError",
    "activation_checkpointing_settings",
    "assert_gathered",
    "configure_activation_checkpointing",
    "decoder_layers",
    "fill_auto",
    "find_auto",
    "hyclora_blocks",
    "install_gather_guards",
    "is_partitioned",
    "is_zero3",
    "leaf_module_config",
    "load_config",
    "prepare_zero3",
    "register_zero3_leaf_modules",
    "save_lora_adapter",
    "zero_stage",
]
