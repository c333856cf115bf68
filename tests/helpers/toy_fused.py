"""A stand-in for hyclora's fused blocks, for ZeRO-3 tests that must not wait for hyclora.models.

``fuse_mlps(model)`` replaces the forward of every (PEFT-wrapped) LlamaMLP by one autograd
Function that reads the base and LoRA weights of gate/up/down_proj directly, without calling those
child modules — exactly the access pattern that breaks under ZeRO-3 unless the block is a leaf
module. The backward re-reads the weights from the module (Parameter objects, never views saved in
forward) and returns the LoRA gradients as Function outputs, so ZeRO's gradient hooks see them.
"""

from __future__ import annotations

import types
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

PROJS = ("gate_proj", "up_proj", "down_proj")


def _lora_parts(proj: nn.Module):
    name = proj.active_adapters[0] if hasattr(proj, "active_adapters") else "default"
    return proj.base_layer, proj.lora_A[name], proj.lora_B[name], proj.scaling[name]


def lora_params(mlp: nn.Module) -> List[nn.Parameter]:
    out = []
    for proj_name in PROJS:
        _, a, b, _ = _lora_parts(getattr(mlp, proj_name))
        out += [a.weight, b.weight]
    return out


def _linear(x, proj, a_w, b_w):
    base, _, _, scaling = _lora_parts(proj)
    return F.linear(x, base.weight, base.bias) + scaling * F.linear(F.linear(x, a_w), b_w)


def _mlp_math(x, mlp, params):
    g = _linear(x, mlp.gate_proj, params[0], params[1])
    u = _linear(x, mlp.up_proj, params[2], params[3])
    return _linear(F.silu(g) * u, mlp.down_proj, params[4], params[5])


class FusedLoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mlp, *params):
        ctx.mlp = mlp
        ctx.save_for_backward(x)
        return _mlp_math(x, mlp, params)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        mlp = ctx.mlp
        params = lora_params(mlp)  # re-read: under ZeRO-3 these were re-gathered for backward
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            leaves = [p.detach().requires_grad_(True) for p in params]
            y = _mlp_math(xd, mlp, leaves)
            grads = torch.autograd.grad(y, [xd] + leaves, grad_out)
        return (grads[0], None, *grads[1:])


def _fused_forward(self, x):
    return FusedLoRAMLP.apply(x, self, *lora_params(self))


def fuse_mlps(model: nn.Module) -> List[nn.Module]:
    """Patch every LlamaMLP under ``model`` (LoRA on gate/up/down required); returns them.
    Each is flagged ``_hyclora_block`` like hyclora's own blocks."""
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    if not mlps:
        raise ValueError("fuse_mlps: no LlamaMLP found")
    for mlp in mlps:
        for proj_name in PROJS:
            if not hasattr(getattr(mlp, proj_name), "lora_A"):
                raise ValueError(f"fuse_mlps needs LoRA on {proj_name}")
        mlp._hyclora_block = True
        mlp.forward = types.MethodType(_fused_forward, mlp)
    return mlps
