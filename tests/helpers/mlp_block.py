"""Operands, calibration statistics and one forward/backward of hyclora's MLP block Function
(``hyclora.ops.blocks.mlp_block``: RMSNorm + gate/up/down LoRA linears + SwiGLU), for comparing
layer types and backends on the same inputs."""

from __future__ import annotations

import torch

from hyclora.ops.blocks import MLPPlan, mlp_block
from hyclora.ops.lora import LinearMeta
from hyclora.ops.storage import StoragePolicy
from hyclora.quant import ChannelStats


def mlp_params(d, f, r, gen, lora=(True, True, True), bias=False, dtype=torch.float32):
    params, metas = [], []
    for name, (i, o), has in zip(("gate_proj", "up_proj", "down_proj"), ((d, f), (d, f), (f, d)), lora):
        w = torch.randn(o, i, generator=gen) / i ** 0.5
        bb = torch.randn(o, generator=gen) * 0.1 if bias else None
        a = (torch.randn(r, i, generator=gen) / i ** 0.5).requires_grad_() if has else None
        b = (torch.randn(o, r, generator=gen) * 0.2).requires_grad_() if has else None
        params += [w.to(dtype), None if bb is None else bb.to(dtype).requires_grad_(), a, b]
        metas.append(LinearMeta(name, has_lora=has, scaling=16 / r))
    return params, tuple(metas)


def mlp_grads(layer_type, x, norm_w, params, metas, bits, stats, backend, update=True, replay=frozenset(),
              dropout_seed=None):
    plan = MLPPlan(layer_name="model.layers.0", eps=1e-5, linears=metas,
                   policy=StoragePolicy(layer_type, bits, backend=backend), stats=stats, update=update,
                   replay=replay)
    x = x.detach().requires_grad_()
    norm_w.grad = None
    for p in params:
        if p is not None and p.requires_grad:
            p.grad = None
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    y = mlp_block(plan, x, norm_w, params)
    gen = torch.Generator().manual_seed(99)
    y.backward(torch.randn(y.shape, generator=gen).to(y))  # y's device and dtype (the GPU runs of test_fused_rmsnorm)
    grads = [x.grad] + ([norm_w.grad] if norm_w.requires_grad else []) + [p.grad for p in params if p is not None and p.requires_grad]
    return y.detach(), grads


def mlp_stats(d, f, threshold):
    return {"x_mid": ChannelStats(d, num_outliers=1, iteration_threshold=threshold),
            "gate": ChannelStats(f, iteration_threshold=threshold),
            "up": ChannelStats(f, iteration_threshold=threshold)}
