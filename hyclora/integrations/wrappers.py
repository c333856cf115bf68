"""Reaching the model inside the wrappers the integrations meet (a DeepSpeed engine, PEFT)."""

from __future__ import annotations

from torch import nn


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The model a DeepSpeed engine wraps (its hooks live on that one); any other model as is."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "DeepSpeedEngine":
        return inner
    return model


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside a PEFT model or DeepSpeed engine."""
    model = unwrap_engine(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


__all__ = ["unwrap_engine", "hf_model"]
