"""Long RoPE inputs outside autograd run in chunks of tokens (hyclora.kernels.rope): bit-identical values,
a token-major result (its (b, s, heads*d) reshape copies nothing), fewer live temporaries."""

import pytest
import torch

import hyclora.kernels.rope as rope
from hyclora.memory import measure_live_peak


@pytest.mark.parametrize("fn", [rope.apply_rope, rope.rope_backward])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_chunks_are_bit_identical(fn, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 37, 16, generator=gen).to(dtype)
    cos, sin = (torch.randn(2, 37, 16, generator=gen).to(dtype) for _ in range(2))
    whole = fn(x, cos, sin)
    monkeypatch.setattr(rope, "_CHUNK_ELEMENTS", 2 * 4 * 5 * 16)  # 5 tokens per chunk
    chunked = fn(x, cos, sin)
    assert torch.equal(chunked, whole)
    assert chunked.transpose(1, 2).is_contiguous()  # token-major
    # under autograd: one differentiable piece
    xr = x.clone().requires_grad_(True)
    assert fn(xr, cos, sin).requires_grad and fn(xr, cos, sin).is_contiguous()


def test_token_chunks_hold_fewer_temporaries(monkeypatch):
    x = torch.randn(1, 8, 1024, 32)
    cos, sin = torch.randn(1, 1024, 32), torch.randn(1, 1024, 32)
    full = x.numel() * x.element_size()
    whole = measure_live_peak(lambda: rope.apply_rope(x, cos, sin), snapshot=False)[1].peak_bytes
    monkeypatch.setattr(rope, "_CHUNK_ELEMENTS", x.numel() // 16)
    chunked = measure_live_peak(lambda: rope.apply_rope(x, cos, sin), snapshot=False)[1].peak_bytes
    assert whole >= 3 * full and chunked < 1.5 * full, (whole / full, chunked / full)
