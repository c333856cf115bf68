"""Compression primitives on plain tensors (no transformers / PEFT / DeepSpeed imports here).

* :func:`quantize` / :func:`dequantize` / :class:`QuantizedTensor`: per-channel (or per-group)
  min/max quantisation with zero point at 2/4/8 bits, packed into uint8, with optional exact
  outlier columns. Triton kernels on CUDA, a pure-torch reference (the test oracle) elsewhere.
* :class:`ChannelStats`: calibration state of one saved tensor (buffers, state_dict-safe).
* :func:`sparsify_probs` / :func:`densify_probs` / :class:`SparseProbs`: top-k-per-row storage
  of attention probabilities.
* :func:`check_finite`: stop on NaN/Inf activations, naming the place.
"""

from .checks import check_finite
from .core import (
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    packed_width,
    quantize,
)
from .sparse import SparseProbs, densify_probs, sparsify_probs
from .stats import ChannelStats, uncounted_updates

__all__ = [
    "SUPPORTED_BITS",
    "ChannelStats",
    "QuantizedTensor",
    "SparseProbs",
    "check_finite",
    "densify_probs",
    "dequantize",
    "packed_width",
    "quantize",
    "sparsify_probs",
    "uncounted_updates",
]
