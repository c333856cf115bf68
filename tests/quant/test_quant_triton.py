"""Triton kernels against the torch reference: identical codes and identical dequantised values.

On CPU these run under TRITON_INTERPRET=1 (set by `make test`); on a CUDA machine they run the
compiled kernels (dequantised values then agree to one fp32 rounding).
"""

import pytest
import torch

from hyclora.quant import ChannelStats, dequantize, quantize
from hyclora.quant.core import affine_params, quantize_pack_torch

from helpers.kernels import DEVICE, needs_triton

pytestmark = needs_triton
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _acts(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(*shape, generator=g) * (torch.rand(n, generator=g) * 3 + 0.1) \
        + torch.randn(n, generator=g) * 4
    return x.to(dtype).to(DEVICE)


def _same_values(a, b):
    if DEVICE == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=2e-7 if a.dtype == torch.float32 else 1e-2, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1), (3, 7), (2, 3, 33), (4, 100), (1, 257), (33, 64)])
def test_kernels_match_reference(bits, dtype, shape):
    x = _acts(shape, dtype, seed=hash((bits, shape)) % 1000)
    qt = quantize(x, bits, backend="triton")
    qr = quantize(x, bits, backend="torch")
    assert qt.codes.shape == qr.codes.shape
    assert torch.equal(qt.codes, qr.codes)
    yt = dequantize(qr, backend="triton")
    assert yt.dtype == dtype and yt.shape == x.shape
    assert _same_values(yt, dequantize(qr, backend="torch"))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_exact_ties_round_the_same_way(bits):
    # values exactly on half-steps: lo = 0, step = 1 -> x = c + 0.5 must round up in both
    qmax = 2**bits - 1
    x = torch.arange(0, qmax + 0.5, 0.5, dtype=torch.float32).unsqueeze(0).repeat(3, 1).t()
    x = x.contiguous().to(DEVICE)
    lo, step, inv = affine_params(torch.zeros(3, device=DEVICE), torch.full((3,), float(qmax), device=DEVICE), bits)
    from hyclora.quant import triton_kernels

    assert torch.equal(triton_kernels.quantize_pack(x, lo, inv, bits), quantize_pack_torch(x, lo, inv, bits))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_with_outliers_and_stats(bits, dtype):
    x = _acts((2, 9, 40), dtype, seed=7)
    x[..., 5] *= 300
    s_t = ChannelStats(40, num_outliers=3, iteration_threshold=1).to(DEVICE)
    s_r = ChannelStats(40, num_outliers=3, iteration_threshold=1).to(DEVICE)
    for step in range(2):  # calibrating, then frozen (values outside the range are clamped)
        xi = x * (1 + step)
        qt = quantize(xi, bits, stats=s_t, backend="triton")
        qr = quantize(xi, bits, stats=s_r, backend="torch")
        assert torch.equal(qt.outlier_idx, qr.outlier_idx) and 5 in qt.outlier_idx.tolist()
        assert torch.equal(qt.codes, qr.codes)
        yt, yr = dequantize(qt, backend="triton"), dequantize(qr, backend="torch")
        assert _same_values(yt, yr)
        assert torch.equal(yt[..., qt.outlier_idx], xi[..., qt.outlier_idx])


@pytest.mark.parametrize("group", [8, 7, 100])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_kernels_match_reference(group, bits):
    x = _acts((6, 100), torch.bfloat16, seed=group)
    qt = quantize(x, bits, group_size=group, backend="triton")
    qr = quantize(x, bits, group_size=group, backend="torch")
    assert torch.equal(qt.codes, qr.codes)
    assert _same_values(dequantize(qr, backend="triton"), dequantize(qr, backend="torch"))


def test_strided_rows_are_handled():
    x = _acts((10, 48), torch.float16, seed=3)[:, :33]  # row stride 48, width 33
    assert torch.equal(quantize(x, 4, backend="triton").codes, quantize(x, 4, backend="torch").codes)


@pytest.mark.parametrize("config", [(2, 8, 4), (4, 16, 4, 2), (1, 32, 4, 3)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_small_tiles_cover_every_edge(config, bits):
    # many programs in both grid dimensions, partial tiles at the row and column ends
    from hyclora.quant import triton_kernels

    x = _acts((5, 37), torch.bfloat16, seed=bits).reshape(5, 37)
    lo, hi = torch.aminmax(x, dim=0)
    lo, step, inv = affine_params(lo, hi, bits)
    ref = quantize_pack_torch(x, lo, inv, bits)
    assert torch.equal(triton_kernels.quantize_pack(x, lo, inv, bits, config=config), ref)
    from hyclora.quant.core import unpack_dequantize_torch

    y = triton_kernels.unpack_dequantize(ref, lo, step, bits, 37, torch.bfloat16, config=config)
    assert _same_values(y, unpack_dequantize_torch(ref, lo, step, bits, 37, torch.bfloat16))


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (70, 33), (300, 100), (129, 260)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_minmax_matches_torch(shape, dtype):
    from hyclora.quant import triton_kernels

    x = _acts(shape, dtype, seed=shape[0])
    lo, hi = triton_kernels.column_minmax(x)
    ref_lo, ref_hi = torch.aminmax(x, dim=0)
    assert lo.dtype == torch.float32 and torch.equal(lo, ref_lo.float()) and torch.equal(hi, ref_hi.float())
    # several programs per column block (partials reduced by torch), strided rows
    xs = _acts((shape[0], shape[1] + 5), dtype, seed=1)[:, : shape[1]]
    lo, hi = triton_kernels.column_minmax(xs, programs_per_column_block=3)
    assert torch.equal(lo, xs.float().amin(0)) and torch.equal(hi, xs.float().amax(0))
