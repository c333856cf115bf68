"""Triton RoPE (hyclora.kernels.rope, backend='triton'): one kernel pass against the torch ops, bit for
bit (fp32 and bf16), in the token-major layout of the chunked path. Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import hyclora.kernels.rope as rope

from helpers.kernels import INTERPRET, compile_for_sm90

if importlib.util.find_spec("triton") is None or not INTERPRET:
    pytest.skip("Triton RoPE tests run on CPU tensors under TRITON_INTERPRET=1", allow_module_level=True)

FNS = {"forward": rope.apply_rope, "backward": rope.rope_backward}


def _inputs(b, heads, s, d, dtype, cos_batch, token_major, seed=0, cos_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    if token_major:  # the blocks' layout: a head-major view of the projection's (b, s, heads, d)
        x = torch.randn(b, s, heads, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(b, heads, s, d, generator=gen).to(dtype)
    # the model's tables: cat((freqs, freqs)) of position angles
    pos = torch.arange(s, dtype=torch.float32)[None, :, None] + torch.arange(cos_batch)[:, None, None] * 3.0
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.cat((pos * inv, pos * inv), dim=-1)
    ct = cos_dtype or dtype
    return x, ang.cos().to(ct), ang.sin().to(ct)


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 37, 16), (1, 2, 5, 128)])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("token_major", [True, False])
def test_bit_identical_to_torch(which, dtype, shape, per_batch, token_major, monkeypatch):
    b, heads, s, d = shape
    x, cos, sin = _inputs(b, heads, s, d, dtype, b if per_batch else 1, token_major)
    fn = FNS[which]
    ref = fn(x, cos, sin)
    for name in ("_rope", "_rope_backward"):  # the kernel, not a fallback to the torch ops
        monkeypatch.setattr(rope, name, None)
    out = fn(x, cos, sin, backend="triton")
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    assert out.transpose(1, 2).is_contiguous()  # token-major: (b, s, heads * d) reshape copies nothing
    assert torch.equal(out, ref)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_odd_layouts(which):
    fn = FNS[which]
    b, heads, s, d = 2, 3, 11, 32
    # x with a non-unit last stride; cos/sin non-contiguous in the last dim and of another dtype
    # (the output is promoted); per-batch tables as expanded views
    x = torch.randn(b, s, heads, 2 * d)[..., ::2].transpose(1, 2)
    _, cos, sin = _inputs(b, heads, s, 2 * d, torch.float32, 1, True)
    cos, sin = cos.to(torch.bfloat16)[..., ::2], sin.to(torch.bfloat16)[..., ::2]
    assert cos.stride(-1) != 1
    out = fn(x, cos, sin, backend="triton")
    assert out.dtype == torch.float32 and torch.equal(out, fn(x, cos, sin))
    cos_e, sin_e = cos.expand(b, s, d), sin.expand(b, s, d)
    assert torch.equal(fn(x.bfloat16(), cos_e, sin_e, backend="auto"), fn(x.bfloat16(), cos_e, sin_e))


def test_adjoint():
    b, heads, s, d = 2, 3, 37, 16
    x, cos, sin = _inputs(b, heads, s, d, torch.float32, b, True)
    g = torch.randn(b, heads, s, d, generator=torch.Generator().manual_seed(1))
    lhs = (rope.apply_rope(x, cos, sin, backend="triton").double() * g.double()).sum()
    rhs = (x.double() * rope.rope_backward(g, cos, sin, backend="triton").double()).sum()
    assert abs(float(lhs - rhs)) <= 1e-5 * float((x.double().abs() * g.double().abs()).sum())


def test_fallbacks_and_errors():
    x, cos, sin = _inputs(1, 2, 5, 16, torch.float32, 1, True)
    with pytest.raises(ValueError, match="torch.*triton.*auto"):
        rope.apply_rope(x, cos, sin, backend="cuda")
    with pytest.raises(ValueError, match="torch.*triton.*auto"):
        rope.rope_backward(x, cos, sin, backend="")
    # odd head_dim: the torch ops
    xo, co, so = x[..., :15], cos[..., :15], sin[..., :15]
    assert torch.equal(rope.apply_rope(xo, co, so, backend="triton"), rope.apply_rope(xo, co, so))
    # under autograd the torch ops (differentiable); the values agree
    xr = x.clone().requires_grad_(True)
    out = rope.apply_rope(xr, cos, sin, backend="triton")
    assert out.requires_grad and torch.equal(out.detach(), rope.apply_rope(x, cos, sin, backend="triton"))
    # empty inputs
    xe = torch.empty(1, 2, 0, 16)
    assert rope.apply_rope(xe, cos[:, :0], sin[:, :0], backend="triton").shape == xe.shape


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The kernel compiles ahead of time for sm_90 (no GPU needed) at head_dim 128 and 64, bf16
    and fp32, forward and backward, with the GPU tile of _blocks, and keeps everything in registers."""
    from hyclora.kernels import rope

    cases = []
    for half in (64, 32):
        for dt in ("bf16", "fp32"):
            for backward in (False, True):
                block_m = max(1, (4 * 32 * 8) // max(16, 1 << (half - 1).bit_length()))
                cases.append(dict(module="hyclora.kernels.rope", kernel="_rope_kernel",
                                  ptrs=dict(x_ptr=dt, cos_ptr=dt, sin_ptr=dt, out_ptr=dt), floats=[],
                                  consts=dict(BACKWARD=backward, RNE=False, BLOCK_M=block_m,
                                              BLOCK_H=max(16, 1 << (half - 1).bit_length())),
                                  warps=4, tag=[half, dt, backward]))
    assert rope._rope_kernel is not None
    for tag, regs, stack, local in compile_for_sm90(cases, tmp_path):
        assert local == 0 and stack == 0, (tag, regs, stack)
