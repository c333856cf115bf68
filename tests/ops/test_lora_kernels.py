"""hyclora.kernels.lora: ``y_w + s * (xa @ B^T)`` and ``x @ A^T`` from a 16-bit ``x`` with
fp32 ``A``, each in one Triton pass, against the op-by-op references (PEFT's expressions), on odd
shapes, ranks 8-128, 16/32-bit tensors; the dispatch; full_fuse on a bf16 model with PEFT's
default fp32 adapters; sm_90 compiles."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch

import functools

from hyclora.kernels import lora as ep

from helpers.kernels import DEVICE, compile_for_sm90, needs_triton


# the wrappers launch their kernels eagerly only from ``min_tokens`` tokens (else the torch
# references run, see test_kernels_launch_eagerly_only_from_the_token_threshold): the kernels are
# what these tests test, also on a GPU (the interpreter launches them anyway)
lora_epilogue = functools.partial(ep.lora_epilogue, min_tokens=0)
lora_down = functools.partial(ep.lora_down, min_tokens=0)
token_reduced_product = functools.partial(ep.token_reduced_product, min_tokens=0)


class _Spy:
    """A stand-in for a @triton.jit kernel that counts launches (``kernel[grid](...)``)."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


def _case(m, n, r, out_dtype, factor_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y_w = (torch.randn(m, n, generator=gen) * 3).to(out_dtype).to(DEVICE)
    xa = torch.randn(m, r, generator=gen).to(factor_dtype).to(DEVICE)
    b = (torch.randn(n, r, generator=gen) * 0.05).to(factor_dtype).to(DEVICE)
    return y_w, xa, b


def _ulps_apart(a: torch.Tensor, b: torch.Tensor, y_w: torch.Tensor, xa, lora_b, scaling) -> torch.Tensor:
    """|a - b| in units of the last place of ``a``'s dtype at the magnitude of the sum's operands
    (``|y_w| + s |xa| |B|^T``: where the sum cancels, a relative measure would be meaningless)."""
    eps = torch.finfo(a.dtype).eps
    scale = y_w.float().abs() + scaling * torch.nn.functional.linear(xa.float().abs(), lora_b.float().abs())
    return (a.float() - b.float()).abs() / (scale.clamp_min(torch.finfo(a.dtype).tiny) * eps)


@needs_triton
@pytest.mark.parametrize("out_dtype, factor_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                     (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("m, n, r", [(37, 45, 8), (5, 130, 12), (70, 33, 40), (19, 64, 128)])
@pytest.mark.parametrize("scaling", [1.0, 2.0])
def test_kernel_equals_the_op_by_op_expression(m, n, r, out_dtype, factor_dtype, scaling):
    y_w, xa, b = _case(m, n, r, out_dtype, factor_dtype)
    # fp32 product, fp32 scale, fp32 sum, one rounding: the op-by-op expression's operations for
    # fp32 factors (for 16-bit factors the op-by-op expression rounds three times, addmm once)
    ref = ((torch.nn.functional.linear(xa.float(), b.float()) * scaling) + y_w.float()).to(out_dtype)
    if factor_dtype == torch.float32:
        assert torch.equal(ref, ep.lora_epilogue_torch(y_w, xa, b, scaling))
    got = lora_epilogue(y_w, xa, b, scaling, backend="triton")
    assert got.dtype == ref.dtype == out_dtype and got.shape == ref.shape
    # only the rank-r dot's fp32 summation order differs: a 16-bit result's final rounding lands
    # on a neighbour now and then (one unit in the last place); fp32 results carry each order's
    # own rounding errors (measured up to 1.25 units of the operands' magnitude on the CPU, 2.59
    # against cuBLAS's fp32 GEMM on an H200; asserted 4)
    apart = _ulps_apart(got, ref, y_w, xa, b, scaling)
    assert float(apart.max()) <= (4.0 if out_dtype == torch.float32 else 1.0 + 1e-6)
    if out_dtype != torch.float32:  # neighbours: up to 5.9% with bf16 factors on an H200
        assert float((apart > 0).float().mean()) < (0.1 if factor_dtype != torch.float32 else 0.02)


@needs_triton
def test_kernel_keeps_leading_dims_and_strided_factors():
    y_w, xa, b = _case(2 * 3 * 7, 24, 12, torch.bfloat16, torch.float32, seed=3)
    y3 = y_w.view(2, 21, 24)
    xa_wide = torch.cat([xa, xa], dim=1)[:, :12].view(2, 21, 12)  # rows strided by 24
    b_t = b.t().contiguous().t()  # column-major B
    got = lora_epilogue(y3, xa_wide, b_t, 0.5, backend="triton")
    ref = ep.lora_epilogue_torch(y3, xa_wide, b_t, 0.5)
    assert got.shape == (2, 21, 24) and float(_ulps_apart(got, ref, y3, xa_wide, b_t, 0.5).max()) <= 1.0 + 1e-6


def test_torch_backend_is_the_reference_and_grad_calls_stay_differentiable():
    y_w, xa, b = _case(9, 10, 8, torch.bfloat16, torch.float32)
    assert torch.equal(lora_epilogue(y_w, xa, b, 2.0), ep.lora_epilogue_torch(y_w, xa, b, 2.0))
    expected = (y_w.float() + 2.0 * torch.nn.functional.linear(xa, b)).to(torch.bfloat16)
    assert torch.equal(ep.lora_epilogue_torch(y_w, xa, b, 2.0), expected)
    b.requires_grad_(True)
    out = lora_epilogue(y_w, xa, b, 2.0, backend="auto")  # a call autograd records: torch ops
    out.float().sum().backward()
    assert b.grad is not None and b.grad.shape == b.shape
    with pytest.raises(ValueError, match="backend='cuda' is invalid"):
        lora_epilogue(y_w, xa, b.detach(), 1.0, backend="cuda")


def _bf16_model_with_fp32_adapters():
    from helpers.models import lora_model, tiny_model

    model = lora_model(tiny_model("llama", "sdpa", num_hidden_layers=1, intermediate_size=45), r=12, alpha=16)
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    return model


def test_switch_turns_the_fused_lora_ops_off_in_every_pass(monkeypatch):
    # HyCLoRAConfig(fused_lora_ops=False): full_fuse runs its LoRA terms op by op (no fused op in
    # the compressed forward, the backward or a checkpoint's plain first pass)
    from helpers.models import step_grads

    from hyclora.config import HyCLoRAConfig
    from hyclora.models import apply_hyclora, revert_hyclora
    from hyclora.ops.storage import StoragePolicy

    def refuse(*args, **kwargs):
        raise AssertionError("a fused LoRA op ran with fused_lora_ops=False")

    for name in ("lora_epilogue", "lora_down", "token_reduced_product"):
        monkeypatch.setattr(ep, name, refuse)
    assert StoragePolicy(layer_type="intra_inter_full_fuse", bits=2, backend="torch",
                         fused_lora_ops=False).fused_lora is None
    model = _bf16_model_with_fp32_adapters()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=8, iteration_threshold=0,
                                       kernel_backend="torch", fused_lora_ops=False))
    try:
        loss, grads = step_grads(model, {"input_ids": ids, "labels": ids})
    finally:
        revert_hyclora(model)
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
    with pytest.raises(AssertionError, match="fused_lora_ops"):  # and on (the default): the fused ops run
        apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=8, iteration_threshold=0,
                                           kernel_backend="torch"))
        try:
            step_grads(model, {"input_ids": ids, "labels": ids})
        finally:
            revert_hyclora(model)


@needs_triton
def test_full_fuse_takes_the_kernel_for_fp32_adapters_on_a_bf16_model(monkeypatch):
    # PEFT's default keeps LoRA weights in fp32 on a bf16 base; full_fuse then adds each LoRA
    # term in one pass (forward outputs, the rebuilt v, the input gradients) and stays as close
    # to intra_inter (op by op) as the bf16 roundings of the two paths allow
    from helpers.models import step_grads
    from helpers.numerics import worst_rel_err

    from hyclora.config import HyCLoRAConfig
    from hyclora.models import apply_hyclora, revert_hyclora

    model = _bf16_model_with_fp32_adapters()
    calls = []
    real = ep._lora_epilogue_triton
    monkeypatch.setattr(ep, "_lora_epilogue_triton", lambda *a: calls.append(a[0].shape) or real(*a))
    products = []
    monkeypatch.setattr(ep, "_rank_product_kernel", _Spy(ep._rank_product_kernel, products))
    model.to(DEVICE)
    ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    batch = {"input_ids": ids, "labels": ids}
    res = {}
    for lt, backend in (("intra_inter", "torch"), ("intra_inter_full_fuse", "triton")):
        # 38 tokens: eagerly on a GPU the torch ops would run without lora_kernels_min_tokens=0
        apply_hyclora(model, HyCLoRAConfig(layer_type=lt, q_bit=8, iteration_threshold=0, kernel_backend=backend,
                                           lora_kernels_min_tokens=0))
        try:
            res[lt] = step_grads(model, batch)
        finally:
            revert_hyclora(model)
    # forward: q, k, v, o, down; backward: v rebuilt, and the LoRA part of every linear's dx
    assert len(calls) == 6 + 7
    # rank-r products from the 16-bit tensors, per linear: x A^T in the forward; s dy B,
    # dB = s dy^T xa and dA = (x^T dxa)^T in the backward
    assert len(products) == 7 + 3 * 7
    (loss_f, g_f), (loss_r, g_r) = res["intra_inter_full_fuse"], res["intra_inter"]
    assert abs(float(loss_f) - float(loss_r)) < 2e-2
    err = worst_rel_err(g_f, g_r)
    print("bf16 model, fp32 adapters, full_fuse vs intra_inter:", err)
    assert err <= 0.015  # measured 0.0061 (bf16 roundings the two paths make differently)


@needs_triton
def test_linear_backward_adds_the_lora_part_of_dx_in_one_rounding():
    # bf16 dy and base weight, fp32 adapters: dx = dy W + s (dy B) A; op by op the LoRA part is
    # rounded to bf16 before the add, the fused backward rounds the sum once
    from hyclora.ops.lora import FusedLoRA, LinearMeta, lora_linear_backward

    gen = torch.Generator().manual_seed(5)
    tokens, d_in, d_out, r = 29, 48, 40, 12
    meta = LinearMeta(name="q", has_lora=True, scaling=2.0, dropout_p=0.0)
    dy = torch.randn(tokens, d_out, generator=gen).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(d_out, d_in, generator=gen) * 0.1).to(torch.bfloat16).to(DEVICE)
    a = (torch.randn(r, d_in, generator=gen) * 0.1).to(DEVICE)
    b = (torch.randn(d_out, r, generator=gen) * 0.1).to(DEVICE)
    x_hat = torch.randn(tokens, d_in, generator=gen).to(torch.bfloat16).to(DEVICE)
    xa = torch.nn.functional.linear(x_hat.float(), a)
    plain = lora_linear_backward(meta, dy, x_hat, xa, w, None, a, b)
    fused = lora_linear_backward(meta, dy, x_hat, xa, w, None, a, b, fused=FusedLoRA("triton", min_tokens=0))
    for p_, f_ in zip(plain[2:], fused[2:]):  # dA, dB: the same products, fp32 sums in another order
        assert p_.dtype == f_.dtype and torch.allclose(p_, f_, rtol=1e-5, atol=1e-5 * float(p_.abs().max()))
    exact = (torch.nn.functional.linear(dy, w.t()).float()
             + torch.nn.functional.linear(2.0 * torch.nn.functional.linear(dy.float(), b.t()), a.t()))
    err_fused = (fused[0].float() - exact).abs().max()
    err_plain = (plain[0].float() - exact).abs().max()
    assert fused[0].dtype == torch.bfloat16 and err_fused <= err_plain + 1e-6


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_compiles_for_sm90_without_spills(tmp_path):
    """Ahead of time for sm_90 (no GPU needed) with the GPU tiles: the epilogue for bf16/fp16
    outputs with fp32 factors, ranks 8, 40 (three slices) and 128 (eight), scaled and not; the
    down-projection and the token-reduced product from bf16/fp16 at ranks 8 and 128; no spills."""
    from hyclora.kernels.lora import _blocks

    cases = []
    for out in ("bf16", "fp16"):
        for r in (8, 40, 128):
            block_m, block_n, block_r, warps = _blocks(4096, 4096, r, interpret=False)
            cases.append(dict(module="hyclora.kernels.lora", kernel="_lora_epilogue_kernel",
                              ptrs=dict(yw_ptr=out, xa_ptr="fp32", b_ptr="fp32", y_ptr=out), floats=["scale"],
                              consts=dict(SCALE_ONE=r == 8, RNE=False, R_CHUNKS=-(-r // block_r), BLOCK_M=block_m,
                                          BLOCK_N=block_n, BLOCK_R=block_r),
                              warps=warps, tag=[out, r]))
    from hyclora.kernels.lora import _down_tiles, _reduce_tiles

    for x_dt in ("bf16", "fp16"):
        for r in (8, 128):
            for what, (rows, block_k, block_cols, warps, per_slice) in (
                    ("down", _down_tiles(4096, 4096, r, interpret=False)),
                    ("reduce", _reduce_tiles(16384, 4096, r, interpret=False))):
                per_slice = 4096 if what == "down" else per_slice
                cases.append(dict(module="hyclora.kernels.lora", kernel="_rank_product_kernel",
                                  ptrs=dict(a_ptr=x_dt, b_ptr="fp32", out_ptr="fp32"), floats=[],
                                  consts=dict(ITERS=per_slice // block_k, BLOCK_ROWS=rows, BLOCK_K=block_k,
                                              BLOCK_COLS=block_cols, SPLIT_BF16=x_dt == "bf16", UPCAST=False),
                                  warps=warps, tag=[what, x_dt, r]))
    for tag, regs, stack, local in compile_for_sm90(cases, tmp_path):
        assert local == 0 and stack == 0, (tag, regs, stack)


@needs_triton
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, r", [(37, 45, 8), (5, 300, 16), (70, 130, 40), (19, 64, 128)])
def test_down_projection_equals_the_cast_and_fp32_matmul(m, k, r, x_dtype):
    gen = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=gen) * 2).to(x_dtype).to(DEVICE)
    a = (torch.randn(r, k, generator=gen) * 0.1).to(DEVICE)
    got = lora_down(x, a, backend="triton")
    ref = ep.lora_down_torch(x, a)
    assert got.dtype == torch.float32 and got.shape == (m, r)
    # the same fp32 products of exactly upcast inputs; only the order of the K-long sums differs:
    # within a few fp32 roundings of the magnitude sum |x| |A|^T
    scale = torch.nn.functional.linear(x.float().abs(), a.abs())
    assert float(((got - ref).abs() / (scale * torch.finfo(torch.float32).eps)).max()) <= 8


def test_down_projection_dispatch():
    x = torch.randn(3, 7, 16).to(torch.bfloat16)
    a = torch.randn(4, 16)
    assert torch.equal(lora_down(x, a), torch.nn.functional.linear(x.float(), a))
    assert lora_down(x, a, backend="auto").shape == (3, 7, 4)  # CPU tensors: the torch ops
    same = torch.randn(4, 16).to(torch.bfloat16)
    assert torch.equal(lora_down(x, same, backend="auto"), torch.nn.functional.linear(x, same))
    with pytest.raises(ValueError, match="backend='gpu' is invalid"):
        lora_down(x, a, backend="gpu")


@needs_triton
def test_down_projection_keeps_leading_dims_and_strided_inputs():
    gen = torch.Generator().manual_seed(9)
    wide = torch.randn(2, 11, 96, generator=gen).to(torch.bfloat16).to(DEVICE)
    x = wide[..., :48]  # rows strided by 96
    a = torch.randn(48, 12, generator=gen).to(DEVICE).t()  # column-major A
    got = lora_down(x, a, backend="triton")
    ref = ep.lora_down_torch(x, a)
    assert got.shape == (2, 11, 12) and torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("t, n, r", [(37, 45, 8), (300, 64, 16), (2100, 40, 40), (19, 130, 128)])
def test_token_reduced_product_equals_the_fp32_matmul(t, n, r):
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, n, generator=gen).to(torch.bfloat16).to(DEVICE)
    y = torch.randn(t, r, generator=gen).to(DEVICE)
    got = token_reduced_product(x, y, backend="triton")
    ref = ep.token_reduced_product_torch(x, y)
    assert got.shape == (n, r) and got.dtype == torch.float32
    # the same fp32 products; the token sums run in another order (slices, then their sum)
    scale = x.float().abs().t().mm(y.abs())
    assert float(((got - ref).abs() / (scale * torch.finfo(torch.float32).eps)).max()) <= 16


def test_token_reduced_product_dispatch():
    x, y = torch.randn(2, 5, 6).to(torch.bfloat16), torch.randn(2, 5, 3)
    assert torch.equal(token_reduced_product(x, y, backend="auto"), x.reshape(10, 6).float().t() @ y.reshape(10, 3))
    with pytest.raises(ValueError, match="backend='x' is invalid"):
        token_reduced_product(x, y, backend="x")


@needs_triton
def test_linear_backward_weight_gradients_from_16bit_tensors():
    # fp32 adapters: dB, dA and the input gradient from the 16-bit dy and input, without their
    # fp32 copies; the same operations as op by op up to fp32 summation order
    from hyclora.ops.lora import FusedLoRA, LinearMeta, lora_linear_backward

    gen = torch.Generator().manual_seed(6)
    meta = LinearMeta(name="up", has_lora=True, scaling=0.5, dropout_p=0.0)
    dy = torch.randn(3, 11, 40, generator=gen).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(40, 48, generator=gen) * 0.1).to(torch.bfloat16).to(DEVICE)
    a = (torch.randn(12, 48, generator=gen) * 0.1).to(DEVICE)
    b = (torch.randn(40, 12, generator=gen) * 0.1).to(DEVICE)
    x_hat = torch.randn(3, 11, 48, generator=gen).to(torch.bfloat16).to(DEVICE)
    xa = torch.nn.functional.linear(x_hat.float(), a)
    plain = lora_linear_backward(meta, dy, x_hat, xa, w, None, a, b)
    fused = lora_linear_backward(meta, dy, x_hat, xa, w, None, a, b, fused=FusedLoRA("triton", min_tokens=0))
    for name, p_, f_ in zip(("dx", "dbias", "dA", "dB"), plain, fused):
        if p_ is None:
            assert f_ is None
            continue
        assert f_.dtype == p_.dtype and f_.shape == p_.shape
        tol = 1e-5 if p_.dtype == torch.float32 else 1e-2
        assert float((f_.float() - p_.float()).norm() / p_.float().norm()) <= tol, name


@needs_triton
def test_split_bf16_products_keep_fp32_accuracy_over_the_whole_exponent_range():
    # the fp32 factor is split into three bf16 parts: tiny and huge magnitudes keep fp32 accuracy
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 96, generator=gen).to(torch.bfloat16)
    a = torch.randn(16, 96, generator=gen) * torch.tensor([1e-30, 1e-8, 1.0, 1e20]).repeat(4)[:, None]
    exact = torch.nn.functional.linear(x.double(), a.double())
    got = lora_down(x.to(DEVICE), a.to(DEVICE), backend="triton").cpu().double()
    scale = torch.nn.functional.linear(x.double().abs(), a.double().abs())
    assert float(((got - exact).abs() / (scale * torch.finfo(torch.float32).eps)).max()) <= 8
    y = torch.randn(40, 16, generator=gen) * torch.tensor([1e-30, 1e-8, 1.0, 1e20]).repeat(4)
    exact = x.double().t() @ y.double()
    got = token_reduced_product(x.to(DEVICE), y.to(DEVICE), backend="triton").cpu().double()
    scale = x.double().abs().t() @ y.double().abs()
    assert float(((got - exact).abs() / (scale * torch.finfo(torch.float32).eps)).max()) <= 8


def test_kernels_launch_eagerly_only_from_the_token_threshold(monkeypatch):
    # a Triton launch costs more host time than the cast + GEMM it replaces: eagerly the torch
    # ops run, from min_tokens tokens the kernels (None: never eagerly; CUDA graph capture always)
    monkeypatch.setattr(ep, "INTERPRET", False)  # as on a GPU machine
    cpu = torch.device("cpu")
    assert not ep._worth_launching(1 << 40, cpu, None)  # default: never eagerly
    assert not ep._worth_launching(8191, cpu, 8192)
    assert ep._worth_launching(8192, cpu, 8192)
    assert ep._worth_launching(1, cpu, 0)
    # below the threshold the wrappers run the torch references (even with backend="triton")
    monkeypatch.setattr(ep, "_rank_product_kernel", None)
    monkeypatch.setattr(ep, "_triton", lambda backend, device: True)
    x, a = torch.randn(5, 32).to(torch.bfloat16), torch.randn(4, 32)
    assert torch.equal(ep.lora_down(x, a, backend="triton", min_tokens=6), ep.lora_down_torch(x, a))
    y = torch.randn(5, 4)
    assert torch.equal(ep.token_reduced_product(x, y, backend="triton"), ep.token_reduced_product_torch(x, y))
    y_w, b = torch.randn(5, 6).to(torch.bfloat16), torch.randn(6, 4)
    monkeypatch.setattr(ep, "_lora_epilogue_triton", None)
    assert torch.equal(ep.lora_epilogue(y_w, y, b, 0.5, backend="triton"), ep.lora_epilogue_torch(y_w, y, b, 0.5))


def hyclora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if "hyclora_state" in k}


@needs_triton
@pytest.mark.parametrize("bits", [8, 2])
def test_kernels_against_op_by_op_with_the_same_frozen_statistics(bits):
    # the same calibrated model, one step with the fused LoRA kernels and one op by op: only
    # fp32 summation orders and the epilogue's single rounding differ, also at 2 bits (a separate
    # calibration per path would add its own quantisation differences). Measured on the CPU
    # (interpreter): 0.0068 at 8 bits, 0.0069 at 2 bits
    from helpers.models import lora_model, step_grads, tiny_model
    from helpers.numerics import worst_rel_err

    from hyclora.config import HyCLoRAConfig
    from hyclora.models import apply_hyclora, revert_hyclora

    torch.manual_seed(0)
    model = lora_model(tiny_model("llama", "sdpa", num_hidden_layers=4, intermediate_size=96, hidden_size=64),
                       r=8, alpha=16).to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    model.to(DEVICE)
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    batch = {"input_ids": ids, "labels": ids}
    config = HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=bits, iteration_threshold=2,
                           kernel_backend="triton", lora_kernels_min_tokens=0)
    apply_hyclora(model, config)
    try:
        for _ in range(3):  # calibrate and freeze
            step_grads(model, batch)
        _, kernels = step_grads(model, batch)
        frozen = copy.deepcopy(hyclora_state_dict(model))
    finally:
        revert_hyclora(model)
    # the same frozen statistics, the LoRA terms op by op
    apply_hyclora(model, dataclasses.replace(config, fused_lora_ops=False))
    try:
        unexpected = model.load_state_dict(frozen, strict=False).unexpected_keys
        assert frozen and not unexpected, unexpected
        _, op_by_op = step_grads(model, batch)
    finally:
        revert_hyclora(model)
    err = worst_rel_err(kernels, op_by_op)
    print(f"{bits}-bit, same statistics, kernels vs op by op: {err:.4f}")
    assert err <= 0.03


@needs_triton
def test_epilogue_in_place_writes_over_its_input():
    y_w, xa, b = _case(37, 45, 12, torch.bfloat16, torch.float32, seed=4)
    ref = lora_epilogue(y_w.clone(), xa, b, 0.5, backend="triton")
    got = lora_epilogue(y_w, xa, b, 0.5, backend="triton", in_place=True)
    assert got.data_ptr() == y_w.data_ptr() and torch.equal(got, ref)
