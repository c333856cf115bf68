"""hyclora: LoRA fine-tuning in far less GPU memory by compressing buffered activations."""

from .config import HyCLoRAConfig

__version__ = "0.1.0"

__all__ = ["HyCLoRAConfig", "__version__"]
