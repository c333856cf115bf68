"""RMSNorm backward and renormalisation in row chunks: the same numbers as in one piece (the
chunking only bounds the fp32 temporaries), and both against autograd."""

from __future__ import annotations

import pytest
import torch

import hyclora.kernels.rmsnorm as rms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_one_piece_and_autograd(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 24, generator=gen).to(dtype)
    dy = torch.randn(3, 37, 24, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(24, generator=gen)).to(dtype)
    y, rstd = rms.rmsnorm_forward(x, w, 1e-6)
    whole = rms.rmsnorm_backward(dy, x, rstd, w, need_dx=True, need_dweight=True)
    assert torch.equal(rms.rmsnorm_from_rstd(x, rstd, w), y)  # bit-identical rebuild of the output

    monkeypatch.setattr(rms, "_CHUNK_ELEMENTS", 24 * 10)  # 10 rows per chunk: 12 chunks
    chunked = rms.rmsnorm_backward(dy, x, rstd, w, need_dx=True, need_dweight=True)
    assert torch.equal(chunked[0], whole[0])  # row-wise: bit-identical
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert torch.equal(rms.rmsnorm_from_rstd(x, rstd, w), y)

    # against autograd through transformers' formulation
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    yr, _ = rms.rmsnorm_forward(xr, wr, 1e-6)
    gx, gw = torch.autograd.grad(yr, (xr, wr), dy)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked[0], gx, **tol)
    torch.testing.assert_close(chunked[1], gw, **tol)
