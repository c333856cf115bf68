"""Chunked LM-head cross-entropy (hyclora.ops.chunked_ce) against the plain logits path."""

import pytest
import torch
import torch.nn.functional as F

from hyclora.ops.chunked_ce import auto_chunk_size, chunked_cross_entropy


def _plain(hidden, weight, labels, bias, reduction, upcast):
    logits = F.linear(hidden, weight, bias)
    logits = logits.float() if upcast else logits
    out = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction=reduction)
    return out.view(labels.shape) if reduction == "none" else out


def _case(dtype, with_bias=True, seed=0, shape=(3, 11), d=16, vocab=67):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, :4] = -100
    return hidden, weight, bias, labels


def _run(fn, hidden, weight, bias, labels, reduction):
    out = fn()
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    (out * upstream).sum().backward()
    params = [hidden, weight] + ([bias] if bias is not None else [])
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 33, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp64_equals_plain_loss_and_grads(reduction, chunk, with_bias):
    h, w, b, y = _case(torch.float64, with_bias)
    got = _run(lambda: chunked_cross_entropy(h, w, y, bias=b, chunk_size=chunk, reduction=reduction), h, w, b, y, reduction)
    want = _run(lambda: _plain(h, w, y, b, reduction, upcast=False), h, w, b, y, reduction)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    if reduction == "none":
        assert (got[0][y == -100] == 0).all()


def test_fp32_equals_hf_style_upcast_path():
    h, w, b, y = _case(torch.float32)
    got = _run(lambda: chunked_cross_entropy(h, w, y, bias=b, chunk_size=5), h, w, b, y, "mean")
    want = _run(lambda: _plain(h, w, y, b, "mean", upcast=True), h, w, b, y, "mean")
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_bf16_within_bf16_rounding_of_plain_path():
    h, w, b, y = _case(torch.bfloat16, with_bias=False, shape=(4, 64), d=32, vocab=128)
    got = _run(lambda: chunked_cross_entropy(h, w, y, chunk_size=16), h, w, None, y, "mean")
    want = _run(lambda: _plain(h, w, y, None, "mean", upcast=True), h, w, None, y, "mean")
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 loss
    gh, gw = got[1]
    eh, ew = want[1]
    assert gh.dtype == gw.dtype == torch.bfloat16
    # d hidden: computed in the forward for an incoming 1 and multiplied by the incoming gradient
    # in the backward (autograd scales before its bf16 matmul) -> within a bf16 ulp per element.
    # d W: per-chunk partial sums are rounded to bf16 before the fp32 accumulation -> within a
    # couple of bf16 ulps (measured 1.3 ulp of the max).
    assert ((gh.float() - eh.float()).abs() <= eh.float().abs() * 2 ** -7 + 2 ** -20).all()
    ulp = ew.abs().max().float() * 2 ** -8
    assert (gw.float() - ew.float()).abs().max() <= 3 * ulp


def test_bf16_hidden_grad_of_a_training_loss_equals_autograd_exactly():
    # a training loss gets an incoming gradient of 1: the gradient the forward computed ahead is then
    # bit for bit autograd's
    h, w, b, y = _case(torch.bfloat16, with_bias=False, shape=(4, 64), d=32, vocab=128)
    w.requires_grad_(False)
    chunked_cross_entropy(h, w, y, chunk_size=16).backward()
    got, h.grad = h.grad, None
    _plain(h, w, y, None, "mean", upcast=True).backward()
    torch.testing.assert_close(got, h.grad, rtol=0, atol=0)


def test_frozen_weight_gets_no_grad_and_hidden_grad_is_unchanged():
    h, w, b, y = _case(torch.float64, with_bias=False)
    w.requires_grad_(False)
    loss = chunked_cross_entropy(h, w, y, chunk_size=3)
    loss.backward()
    assert w.grad is None
    ref_h = h.detach().clone().requires_grad_()
    _plain(ref_h, w, y, None, "mean", upcast=False).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-10, atol=1e-12)


def test_all_ignored_mean_is_nan_like_torch():
    h, w, b, y = _case(torch.float64)
    y = torch.full_like(y, -100)
    assert torch.isnan(chunked_cross_entropy(h, w, y)) and torch.isnan(_plain(h, w, y, b, "mean", False))


def test_autocast_uses_the_autocast_dtype_consistently():
    h, w, b, y = _case(torch.float32, with_bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, y, chunk_size=8)
        ref = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()


def test_auto_chunk_size_bounds_logit_memory():
    assert auto_chunk_size(32000) * 32000 <= 1 << 24 < (auto_chunk_size(32000) + 1) * 32000
    assert auto_chunk_size(262208) == 256  # Gemma 3: a floor, so the LM-head weight is not read per few tokens


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(reduction="avg"), "reduction"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(labels=torch.zeros(3, 10, dtype=torch.long)), "labels of shape"),
        (dict(labels=torch.zeros(3, 11)), "int64"),
        (dict(weight=torch.zeros(0, 16, dtype=torch.float64)), "ZeRO-3"),
        (dict(bias=torch.zeros(3, dtype=torch.float64)), "bias"),
    ],
)
def test_bad_input_raises(kwargs, match):
    h, w, b, y = _case(torch.float64, with_bias=False)
    args = dict(hidden=h, weight=w, labels=y)
    args.update({k: v for k, v in kwargs.items() if k in args})
    extra = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        chunked_cross_entropy(args["hidden"], args["weight"], args["labels"], **extra)


def test_out_of_range_labels_are_refused_without_a_host_read():
    hidden, weight, bias, labels = _case(torch.float32)
    labels[1, 2] = weight.shape[0]  # one past the vocabulary
    with pytest.raises(RuntimeError, match=r"label ids must be in \[0, 67\) or ignore_index \(-100\)"):
        chunked_cross_entropy(hidden, weight, labels, bias=bias)


def test_a_second_backward_through_a_scalar_loss_is_refused_by_name():
    # the scalar reductions hand out, in the first backward, gradients computed in the forward
    hidden, weight, bias, labels = _case(torch.float32)
    loss = chunked_cross_entropy(hidden, weight, labels, bias=bias)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"second backward .*lm_loss='model'"):
        loss.backward()
