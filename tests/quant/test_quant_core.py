"""quantize / dequantize / QuantizedTensor on the pure-torch path (the oracle for the kernels)."""

import math

import os
import subprocess
import sys

import pytest
import torch

from hyclora.quant import QuantizedTensor, dequantize, packed_width, quantize
from hyclora.quant.core import pack_codes, unpack_codes

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = [2, 4, 8]
# half an ulp of the output dtype, relative (the dequantised value is rounded to it)
REL_ROUND = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


def _acts(shape, dtype, seed=0):
    """Channels with different centres and spreads (not centred on 0), like real activations."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    centre = torch.randn(n, generator=g) * 3
    spread = torch.rand(n, generator=g) * 2 + 0.05
    x = torch.randn(*shape, generator=g) * spread + centre
    return x.to(dtype)


def _roundtrip_bound(x, q):
    """|x_hat - x| <= step/2 (+ fp32 arithmetic + rounding of x_hat to the output dtype)."""
    step = q.step if q.group_size is None else q.step.repeat_interleave(q.group_size, 1)[:, : q.width]
    step = step.reshape((1,) * (x.dim() - 1) + (-1,)) if q.group_size is None else step.view(x.shape)
    return step / 2 * (1 + 1e-5) + x.float().abs() * REL_ROUND[x.dtype] + 1e-30


def test_pack_layout_is_adjacent_lsb_first():
    codes = torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8)
    # byte 0 = 1 | 2<<2 | 3<<4 | 0<<6 ; byte 1 = 1 (zero-padded)
    assert pack_codes(codes, 2).tolist() == [[1 + (2 << 2) + (3 << 4), 1]]
    codes4 = torch.tensor([[5, 12, 9]], dtype=torch.uint8)
    assert pack_codes(codes4, 4).tolist() == [[5 + (12 << 4), 9]]
    for bits in BITS:
        c = torch.randint(0, 2**bits, (3, 37), dtype=torch.uint8)
        p = pack_codes(c, bits)
        assert p.shape == (3, packed_width(37, bits))
        assert torch.equal(unpack_codes(p, bits, 37), c)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1), (3, 7), (2, 3, 33), (4, 100), (100,)])
def test_roundtrip_within_half_step(bits, dtype, shape):
    x = _acts(shape, dtype)
    q = quantize(x, bits, backend="torch")
    y = dequantize(q, backend="torch")
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (y.float() - x.float()).abs()
    assert torch.all(err <= _roundtrip_bound(x, q))
    # the extremes of every channel are on the grid: min and max come back (to output rounding)
    x2, y2 = x.float().reshape(-1, shape[-1]), y.float().reshape(-1, shape[-1])
    tol = x2.abs().amax(0) * REL_ROUND[dtype] * 2 + 1e-6
    assert torch.all((y2.amin(0) - x2.amin(0)).abs() <= tol)
    assert torch.all((y2.amax(0) - x2.amax(0)).abs() <= tol)


def test_codes_match_an_independent_float64_reference():
    x = _acts((64, 33), torch.float32, seed=1)
    for bits in BITS:
        q = quantize(x, bits, backend="torch")
        codes = unpack_codes(q.codes, bits, 33).long()
        lo, hi = x.double().amin(0), x.double().amax(0)
        ref = torch.floor((x.double() - lo) / ((hi - lo) / (2**bits - 1)) + 0.5)
        # fp32 vs fp64 may disagree only on exact ties: allow a vanishing fraction, never > 1 code
        diff = (codes - ref.long()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_asymmetric_channel_is_not_clipped():
    # The reference's zero-centred grid clips [0, 10] at 2 bits to 3.3; with a zero point the
    # whole range survives.
    x = torch.linspace(0, 10, 50, dtype=torch.float32).unsqueeze(1)
    y = dequantize(quantize(x, 2, backend="torch"))
    assert y.max().item() == pytest.approx(10.0)
    assert (y - x).abs().max().item() <= 10 / 3 / 2 * (1 + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channel_comes_back_exactly(dtype):
    x = _acts((6, 5), dtype)
    x[:, 2] = 3.140625
    x[:, 4] = -0.0
    for bits in BITS:
        q = quantize(x, bits, backend="torch")
        y = dequantize(q)
        assert torch.equal(y[:, 2], x[:, 2]) and torch.equal(y[:, 4], x[:, 4])
        assert q.step[2].item() == 0


@pytest.mark.parametrize("bits", BITS)
def test_outlier_columns_exact_and_harmless(bits):
    x = _acts((4, 9, 40), torch.bfloat16, seed=3)
    idx = torch.tensor([0, 17, 39])
    x[..., idx] *= 1000
    q = quantize(x, bits, outlier_idx=idx, backend="torch")
    y = dequantize(q)
    assert torch.equal(y[..., idx], x[..., idx])
    assert q.outlier_vals.shape == (36, 3) and q.outlier_vals.dtype == x.dtype
    # the other columns quantise exactly as without the outliers (per-channel: no cross-talk)
    rest = torch.tensor([c for c in range(40) if c not in idx.tolist()])
    q_rest = quantize(x[..., rest], bits, backend="torch")
    assert torch.equal(y[..., rest], dequantize(q_rest))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nbytes_is_the_theoretical_count(bits, dtype):
    shape, k = (3, 5, 33), 2
    x = _acts(shape, dtype)
    rows, n = 15, 33
    q = quantize(x, bits, outlier_idx=torch.tensor([3, 30]), backend="torch")
    esize = torch.tensor([], dtype=dtype).element_size()
    codes = rows * math.ceil(n * bits / 8)
    assert q.codes.numel() == codes and q.codes.dtype == torch.uint8
    assert q.nbytes == codes + 2 * 4 * n + 8 * k + rows * k * esize
    q0 = quantize(x, bits, backend="torch")
    assert q0.nbytes == codes + 2 * 4 * n


class _SaveQuantized(torch.autograd.Function):
    """y = x @ w, saving x quantised: grad_w uses the dequantised copy."""

    @staticmethod
    def forward(ctx, x, w, bits):
        q = quantize(x, bits)
        ctx.save_for_backward(w, *q.tensors())
        ctx.qmeta = q.meta()
        return x @ w

    @staticmethod
    def backward(ctx, gy):
        w, *qt = ctx.saved_tensors
        xh = dequantize(QuantizedTensor.restore(qt, ctx.qmeta))
        return gy @ w.t(), xh.reshape(-1, xh.shape[-1]).t() @ gy.reshape(-1, gy.shape[-1]), None


def test_save_for_backward_roundtrip():
    x = _acts((2, 3, 8), torch.float32).requires_grad_()
    w = torch.randn(8, 4, requires_grad=True)
    _SaveQuantized.apply(x, w, 8).sum().backward()
    ref_w = (x.detach().reshape(-1, 8).t() @ torch.ones(6, 4))
    # 8-bit: grad_w within the quantisation error of x times the number of rows
    q = quantize(x.detach(), 8)
    assert torch.allclose(w.grad, ref_w, atol=float(q.step.max()) / 2 * 6 + 1e-5)
    assert torch.allclose(x.grad, torch.ones(2, 3, 4) @ w.detach().t())
    r = QuantizedTensor.restore(q.tensors(), q.meta())
    assert torch.equal(dequantize(r), dequantize(q)) and r.nbytes == q.nbytes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [4, 7, 33])
def test_group_quantisation_within_half_step(bits, group):
    x = _acts((6, 33), torch.bfloat16, seed=5)
    q = quantize(x, bits, group_size=group, backend="torch")
    ng = math.ceil(33 / group)
    assert q.lo.shape == (6, ng) and q.step.shape == (6, ng)
    assert q.nbytes == 6 * packed_width(33, bits) + 2 * 4 * 6 * ng
    err = (dequantize(q).float() - x.float()).abs()
    assert torch.all(err <= _roundtrip_bound(x, q))


def test_group_outliers_do_not_widen_their_group():
    x = _acts((4, 16), torch.float32, seed=6)
    x[:, 5] = 1e4
    idx = torch.tensor([5])
    q = quantize(x, 4, group_size=8, outlier_idx=idx, backend="torch")
    y = dequantize(q)
    assert torch.equal(y[:, 5], x[:, 5])
    ref = x.clone()
    ref[:, 5] = ref[:, 4]  # same group without the outlier column
    assert torch.allclose(q.lo[:, 0], ref[:, :8].amin(1)) and torch.allclose(
        q.lo[:, 0] + q.step[:, 0] * 15, ref[:, :8].amax(1), rtol=1e-5)


def test_non_contiguous_input():
    x = _acts((8, 12), torch.float32).t()  # (12, 8), non-contiguous
    assert torch.equal(dequantize(quantize(x, 4)), dequantize(quantize(x.contiguous(), 4)))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(bits=3), ValueError, "bits=3"),
        (dict(bits=16), ValueError, "2, 4 or 8"),
        (dict(bits=True), ValueError, "bits=True"),
        (dict(backend="cuda"), ValueError, "backend='cuda'"),
        (dict(group_size=0), ValueError, "group_size=0"),
        (dict(outlier_idx=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "torch.long"),
        (dict(outlier_idx=torch.arange(9)), ValueError, "width 8"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    x = torch.randn(3, 8)
    bits = kwargs.pop("bits", 4)
    with pytest.raises(exc, match=match):
        quantize(x, bits, **kwargs)


@pytest.mark.parametrize("x,match", [
    (torch.arange(12).reshape(3, 4), "dtype torch.int64"),
    (torch.randn(3, 4, dtype=torch.float64), "float64"),
    (torch.tensor(1.0), "scalar"),
    (torch.empty(0, 4), "empty"),
    ([1.0, 2.0], "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(x, match):
    with pytest.raises((TypeError, ValueError), match=match):
        quantize(x, 4)


def test_forcing_triton_on_cpu_without_interpreter_says_how():
    # the environment is read once at import: a fresh interpreter without TRITON_INTERPRET
    code = ("import torch, hyclora.quant as q\n"
            "try:\n    q.quantize(torch.randn(2, 4), 4, backend='triton')\n"
            "except RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "TRITON_INTERPRET=1" in out and "backend='torch'" in out


def test_affine_params_and_group_range_equal_the_plain_formulas():
    # The fast forms (scalar where, reciprocal, one aminmax on the input dtype) must give the
    # same bits as the plain definitions, or stored codes would change.
    from hyclora.quant.core import _FP32_TINY, _group_range, affine_params

    lo = torch.tensor([0.0, 0.0, 1.0, 0.0, -3.0, 0.0, float("inf")])
    hi = torch.tensor([0.0, 1e-40, 1.0, 3e-36, 5.0, float("nan"), float("-inf")])
    for bits in (2, 4, 8):
        step = (hi - lo) / ((1 << bits) - 1)
        ok = step >= _FP32_TINY
        want_step = torch.where(ok, step, torch.zeros_like(step))
        want_inv = torch.where(ok, 1.0 / torch.where(ok, step, torch.ones_like(step)), torch.zeros_like(step))
        _, got_step, got_inv = affine_params(lo, hi, bits)
        assert torch.equal(got_step, want_step) and torch.equal(got_inv, want_inv)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, g in ((64, 64), (100, 64), (7, 5), (130, 16)):
            x = (torch.randn(9, n) * 50).to(dtype)
            x[2] = 0
            pad = (-n) % g
            xf = x.float()
            want_lo = torch.nn.functional.pad(xf, (0, pad), value=float("inf")).view(9, -1, g).amin(-1)
            want_hi = torch.nn.functional.pad(xf, (0, pad), value=float("-inf")).view(9, -1, g).amax(-1)
            got_lo, got_hi = _group_range(x, g, None)
            assert got_lo.dtype == torch.float32
            assert torch.equal(got_lo, want_lo) and torch.equal(got_hi, want_hi)
