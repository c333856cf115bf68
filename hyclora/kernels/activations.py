"""The activations of the fused MLP epilogues: SiLU, exact GELU and tanh-GELU, as a Triton
constexpr and as torch references, each with its derivative.

transformers names them in ``hidden_act`` / ``hidden_activation``; :data:`ACTIVATIONS` maps those
names to the kernel code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import tl, triton

SILU, GELU, GELU_TANH = 0, 1, 2
ACTIVATIONS = {"silu": SILU, "swish": SILU, "gelu": GELU, "gelu_new": GELU_TANH, "gelu_pytorch_tanh": GELU_TANH}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation_code(act: str) -> int:
    """The kernel code of a transformers activation name; unknown names are refused."""
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"hyclora: activation {act!r} has no fused kernel; supported: "
                         f"{', '.join(sorted(ACTIVATIONS))}.") from None


def gelu_forward(u: torch.Tensor, act: str = "gelu") -> torch.Tensor:
    """GELU as transformers computes it: ``gelu`` is the exact erf form, ``gelu_new`` /
    ``gelu_pytorch_tanh`` the tanh approximation."""
    code = activation_code(act)
    if code not in (GELU, GELU_TANH):
        raise ValueError(f"gelu_forward: {act!r} is not a GELU")
    return F.gelu(u, approximate="none" if code == GELU else "tanh")


def gelu_backward(du_out: torch.Tensor, u: torch.Tensor, act: str = "gelu") -> torch.Tensor:
    """``dL/du`` from ``dL/dGELU(u)``, in fp32 (fp64 for fp64), returned in ``u``'s dtype.

    exact: ``GELU'(u) = Phi(u) + u phi(u)``, ``Phi`` the normal CDF, ``phi`` its density;
    tanh:  ``0.5 (1 + t) + 0.5 u (1 - t^2) c (1 + 3 a u^2)``, ``t = tanh(c (u + a u^3))``.
    """
    code = activation_code(act)
    uf = u.to(torch.float64 if u.dtype == torch.float64 else torch.float32)
    if code == GELU:
        cdf = 0.5 * (1.0 + torch.erf(uf * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * uf * uf) * _INV_SQRT_2PI
        deriv = cdf + uf * pdf
    elif code == GELU_TANH:
        inner = _SQRT_2_OVER_PI * (uf + 0.044715 * uf * uf * uf)
        t = torch.tanh(inner)
        deriv = 0.5 * (1.0 + t) + 0.5 * uf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * uf * uf)
    else:
        raise ValueError(f"gelu_backward: {act!r} is not a GELU")
    return (du_out.to(uf.dtype) * deriv).to(u.dtype)


def act_fp32(u: torch.Tensor, act: str) -> torch.Tensor:
    """The activation of an fp32 tensor, as the kernels compute it (torch reference)."""
    if activation_code(act) == SILU:
        return u * torch.sigmoid(u)
    return gelu_forward(u, act)


def act_deriv_fp32(u: torch.Tensor, act: str) -> torch.Tensor:
    """The derivative of the activation at an fp32 ``u`` (torch reference)."""
    if activation_code(act) == SILU:
        sig = torch.sigmoid(u)
        return sig * (1.0 + u * (1.0 - sig))
    return gelu_backward(torch.ones_like(u), u, act)


if triton is not None:

    @triton.jit
    def act_and_deriv(u, ACT: tl.constexpr):
        """``(act(u), act'(u))`` in fp32 for the code ``ACT`` (SILU, GELU, GELU_TANH)."""
        if ACT == 0:
            sig = tl.sigmoid(u)
            return u * sig, sig * (1.0 + u * (1.0 - sig))
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
            pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
            return u * cdf, cdf + u * pdf
        else:
            c = 0.7978845608028654
            inner = c * (u + 0.044715 * u * u * u)
            e = tl.exp(-2.0 * tl.abs(inner))  # tanh without overflow: sign * (1 - e) / (1 + e)
            t = tl.where(inner < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
            return 0.5 * u * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * c * (1.0 + 0.134145 * u * u)


__all__ = ["SILU", "GELU", "GELU_TANH", "ACTIVATIONS", "activation_code", "gelu_forward", "gelu_backward",
           "act_fp32", "act_deriv_fp32", "act_and_deriv"]
