"""intra_inter_full_fuse for encoders: the fused GELU epilogue kernels (Triton, run by the
interpreter on the CPU) against their torch reference, the reference against autograd, and the
fused layer type against intra_inter on whole RoBERTa models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hyclora.config import HyCLoRAConfig
from hyclora.kernels.act_lora import (
    act_lora_backward,
    act_lora_backward_torch,
    act_lora_forward,
    act_lora_forward_torch,
)
from hyclora.kernels.activations import gelu_backward
from hyclora.kernels.common import INTERPRET, triton
from hyclora.quant import QuantizedTensor, dequantize, quantize
from hyclora.quant.core import affine_params

from helpers.encoders import encoder_batch, grads_of, lora_encoder, tiny_encoder
from helpers.numerics import rel_err, worst_rel_err

triton_runs = pytest.mark.skipif(
    triton is None or not (INTERPRET or torch.cuda.is_available()),
    reason="needs Triton with CUDA, or TRITON_INTERPRET=1 set before Python starts",
)


def _operands(m, n, r, dtype, seed=0, lora=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    yw = (torch.randn(m, n, generator=gen) * 2 + 0.3).to(dtype)
    yw[:, 3] *= 8  # a wide channel
    xa = torch.randn(m, r, generator=gen).to(dtype) if lora else None
    b = (torch.randn(n, r, generator=gen) * 0.3) if lora else None  # PEFT keeps adapters fp32
    lo, step, inv = affine_params(yw.float().amin(0), yw.float().amax(0), 4)
    return [t.to(device) if t is not None else None for t in (yw, xa, b, lo, step, inv)]


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("lora", [True, False])
def test_reference_codes_and_gradients(act, lora):
    yw, xa, b, _, _, _ = _operands(37, 50, 5, torch.float32, lora=lora)
    for bits in (2, 4, 8):
        lo, step, inv = affine_params(yw.amin(0), yw.amax(0), bits)
        codes, f = act_lora_forward_torch(yw, xa, b, 2.0, lo, inv, bits, act)
        # the codes are hyclora.quant's: dequantised through the ordinary path
        ref_q = quantize(yw, bits)
        assert torch.equal(codes, ref_q.codes)
        deq = dequantize(QuantizedTensor(codes, lo, step, bits=bits, shape=yw.shape, dtype=yw.dtype))
        u_exact = yw + (xa @ b.t() * 2.0 if lora else 0)
        assert torch.allclose(f, F.gelu(u_exact, approximate="none" if act == "gelu" else "tanh"), atol=2e-6)
        df = torch.randn(yw.shape, generator=torch.Generator().manual_seed(1))
        du, f_hat = act_lora_backward_torch(codes, lo, step, xa, b, 2.0, df, bits, act, dtype=yw.dtype)
        ur = (deq.double() + (xa.double() @ b.double().t() * 2.0 if lora else 0)).requires_grad_(True)
        fr = F.gelu(ur, approximate="none" if act == "gelu" else "tanh")
        fr.backward(df.double())
        assert rel_err(du, ur.grad) < 2e-6 and rel_err(f_hat, fr.detach()) < 2e-6


@triton_runs
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "silu"])  # silu: the kernel takes any ACTIVATIONS name
def test_triton_kernels_match_reference(bits, dtype, act):
    device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    for lora in (True, False):
        yw, xa, b, _, _, _ = _operands(37, 50, 5, dtype, lora=lora, device=device)  # odd shapes, rank 5
        lo, step, inv = affine_params(yw.float().amin(0), yw.float().amax(0), bits)
        dot = torch.promote_types(xa.dtype, b.dtype) if lora else None
        codes, f = act_lora_forward(yw, xa, b, 1.5, lo, inv, bits, act, dot_dtype=dot, backend="triton")
        codes_r, f_r = act_lora_forward_torch(yw, xa, b, 1.5, lo, inv, bits, act, dot_dtype=dot)
        assert torch.equal(codes, codes_r)
        # fp32: dot order; bf16: one rounding of F (measured 0 / 1 ulp)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(f, f_r) < tol
        df = torch.randn(yw.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
        du, f_hat = act_lora_backward(codes, lo, step, xa, b, 1.5, df, bits, act, dtype=dtype, dot_dtype=dot,
                                      backend="triton")
        du_r, f_hat_r = act_lora_backward_torch(codes, lo, step, xa, b, 1.5, df, bits, act, dtype=dtype,
                                                dot_dtype=dot)
        assert du.dtype == du_r.dtype and rel_err(du, du_r) < tol and rel_err(f_hat, f_hat_r) < tol
        du2, none = act_lora_backward(codes, lo, step, xa, b, 1.5, df, bits, act, dtype=dtype, need_f=False,
                                      dot_dtype=dot, backend="triton")
        assert none is None and torch.equal(du2, du)


def test_fused_gelu_argument_errors():
    yw, xa, b, lo, step, inv = _operands(8, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="both xa and lora_B"):
        act_lora_forward(yw, xa, None, 1.0, lo, inv, 4)
    with pytest.raises(ValueError, match="reshape"):
        act_lora_forward(yw[None], xa, b, 1.0, lo, inv, 4)
    with pytest.raises(ValueError, match="activation 'relu'"):
        act_lora_forward(yw, xa, b, 1.0, lo, inv, 4, "relu")
    with pytest.raises(ValueError, match="codes"):
        act_lora_backward(torch.zeros(8, 3, dtype=torch.uint8), lo, step, xa, b, 1.0, yw, 4, dtype=yw.dtype)


def test_exact_gelu_kernel_derivative_is_exact():
    # the kernel's derivative is the erf one, not the reference's tanh derivative (8.12)
    u = torch.linspace(-4, 4, 64).reshape(4, 16)
    lo, step, inv = affine_params(u.amin(0), u.amax(0), 8)
    codes, _ = act_lora_forward_torch(u, None, None, 1.0, lo, inv, 8)
    ones = torch.ones_like(u)
    du, _ = act_lora_backward_torch(codes, lo, step, None, None, 1.0, ones, 8, "gelu", dtype=u.dtype)
    deq = dequantize(QuantizedTensor(codes, lo, step, bits=8, shape=u.shape, dtype=u.dtype))
    assert rel_err(du, gelu_backward(ones, deq, "gelu")) < 1e-6
    assert rel_err(du, gelu_backward(ones, deq, "gelu_pytorch_tanh")) > 1e-4


# -- whole models ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
def test_full_fuse_equals_intra_inter_on_models(bits):
    # same quantisation, same dropout draws (LoRA, attention, hidden), only the GELU epilogue
    # fused: gradients agree to fp32 rounding (measured worst relative error 2e-7)
    batch = encoder_batch(b=3, s=20)
    model = lora_encoder(tiny_encoder("roberta", "eager", 0.1, sharpen=4.0), dropout=0.1)
    fused = copy.deepcopy(model)
    from hyclora.models import apply_hyclora

    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=bits))
    apply_hyclora(fused, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=bits))
    loss_a, ga = grads_of(model, batch)
    loss_b, gb = grads_of(fused, batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert worst_rel_err(gb, ga) < 1e-5


@triton_runs
def test_full_fuse_triton_backend_on_a_model():
    # the Triton kernels inside a whole training step (interpreter on the CPU)
    batch = encoder_batch(b=2, s=12)
    model = lora_encoder(tiny_encoder("bert", "sdpa", 0.1, sharpen=4.0, num_hidden_layers=1), dropout=0.1)
    fused = copy.deepcopy(model)
    from hyclora.models import apply_hyclora

    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4))
    apply_hyclora(fused, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=4, kernel_backend="triton"))
    _, ga = grads_of(model, batch)
    _, gb = grads_of(fused, batch)
    assert worst_rel_err(gb, ga) < 1e-5
