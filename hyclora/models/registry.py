"""Registry of supported architectures, keyed by ``config.model_type``."""

from __future__ import annotations

from typing import Dict

_REGISTRY: Dict[str, object] = {}


def register_model(model_type: str, adapter) -> None:
    _REGISTRY[model_type] = adapter


def supported_model_types():
    return tuple(sorted(_REGISTRY))


def get_adapter(model_type: str):
    if model_type not in _REGISTRY:
        raise ValueError(
            f"hyclora: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}. Set HyCLoRAConfig(use_hyclora=False) to train "
            "it without hyclora."
        )
    return _REGISTRY[model_type]


__all__ = ["register_model", "get_adapter", "supported_model_types"]
