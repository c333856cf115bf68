"""The code format: which widths and dtypes exist and how many bytes a row of codes takes.

A leaf of :mod:`hyclora.quant`: the torch reference (``core``) and the Triton codec
(``triton_kernels``) both read it.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported: use 2, 4 or 8 (codes are packed 8/bits per byte)."
        )
    return bits


def packed_width(n: int, bits: int) -> int:
    """Bytes per row holding ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


__all__ = ["SUPPORTED_BITS", "SUPPORTED_DTYPES", "check_bits", "packed_width"]
