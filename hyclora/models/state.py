"""Per-layer hyclora state: calibration statistics (buffers, so they are in ``state_dict``) and
the step counter. Which tensors get statistics, how wide they are and which keep exact outlier
channels is the tensor-spec table's (:mod:`hyclora.ops.tensor_specs`)."""

from __future__ import annotations

import math
from typing import Dict, Iterable

import torch
from torch import nn

from hyclora.ops.tensor_specs import DECODER, family_specs
from hyclora.quant import ChannelStats

from .peft_utils import transformers_model


_NONE_CALIBRATING: frozenset = frozenset()


class HyCLoRALayerState(nn.Module):
    """Child module ``hyclora_state`` of a patched layer.

    Buffers:
        forward_count: training forwards of this layer that were counted (a gradient
            checkpointing recompute is not counted twice).
    Submodules:
        stats: one ``ChannelStats`` per quantised tensor (compressing layer types only), the norm
            inputs with ``floor(width * layernorm_outlier_ratio)`` exact outlier channels.

    ``names``: the tensors of ``family`` to keep statistics for; ``widths``: their widths.
    """

    def __init__(self, widths: Dict[str, int], names: Iterable[str], layernorm_outlier_ratio: float,
                 iteration_threshold: int, device=None, recalibrate_every: int = 0, family: str = DECODER,
                 refresh: bool = True, quick: bool = False):
        super().__init__()
        self.register_buffer("forward_count", torch.zeros((), dtype=torch.long, device=device))
        self.stats = nn.ModuleDict()
        names = list(names)
        if names:
            specs = family_specs(family)
            for name in names:
                width = widths[name]
                outliers = int(math.floor(width * layernorm_outlier_ratio)) if specs[name].outlier_channels else 0
                self.stats[name] = ChannelStats(
                    width, num_outliers=outliers, iteration_threshold=iteration_threshold,
                    recalibrate_every=recalibrate_every, refresh=refresh, quick=quick,
                )
            if device is not None:
                self.stats.to(device)
        # Python-side bookkeeping (not state), used by LayerAdapter.begin_forward (models/adapter.py)
        self.owed = False
        self.calibrating: frozenset = frozenset()
        self.last_saved: Dict[str, list] = {}
        self.counting = True  # False: forwards that are not training steps (CUDA-graph warm-ups)

    def count_forward(self) -> None:
        """One counted training forward of this layer (a checkpoint recompute is not counted):
        advance ``forward_count``, let frozen statistics expire (``recalibrate_every``), and
        remember which statistics were still calibrating, which a non-reentrant recompute of this
        forward must treat the same way. Nothing while ``counting`` is off."""
        if not self.counting:
            return
        # registries read directly and the set stored in __dict__: nn.Module's __getattr__ /
        # __setattr__ cost host time on every layer call
        self._buffers["forward_count"].add_(1)  # a buffer without grad: no autograd record
        calibrating = None
        for name, s in self._modules["stats"]._modules.items():
            s.note_counted_forward()
            if not s.frozen:
                calibrating = [name] if calibrating is None else calibrating + [name]
        self.__dict__["calibrating"] = _NONE_CALIBRATING if calibrating is None else frozenset(calibrating)

    def stats_dict(self) -> Dict[str, nn.Module]:
        return dict(self._modules["stats"]._modules)


_IGNORED_ON_SAVE = "_hyclora_ignored_on_save"  # the keys we added, so revert removes only those


def exclude_state_from_save_pretrained(model: nn.Module) -> int:
    """Keep the ``hyclora_state`` buffers out of ``save_pretrained`` of the transformers model in
    ``model`` (a PEFT model's base model, or ``model`` itself): they join its
    ``_keys_to_ignore_on_save``. ``state_dict()`` still holds them, so accelerate's
    ``save_state`` and ``HyCLoRAStateCallback`` checkpoints carry the calibration statistics,
    while a full model saved with ``save_pretrained`` (e.g. after ``merge_and_unload()``, which
    returns the still-patched transformers model) has exactly the plain model's keys.

    Idempotent; returns how many keys were added. Undo with :func:`include_state_in_save_pretrained`.
    """
    hf = transformers_model(model)
    if not callable(getattr(hf, "save_pretrained", None)):
        return 0
    keys = {f"{name}.{key}" for name, module in hf.named_modules() if isinstance(module, HyCLoRALayerState)
            for key in module.state_dict()}
    ignore = set(getattr(hf, "_keys_to_ignore_on_save", None) or ())
    added = keys - ignore
    if added:
        hf._keys_to_ignore_on_save = ignore | added
        hf.__dict__.setdefault(_IGNORED_ON_SAVE, set()).update(added)
    return len(added)


def include_state_in_save_pretrained(model: nn.Module) -> None:
    """Undo :func:`exclude_state_from_save_pretrained` (``revert_hyclora`` removes the state)."""
    hf = transformers_model(model)
    added = hf.__dict__.pop(_IGNORED_ON_SAVE, None)
    if added:
        hf._keys_to_ignore_on_save = set(getattr(hf, "_keys_to_ignore_on_save", None) or ()) - added


__all__ = ["HyCLoRALayerState", "exclude_state_from_save_pretrained", "include_state_in_save_pretrained"]
