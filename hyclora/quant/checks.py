"""Guards that turn silent gradient corruption into a clear error."""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(x: Tensor, where: str) -> None:
    """Raise FloatingPointError naming ``where`` if ``x`` holds a NaN or an Inf.

    A non-finite activation would poison the min/max range of its whole channel (every token of
    that channel then dequantises to NaN) and every gradient behind it, so stop at the first one.
    Costs one reduction and one host sync; callers skip it when the user opted out
    (``HyCLoRAConfig(on_nonfinite="ignore")``).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"check_finite({where}): expected a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point() or x.numel() == 0:
        return
    if bool(torch.isfinite(x).all()):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    raise FloatingPointError(
        f"non-finite activation in {where}: {n_nan} NaN and {n_inf} Inf among {x.numel()} values "
        f"(shape {tuple(x.shape)}, {x.dtype}). The forward already diverged here; lower the "
        f"learning rate, enable gradient clipping, or train in bf16 instead of fp16 (overflow). "
        f"To skip this check, set HyCLoRAConfig(on_nonfinite='ignore')."
    )
