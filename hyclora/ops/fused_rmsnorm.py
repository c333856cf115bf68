"""Block glue of the fused RMSNorm of ``intra_inter_full_fuse``: the norm that also writes its
compressed input, with the storage policy's parameters and exact rows.

The kernels, launchers and torch references are :mod:`hyclora.kernels.rmsnorm`
(:func:`~hyclora.kernels.rmsnorm.rmsnorm_quant_forward` / ``rmsnorm_quant_backward``). Here the
quantisation parameters (and, while calibrating, the outlier channels) are computed before the
kernel exactly as ``StoragePolicy.keep`` computes them (:meth:`hyclora.ops.storage.StoragePolicy.quant_params`): frozen statistics cost nothing, calibration one extra read; the
exact outlier rows are picked as ``keep`` picks them, and what is kept goes to the block's store.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hyclora.kernels.rmsnorm import rmsnorm_quant_backward, rmsnorm_quant_forward
from hyclora.quant.core import QuantizedTensor

from .storage import OutlierRows


def fused_norm_forward(plan, store, name: str, rstd_name: str, x: Tensor, weight: Tensor,
                       eps: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """The block's ``rmsnorm_forward`` + ``policy.keep(name, x)`` + ``plain(rstd_name, rstd)``;
    returns ``(y, rstd)`` shaped like the op-by-op ones. ``eps``: the norm's (default
    ``plan.eps``); the weight's variant is the plan's ``norm_variant`` ("w" when it has none).

    What is kept equals ``keep``'s after dequantisation: per-channel codes with exact outlier
    channels, and (unless the tensor is exempt) the exact outlier rows. While ranges are taken
    from this tensor (calibration, checkpoint replay, no statistics) the rows are split off
    first in torch, as ``keep`` does, so they cannot stretch the ranges; with frozen statistics
    the kernel also writes each row's max |x| and only the top-k and a (k, D) gather remain.
    Codes of the exact rows may differ from ``keep``'s (those rows are overwritten on
    dequantisation)."""
    pol = plan.policy
    spec = pol.spec(name)
    if spec.grouped:
        raise RuntimeError(f"hyclora internal error: the fused RMSNorm keeps {name!r} per channel, "
                           f"but the storage policy keeps it in row groups.")
    bits = pol.bits_for(name)
    d = x.shape[-1]
    x2d = (x.detach() if torch.is_grad_enabled() else x).reshape(-1, d)  # a Function's forward: no grad mode
    stats, replay = plan.stats.get(name), name in plan.replay
    k_rows = OutlierRows.count(x2d.shape[0]) if spec.row_outliers else 0
    rows = None
    x_params = x2d
    if k_rows and (stats is None or replay or not stats.frozen):
        rows = OutlierRows.split(x)
        x_params = rows.cleaned.reshape(-1, d)
    # frozen statistics with exact rows: the rows are known after the kernel, observed then
    lo, step, inv, idx = pol.quant_params(x_params, stats, plan.update, replay, name=name,
                                          observe=not (k_rows and rows is None))
    with torch.no_grad():
        y, rstd, codes, vals, score = rmsnorm_quant_forward(
            x2d, weight, plan.eps if eps is None else eps, lo, inv, idx, bits,
            row_score=bool(k_rows) and rows is None, backend=pol.backend, variant=norm_variant(plan))
        qt = QuantizedTensor(codes, lo, step, bits=bits, shape=x.shape, dtype=x.dtype,
                             outlier_idx=idx, outlier_vals=vals)
        if k_rows:
            if rows is None:
                ridx = score.topk(k_rows).indices
                rows = OutlierRows(None, ridx, x2d.index_select(0, ridx))
                if stats is not None:
                    stats.observe(x2d, skip_rows=ridx, update=plan.update, backend=pol.backend)
            rows.quant, rows.cleaned = qt, None
            store.packed(name, "quant_rows", rows)
        else:
            store.packed(name, "quant", qt)
    rstd = rstd.view(*x.shape[:-1], 1)
    store.plain(rstd_name, rstd)
    return y.view(x.shape), rstd


def fused_norm_backward(plan, load, name: str, rstd_name: str, weight: Tensor, dy_n: Tensor,
                        dy_res: Optional[Tensor]) -> Tensor:
    """``dx`` of the norm input: the norm backward from the saved codes (+ the residual
    gradient ``dy_res``, if any)."""
    return rmsnorm_quant_backward(load.get_quantized(name), load.get(rstd_name), weight, dy_n, dy_res,
                                  backend=plan.policy.backend, variant=norm_variant(plan))


def norm_variant(plan) -> str:
    """How the plan's norm weights scale (``"w"``, or Gemma's ``"1+w"``; plans without the field: "w")."""
    return getattr(plan, "norm_variant", "w")


__all__ = ["fused_norm_forward", "fused_norm_backward", "norm_variant"]
