"""Encoder operators (hyclora.ops.encoder) against plain torch autograd: LayerNorm, exact and
tanh GELU, dropout redrawn from a saved generator state, the attention core with probability
dropout, and the two encoder block Functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyclora.ops.encoder import (
    EncoderAttentionPlan,
    EncoderFFNPlan,
    check_activation,
    dropout_forward,
    dropout_mask_again,
    encoder_attention_backward,
    encoder_attention_block,
    encoder_attention_forward,
    encoder_ffn_block,
    layernorm_backward,
    layernorm_forward,
)
from hyclora.kernels.activations import gelu_backward, gelu_forward
from hyclora.ops.lora import LinearMeta
from hyclora.ops.storage import StoragePolicy

from helpers.numerics import rel_err


def _rel(a, b):
    return rel_err(a, b, min_norm=0.0)  # no floor: a zero reference gives nan, which fails every bound


# measured worst relative errors: fp64 4e-16, fp32 3.6e-7 (two roundings of the statistics)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_layernorm_forward_backward_match_autograd(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 24, generator=gen, dtype=dtype) * 3 + 1.5
    z[..., 7] += 40.0  # an outlier channel, as in real LN inputs
    w = torch.randn(24, generator=gen, dtype=dtype)
    b = torch.randn(24, generator=gen, dtype=dtype)
    dy = torch.randn(3, 5, 24, generator=gen, dtype=dtype)

    y, mean, rstd = layernorm_forward(z, w, b, 1e-5)
    assert mean.dtype == rstd.dtype == torch.promote_types(dtype, torch.float32) and mean.shape == (3, 5, 1)
    zr, wr, br = (t.clone().requires_grad_(True) for t in (z, w, b))
    yr = torch.nn.functional.layer_norm(zr, (24,), wr, br, 1e-5)
    assert torch.equal(y, yr.detach())  # nn.LayerNorm's output, bit for bit
    yr.backward(dy)

    dz, dw, db = layernorm_backward(dy, z, mean, rstd, w, need_dz=True, need_dweight=True, need_dbias=True)
    assert _rel(dz, zr.grad) < tol
    assert _rel(dw, wr.grad) < tol
    assert _rel(db, br.grad) < tol
    none = layernorm_backward(dy, z, mean, rstd, w, need_dz=False)
    assert none == (None, None, None)


def test_layernorm_backward_is_not_the_rmsnorm_formula():
    # the mean term matters: dropping it (an RMSNorm-style gradient) is measurably wrong
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 32, generator=gen, dtype=torch.float64) + 2.0
    dy = torch.randn(4, 32, generator=gen, dtype=torch.float64)
    _, mean, rstd = layernorm_forward(z, None, None, 1e-5)
    dz, _, _ = layernorm_backward(dy, z, mean, rstd, None)
    zr = z.clone().requires_grad_(True)
    F.layer_norm(zr, (32,), None, None, 1e-5).backward(dy)
    x_hat = (z - mean) * rstd
    wrong = rstd * (dy - x_hat * (dy * x_hat).mean(-1, keepdim=True))
    assert _rel(dz, zr.grad) < 1e-13
    assert _rel(wrong, zr.grad) > 0.1


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "gelu_new"])
def test_gelu_derivative_matches_autograd(act):
    u = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    du = torch.randn(u.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ur = u.clone().requires_grad_(True)
    F.gelu(ur, approximate="none" if act == "gelu" else "tanh").backward(du)
    got = gelu_backward(du, u, act)
    assert torch.equal(gelu_forward(u, act), F.gelu(u, approximate="none" if act == "gelu" else "tanh"))
    assert (got - ur.grad).abs().max() < 1e-13
    # fp32 activations: fp32 arithmetic, measured max abs error 1.2e-7 (erf), 1.2e-6 (tanh)
    got32 = gelu_backward(du.float(), u.float(), act)
    assert got32.dtype == torch.float32 and (got32.double() - ur.grad).abs().max() < 2e-6


def test_exact_gelu_derivative_differs_from_tanh_derivative():
    # the reference used the tanh derivative for the erf GELU (method notes 8.12); the two
    # differ by up to 9.3e-4 (measured), far above fp32 rounding of the derivative (1.2e-7)
    u = torch.linspace(-4, 4, 801, dtype=torch.float64)
    ones = torch.ones_like(u)
    diff = (gelu_backward(ones, u, "gelu") - gelu_backward(ones, u, "gelu_pytorch_tanh")).abs().max()
    assert diff > 5e-4


def test_unsupported_activation_names_the_choices():
    with pytest.raises(ValueError, match="gelu_pytorch_tanh.*use_hyclora=False"):
        check_activation("relu")


def test_dropout_mask_redrawn_identically_and_like_torch():
    x = torch.randn(4, 7, 16)
    torch.manual_seed(5)
    out, state = dropout_forward(x, 0.25)
    torch.manual_seed(5)
    ref = F.dropout(x, 0.25, training=True)
    assert torch.equal(out, ref)  # same generator draws as torch's CPU dropout
    torch.manual_seed(99)  # the backward runs later, with the generator elsewhere
    mask = dropout_mask_again(state, x, 0.25)
    assert torch.equal(x * mask, out)
    # drawing again leaves the global generator where it was
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(99)))
    assert dropout_forward(x, 0.0) == (x, None)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_attention_core_with_dropout_matches_autograd(p):
    gen = torch.Generator().manual_seed(3)
    b, h, s, d = 2, 3, 6, 8
    q, k, v = (torch.randn(b, h, s, d, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(b, 1, s, s, dtype=torch.float64)
    mask[1, ..., -2:] = torch.finfo(torch.float64).min  # padded keys
    do = torch.randn(b, s, h * d, generator=gen, dtype=torch.float64)
    scaling = d ** -0.5

    torch.manual_seed(11)
    o, probs, state = encoder_attention_forward(q, k, v, mask, scaling, p)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    torch.manual_seed(11)
    pr = torch.softmax(qr @ kr.transpose(2, 3) * scaling + mask, -1)
    orf = F.dropout(pr, p, training=True) @ vr
    orf = orf.transpose(1, 2).reshape(b, s, h * d)
    assert torch.allclose(o, orf.detach(), atol=1e-12)
    orf.backward(do)
    drop = dropout_mask_again(state, probs, p)
    assert (drop is None) == (p == 0)
    dq, dk, dv = encoder_attention_backward(do.view(b, s, h, d).transpose(1, 2), probs, q, k, v, scaling, drop)
    for got, ref in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert _rel(got, ref) < 1e-10


# -- the two block Functions, directly ---------------------------------------------------------


def _linear_params(gen, n_in, n_out, r=4, lora=True):
    w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in ** 0.5
    bias = torch.randn(n_out, generator=gen, dtype=torch.float64) * 0.1
    if not lora:
        return [w, bias, None, None]
    a = (torch.randn(r, n_in, generator=gen, dtype=torch.float64) / n_in ** 0.5).requires_grad_(True)
    bb = (torch.randn(n_out, r, generator=gen, dtype=torch.float64) * 0.1).requires_grad_(True)
    return [w, bias, a, bb]


def _ref_linear(x, params, meta, p_drop):
    w, bias, a, b = params
    y = F.linear(x, w, bias)
    if a is not None:
        y = y + F.linear(F.linear(F.dropout(x, p_drop, training=True), a), b) * meta.scaling
    return y


@pytest.mark.parametrize("lora_mask", [(1, 1, 1, 1, 1, 1), (0, 1, 0, 0, 1, 0), (1, 0, 1, 1, 0, 1)])
def test_blocks_baseline_match_autograd_with_all_dropouts(lora_mask):
    # fp64, every dropout on (LoRA 0.2, attention 0.15, hidden 0.1), trainable LayerNorms, any
    # subset of LoRA linears: the hand-written backward equals autograd of the same math.
    gen = torch.Generator().manual_seed(4)
    b, s, d, H, dff = 2, 5, 16, 2, 24
    x = torch.randn(b, s, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    mask = torch.zeros(b, 1, s, s, dtype=torch.float64)
    mask[0, ..., -1] = torch.finfo(torch.float64).min
    shapes = [(d, d), (d, d), (d, d), (d, d), (d, dff), (dff, d)]
    params = [_linear_params(gen, i, o, lora=bool(m)) for (i, o), m in zip(shapes, lora_mask)]
    metas = [LinearMeta(n, bool(m), scaling=2.0, dropout_p=0.2 if m else 0.0)
             for n, m in zip(("q", "k", "v", "o", "up", "down"), lora_mask)]
    ln = [(torch.rand(d, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True),
          (torch.randn(d, generator=gen, dtype=torch.float64) * 0.1).requires_grad_(True)]
    ln2 = [t.detach().clone().requires_grad_(True) for t in ln]
    dy = torch.randn(b, s, d, generator=gen, dtype=torch.float64)
    common = dict(layer_name="t", eps=1e-12, policy=StoragePolicy("baseline"))

    torch.manual_seed(21)
    aplan = EncoderAttentionPlan(linears=tuple(metas[:4]), num_heads=H, head_dim=d // H, scaling=(d // H) ** -0.5,
                                 impl="eager", attn_dropout=0.15, hidden_dropout=0.1, **common)
    h = encoder_attention_block(aplan, x, ln[0], ln[1], mask, [t for p in params[:4] for t in p])
    fplan = EncoderFFNPlan(linears=tuple(metas[4:]), activation="gelu", hidden_dropout=0.1, **common)
    y = encoder_ffn_block(fplan, h, ln2[0], ln2[1], [t for p in params[4:] for t in p])
    leaves = [x] + ln + ln2 + [t for p in params for t in p[2:] if t is not None]
    got = torch.autograd.grad(y, leaves, dy)

    torch.manual_seed(21)  # the same draws, in transformers' order
    qkv = [_ref_linear(x, params[i], metas[i], 0.2).view(b, s, H, d // H).transpose(1, 2) for i in range(3)]
    probs = torch.softmax(qkv[0] @ qkv[1].transpose(2, 3) * aplan.scaling + mask, -1)
    o = (F.dropout(probs, 0.15, training=True) @ qkv[2]).transpose(1, 2).reshape(b, s, d)
    z1 = F.dropout(_ref_linear(o, params[3], metas[3], 0.2), 0.1, training=True) + x
    hr = F.layer_norm(z1, (d,), ln[0], ln[1], 1e-12)
    u = F.gelu(_ref_linear(hr, params[4], metas[4], 0.2))
    z2 = F.dropout(_ref_linear(u, params[5], metas[5], 0.2), 0.1, training=True) + hr
    yr = F.layer_norm(z2, (d,), ln2[0], ln2[1], 1e-12)
    assert torch.allclose(y, yr, atol=1e-12)
    ref = torch.autograd.grad(yr, leaves, dy)
    for g, r in zip(got, ref):
        assert _rel(g, r) < 1e-12


def test_block_rejects_unknown_attention_implementation():
    plan = EncoderAttentionPlan(layer_name="enc.0", eps=1e-5, linears=tuple(LinearMeta(n) for n in "qkvo"),
                                impl="flash_attention_2")
    x = torch.randn(1, 2, 4)
    params = [torch.randn(4, 4), None, None, None] * 4
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*sdpa"):
        encoder_attention_block(plan, x, torch.ones(4), torch.zeros(4), None, params)
