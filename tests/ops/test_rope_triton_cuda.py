"""The Triton RoPE kernel on a CUDA device against the torch ops (the interpreter tests in
test_rope_triton.py cannot run the compiled kernel): bf16 at Llama-2-7B's head shape, as the
attention block calls it (a head-major view of the projection's token-major output)."""

from __future__ import annotations

import pytest
import torch

from hyclora.kernels.rope import apply_rope, rope_backward

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("s", [4096, 4100])
@pytest.mark.parametrize("fn", [apply_rope, rope_backward])
def test_cuda_kernel_equals_the_torch_ops(s, fn):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, s, 32, 128, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
    pos = torch.arange(s, device="cuda", dtype=torch.float32)[None, :, None]
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2, device="cuda", dtype=torch.float32) / 128))
    ang = torch.cat((pos * inv, pos * inv), dim=-1)
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    got, ref = fn(x, cos, sin, backend="triton"), fn(x, cos, sin, backend="torch")
    assert got.shape == ref.shape and got.transpose(1, 2).is_contiguous()
    # enable_fp_fusion=False and per-product rounding: the torch ops' bits are expected; allow one
    # bf16 ulp in case the device rounds a product differently
    diff = (got.float() - ref.float()).abs()
    assert float((diff > ref.float().abs() * 2 ** -7 + 1e-6).float().mean()) == 0.0
