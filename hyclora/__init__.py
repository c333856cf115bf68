"""hyclora: LoRA fine-tuning in far less GPU memory by compressing buffered activations."""

from .config import HyCLoRAConfig

__version__ = "0.1.0"

_LAZY = {"apply_hyclora", "revert_hyclora", "is_patched", "supported_model_types"}


def __getattr__(name):
    # The model adapters import transformers and peft: load them on first use, so that
    # `import hyclora` (config, quant, ops) stays light.
    if name in _LAZY:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'hyclora' has no attribute {name!r}")


__all__ = ["HyCLoRAConfig", "apply_hyclora", "revert_hyclora", "is_patched", "supported_model_types", "__version__"]
