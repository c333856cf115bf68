"""How hyclora replaces a module's ``forward``: a class swap, not an instance attribute.

A patched module's class becomes a cached subclass of its own class whose ``forward`` is
hyclora's. Whatever a library builds around a class's ``forward`` then wraps hyclora's: from
transformers 5.23, ``GradientCheckpointingLayer.__init_subclass__`` wraps ``forward`` with the
checkpointing logic, and an instance-level ``forward`` would shadow that wrapper, silently
switching checkpointing off. Modules, parameters, hooks and ``state_dict`` keys stay unchanged;
``copy.deepcopy`` keeps the subclass; the subclass keeps the original ``__name__`` (so
``print(model)`` and DeepSpeed's leaf-module names by class name still match) and is reachable by
its qualified name here, so pickle finds it in the process that made it.

:func:`check_forward_reached` is the probe ``apply_hyclora`` runs on every patched module: a
sentinel call through ``module.forward`` must come back from hyclora's forward, otherwise some
wrapper (an instance-level ``forward`` set by accelerate's device-map hooks, or a transformers
release that dispatches differently) bypasses it, and the patch is refused by name.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import torch
from torch import nn


class _ForwardProbe:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<hyclora forward probe>"


FORWARD_PROBE = _ForwardProbe()

_SUBCLASSES: Dict[Tuple[type, Callable], type] = {}


def _subclass(cls: type, forward: Callable) -> type:
    key = (cls, forward)
    sub = _SUBCLASSES.get(key)
    if sub is not None:
        return sub

    @functools.wraps(forward)
    def patched(self, *args, **kwargs):
        if args and args[0] is FORWARD_PROBE:
            return FORWARD_PROBE
        return forward(self, *args, **kwargs)

    qualname = f"{cls.__name__}"
    while qualname in globals():  # two patched classes of the same name (different modules)
        qualname += "_"
    # transformers >= 5.23: GradientCheckpointingLayer.__init_subclass__ wraps `patched` here
    sub = type(cls)(cls.__name__, (cls,), {
        "forward": patched, "__module__": __name__, "__qualname__": qualname,
        "_hyclora_original_class": cls, "__doc__": cls.__doc__,
    })
    globals()[qualname] = sub
    _SUBCLASSES[key] = sub
    return sub


def patch_forward(module: nn.Module, forward: Callable) -> None:
    """Make ``forward(module, *args, **kwargs)`` the forward of ``module`` (this instance only)."""
    if "_hyclora_original_class" in type(module).__dict__:
        raise ValueError(f"hyclora: {type(module).__name__} is already patched")
    module.__class__ = _subclass(type(module), forward)
    # an instance forward already there is not ours to refuse at revert (the probe judges it)
    module.__dict__["_hyclora_prior_forward"] = module.__dict__.get("forward")


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before :func:`patch_forward`. Looked up along the MRO: FSDP2's
    ``fully_shard`` subclasses the patched class again, and its forward is still ours."""
    for cls in type(module).__mro__:
        original = cls.__dict__.get("_hyclora_original_class")
        if original is not None:
            return original
    return type(module)


def call_original(module: nn.Module, *args, **kwargs):
    """The unpatched forward (transformers' own checkpointing wrapper, if any, sees that it is
    not the outermost one and runs the plain forward)."""
    return original_class(module).forward(module, *args, **kwargs)


def is_forward_patched(module: nn.Module) -> bool:
    return "_hyclora_original_class" in type(module).__dict__


def unpatch_forward(module: nn.Module) -> None:
    """Give ``module`` its original class back; refuses if something has since wrapped it."""
    cls = type(module)
    if "_hyclora_original_class" not in cls.__dict__:
        if any("_hyclora_original_class" in c.__dict__ for c in cls.__mro__):
            raise ValueError(
                f"hyclora: {cls.__name__} was subclassed again after apply_hyclora (e.g. by FSDP's "
                "fully_shard); revert hyclora before wrapping the model, not after."
            )
        return
    if module.__dict__.get("forward") is not module.__dict__.get("_hyclora_prior_forward"):
        raise ValueError(
            f"hyclora: {cls.__name__} has an instance-level forward installed after apply_hyclora "
            f"({module.__dict__['forward']!r}); remove it first (CUDA graphs: graphs.remove(); ZeRO-3 gather "
            "guards: handle.remove()), then revert_hyclora."
        )
    module.__class__ = cls._hyclora_original_class
    module.__dict__.pop("_hyclora_prior_forward", None)


def check_forward_reached(module: nn.Module, name: str) -> None:
    """Refuse ``module`` when a call through ``module.forward`` does not reach hyclora's forward."""
    try:
        with torch.no_grad():
            out = module.forward(FORWARD_PROBE)
        error = None
    except Exception as exc:  # a wrapper that ran the original forward on the probe
        out, error = None, exc
    if out is FORWARD_PROBE:
        return
    from hyclora.compat import tested_range_text
    import transformers

    shadow = module.__dict__.get("forward")
    where = (f"an instance-level forward ({shadow!r}, e.g. accelerate's device-map hooks) shadows it; apply "
             "hyclora before dispatching or wrapping the model" if shadow is not None else
             f"transformers {transformers.__version__} dispatches {type(module).__name__}.forward in a way hyclora "
             f"does not know (tested: {tested_range_text()})")
    raise RuntimeError(
        f"hyclora: {name} would not run hyclora's forward: {where}. Refusing to patch instead of training "
        f"silently without compression{f' (probe error: {type(error).__name__}: {error})' if error else ''}."
    )


__all__ = ["FORWARD_PROBE", "call_original", "check_forward_reached", "is_forward_patched", "original_class",
           "patch_forward", "unpatch_forward"]
