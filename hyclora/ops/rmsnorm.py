"""RMSNorm under autograd: :class:`RMSNormFn`, for the final norm of a model.

The forward and backward themselves (op by op as transformers computes them, in row chunks) are
:func:`hyclora.kernels.rmsnorm.rmsnorm_forward` / :func:`~hyclora.kernels.rmsnorm.rmsnorm_backward`.
"""

from __future__ import annotations

import torch

from hyclora.kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward


class RMSNormFn(torch.autograd.Function):
    """A whole RMSNorm under autograd that keeps the input as it is (not the fp32 upcast
    transformers' RMSNorm saves) plus the fp32 ``rstd``, and runs forward and backward in row
    chunks: for the final norm of a checkpointed long-context step, whose fp32 upcast and five fp32
    backward temporaries (6 GiB at 7B/64k) were the step's peak. ``variant``: ``"w"`` (Llama) or
    Gemma's ``"1+w"`` (:mod:`hyclora.kernels.rmsnorm`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "w"):
        if weight.shape != (x.shape[-1],):
            raise ValueError(
                f"hyclora RMSNorm: weight of shape {tuple(weight.shape)} for inputs of width {x.shape[-1]}; "
                "under DeepSpeed ZeRO-3 the norm must run inside its module's forward (parameters "
                "gathered), e.g. through model(...), not on a detached weight.")
        y, rstd = rmsnorm_forward(x, weight, eps, variant)
        ctx.save_for_backward(x, weight, rstd)
        ctx.variant = variant
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = rmsnorm_backward(dy, x, rstd, weight, need_dx=need_dx, need_dweight=need_dw, variant=ctx.variant)
        return dx, dw, None, None


__all__ = ["RMSNormFn"]
