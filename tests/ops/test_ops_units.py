"""Every operator of hyclora.ops against a plain autograd reference (odd shapes included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyclora.kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward
from hyclora.kernels.rope import apply_rope, rope_backward
from hyclora.ops.attention import (
    additive_mask,
    eager_attention_backward,
    eager_attention_forward,
    repeat_kv,
    sdpa_attention_forward,
    sdpa_attention_recompute,
)
from hyclora.ops.lora import LinearMeta, lora_linear_backward, lora_linear_forward, lora_reconstruct
from hyclora.ops.swiglu import silu_mul_backward, silu_mul_forward

from helpers.numerics import rel_err


def _hf_rmsnorm(x, w, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("width", [64, 37, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rmsnorm_matches_autograd(width, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, width, generator=gen) * 3 + 1).to(dtype).requires_grad_()
    w = (torch.rand(width, generator=gen) + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, width, generator=gen).to(dtype)
    ref = _hf_rmsnorm(x, w, 1e-5)
    ref.backward(dy)
    y, rstd = rmsnorm_forward(x.detach(), w.detach(), 1e-5)
    assert torch.equal(y, ref.detach())  # forward is bit-identical to transformers'
    assert rstd.dtype == torch.float32 and rstd.shape == (2, 5, 1)
    dx, dw = rmsnorm_backward(dy, x.detach(), rstd, w.detach(), need_dx=True, need_dweight=True)
    assert rel_err(dx, x.grad) <= tol
    assert rel_err(dw, w.grad) <= tol


def test_rmsnorm_backward_has_no_layernorm_mean_term():
    # The HyC-LoRA reference subtracts mean(w * dy) in its RMSNorm backward (its bug 8.1).
    # Ours equals autograd; the buggy formula is far from it on the same data, so this test
    # would catch that bug.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    w = torch.rand(64, generator=gen) + 0.5
    dy = torch.randn(4, 64, generator=gen) + 1.0  # non-zero mean: the wrong term is visible
    _hf_rmsnorm(x, w, 1e-5).backward(dy)
    _, rstd = rmsnorm_forward(x.detach(), w, 1e-5)
    dx, _ = rmsnorm_backward(dy, x.detach(), rstd, w)
    assert rel_err(dx, x.grad) <= 1e-6
    x_hat, g = x.detach() * rstd, dy * w
    buggy = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True) - g.mean(-1, keepdim=True))
    assert rel_err(buggy, x.grad) > 0.1


def test_rope_backward_is_inverse_rotation():
    gen = torch.Generator().manual_seed(1)
    b, h, s, d = 2, 3, 7, 10
    x = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11]])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = pos[..., None].double() * inv
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    dy = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64)
    apply_rope(x, cos, sin).backward(dy)
    assert torch.allclose(rope_backward(dy, cos, sin), x.grad, atol=1e-12)
    # a rotation: its backward is its inverse
    assert torch.allclose(rope_backward(apply_rope(x.detach(), cos, sin), cos, sin), x.detach(), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_silu_mul_matches_autograd(dtype, tol):
    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(3, 4, 37, generator=gen) * 4).to(dtype).requires_grad_()
    u = torch.randn(3, 4, 37, generator=gen).to(dtype).requires_grad_()
    dd = torch.randn(3, 4, 37, generator=gen).to(dtype)
    ref = F.silu(g) * u
    ref.backward(dd)
    s, d = silu_mul_forward(g.detach(), u.detach())
    assert torch.equal(d, ref.detach())
    dg, du = silu_mul_backward(dd, g.detach(), u.detach())
    assert rel_err(dg, g.grad) <= tol and rel_err(du, u.grad) <= tol
    dg2, du2 = silu_mul_backward(dd, g.detach(), u.detach(), s)  # stored SiLU output (intra)
    assert torch.equal(dg2, dg) and torch.equal(du2, du)


def _peft_like(x, w, bias, a, b, scaling, p):
    res = F.linear(x, w, bias)
    xl = x.to(a.dtype)
    xl = F.dropout(xl, p, training=True) if p > 0 else xl
    return (res + F.linear(F.linear(xl, a), b) * scaling).to(res.dtype)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float64])
def test_lora_linear_matches_peft_semantics(p, bias, adapter_dtype):
    gen = torch.Generator().manual_seed(3)
    din, dout, r = 13, 11, 3
    x = torch.randn(2, 5, din, generator=gen, requires_grad=True)
    w = torch.randn(dout, din, generator=gen)
    bb = torch.randn(dout, generator=gen, requires_grad=True) if bias else None
    a = torch.randn(r, din, generator=gen, dtype=adapter_dtype, requires_grad=True)
    b = torch.randn(dout, r, generator=gen, dtype=adapter_dtype, requires_grad=True)
    dy = torch.randn(2, 5, dout, generator=gen)
    scaling = 2.0 / r ** 0.5
    torch.manual_seed(11)
    ref = _peft_like(x, w, bb, a, b, scaling, p)
    ref.backward(dy)
    meta = LinearMeta("t", True, scaling=scaling, dropout_p=p)
    torch.manual_seed(11)
    out = lora_linear_forward(meta, x.detach(), w, None if bb is None else bb.detach(), a.detach(), b.detach())
    assert torch.equal(out.y, ref.detach())  # same RNG draws, same ops
    assert out.xa.shape == (10, r) and (out.rng_state is not None) == (p > 0)  # xa: (tokens, r)
    # the rebuilt output from the exact base part equals the forward output
    assert torch.equal(lora_reconstruct(meta, out.y_w, out.xa, b.detach()), out.y)
    torch.manual_seed(999)  # the backward must not depend on the global RNG: it redraws the mask
    dx, dbias, da, db = lora_linear_backward(
        meta, dy, x.detach(), out.xa, w, bb, a.detach(), b.detach(), out.rng_state,
        need_dbias=bias,
    )
    assert rel_err(dx, x.grad) <= 1e-6
    assert rel_err(da, a.grad) <= 1e-6 and rel_err(db, b.grad) <= 1e-6
    assert da.dtype == adapter_dtype and db.dtype == adapter_dtype and dx.dtype == x.dtype
    if bias:
        assert rel_err(dbias, bb.grad) <= 1e-6


def test_lora_linear_without_adapter_is_plain_linear():
    x = torch.randn(4, 6)
    w = torch.randn(5, 6)
    out = lora_linear_forward(LinearMeta("t"), x, w, None, None, None)
    assert torch.equal(out.y, F.linear(x, w)) and out.xa is None
    dx, _, da, db = lora_linear_backward(LinearMeta("t"), torch.ones(4, 5), None, None, w, None, None, None)
    assert torch.allclose(dx, torch.ones(4, 5) @ w) and da is None and db is None


def _hf_eager(q, k, v, mask, scaling):
    groups = q.shape[1] // k.shape[1]
    kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
    w = torch.matmul(q, kk.transpose(2, 3)) * scaling
    if mask is not None:
        w = w + mask
    w = torch.softmax(w, -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, vv).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1), w


def _qkv(b=2, h=6, hkv=2, s=9, d=8, seed=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda heads: torch.randn(b, heads, s, d, generator=gen).to(dtype).requires_grad_()  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


def _padding_mask(b, s, kind):
    keep = torch.ones(s, s, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    keep[1, :, :, :3] = False  # left padding of row 1 (fully masked query rows included)
    if kind == "bool":
        return keep
    return additive_mask(keep, torch.float32, s, s, "cpu", True)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (3, 1)])
def test_eager_attention_matches_autograd(mask_kind, heads):
    h, hkv = heads
    q, k, v = _qkv(h=h, hkv=hkv)
    b, s = q.shape[0], q.shape[2]
    mask = None if mask_kind == "none" else _padding_mask(b, s, mask_kind)
    ref_mask = additive_mask(mask, torch.float32, s, s, "cpu", True)
    scaling = q.shape[-1] ** -0.5
    ref_o, ref_p = _hf_eager(q, k, v, ref_mask, scaling)
    do = torch.randn_like(ref_o)
    ref_o.backward(do)
    o, probs = eager_attention_forward(q.detach(), k.detach(), v.detach(), mask, scaling)
    assert torch.allclose(o, ref_o.detach(), atol=1e-6) and torch.allclose(probs, ref_p.detach(), atol=1e-7)
    dq, dk, dv = eager_attention_backward(
        do.view(b, s, h, -1).transpose(1, 2), probs, q.detach(), k.detach(), v.detach(), scaling
    )
    assert dk.shape == k.shape and dv.shape == v.shape  # KV heads only, never repeated
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_sdpa_recompute_matches_autograd(mask_kind, heads):
    h, hkv = heads
    q, k, v = _qkv(h=h, hkv=hkv)
    b, s = q.shape[0], q.shape[2]
    mask = None if mask_kind == "none" else _padding_mask(b, s, "bool")
    scaling = q.shape[-1] ** -0.5
    ref = sdpa_attention_forward(q, k, v, mask, scaling)
    ref_eager, _ = _hf_eager(q.detach(), k.detach(), v.detach(), additive_mask(mask, torch.float32, s, s, "cpu", True), scaling)
    rows = torch.ones(b, s, dtype=torch.bool)
    if mask is not None:
        rows[1, :3] = False  # fully masked rows: sdpa and eager legitimately differ there
    assert torch.allclose(ref.detach()[rows], ref_eager[rows], atol=1e-5)
    do = torch.randn_like(ref)
    ref.backward(do)
    o, leaves = sdpa_attention_recompute(q.detach(), k.detach(), v.detach(), mask, scaling)
    assert torch.equal(o.detach(), ref.detach())
    grads = torch.autograd.grad(o, leaves, do)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-6
