"""S²-Attn (hyclora.ops.s2attn) against a naive shift-group-attend-unshift reference, in fp64."""

import math

import pytest
import torch

from hyclora.ops.s2attn import (
    IndexMask,
    resolve_group_size,
    s2_attention,
    s2_attention_reference_mask,
)

F64 = torch.float64


def naive_s2attn(q, k, v, group_size, allowed=None):
    """Literal LongLoRA-style reference, one head / batch row / group at a time.

    Heads ``h//2 ..`` are shifted by ``G//2`` without wrap-around: their groups start at
    ``0, G - G//2, 2G - G//2, ...``. Inside a group: causal softmax attention, further restricted
    by ``allowed[b, i, j]`` if given. A query row with nothing visible outputs 0.
    """
    b, h, s, d = q.shape
    n_rep = h // k.shape[1]
    out = torch.zeros(b, h, s, v.shape[-1], dtype=q.dtype)
    for head in range(h):
        shift = 0 if head < h // 2 else group_size // 2
        bounds = sorted({0, s, *range(group_size - shift, s, group_size)})
        for a, e in zip(bounds[:-1], bounds[1:]):
            for row in range(b):
                scores = q[row, head, a:e] @ k[row, head // n_rep, a:e].T / math.sqrt(d)
                ok = torch.ones(e - a, e - a, dtype=torch.bool).tril()
                if allowed is not None:
                    ok = ok & allowed[row, a:e, a:e]
                p = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
                out[row, head, a:e] = p @ v[row, head // n_rep, a:e]
    return out


def _qkv(b, h, hk, s, d, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, hk, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, hk, s, d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _grads(fn, q, k, v, weight):
    out = fn(q, k, v)
    (out * weight).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


SHAPES = [
    # b, h, hk, s, d, group_size (None: ratio 1/4)
    (2, 4, 4, 32, 8, None),   # s divisible by G
    (1, 4, 2, 37, 8, None),   # s not divisible, GQA (aligned split)
    (2, 8, 1, 23, 4, None),   # MQA: K/V gathered per half
    (1, 6, 3, 19, 8, 5),      # odd G, GQA split falls inside a KV group
    (1, 5, 5, 16, 8, None),   # odd number of heads
    (1, 4, 2, 7, 8, 16),      # G larger than s: clipped to s
]


@pytest.mark.parametrize("b,h,hk,s,d,gs", SHAPES)
def test_matches_naive_reference_outputs_and_grads(b, h, hk, s, d, gs):
    q, k, v = _qkv(b, h, hk, s, d)
    G = resolve_group_size(s, 0.25, gs)
    w = torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    out, grads = _grads(lambda *t: s2_attention(*t, group_ratio=0.25, group_size=gs), q, k, v, w)
    ref, ref_grads = _grads(lambda *t: naive_s2attn(*t, G), q, k, v, w)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _padding(b, s):
    pm = torch.ones(b, s, dtype=torch.bool)
    pm[0, -5:] = False           # right padding
    if b > 1:
        pm[1, :3] = False        # left padding
    return pm


@pytest.mark.parametrize("form", ["2d", "dense_bool", "dense_float", "index"])
@pytest.mark.parametrize("b,h,hk,s,d,gs", [(2, 4, 2, 37, 8, None), (2, 6, 3, 22, 4, 6)])
def test_padded_batches_match_reference(form, b, h, hk, s, d, gs):
    q, k, v = _qkv(b, h, hk, s, d, seed=2)
    pm = _padding(b, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    dense = (pm[:, None, :] & causal)[:, None]
    mask = {
        "2d": pm,
        "dense_bool": dense,
        "dense_float": torch.zeros(b, 1, s, s, dtype=F64).masked_fill(~dense, float("-inf")),
        "index": IndexMask(lambda bi, hi, qi, ki: pm[bi, ki] & (ki <= qi), b, s),
    }[form]
    G = resolve_group_size(s, 0.25, gs)
    # The loss reads real tokens only (padding rows never reach a loss in training).
    w = torch.randn(b, h, s, d, dtype=F64) * pm[:, None, :, None]
    out, grads = _grads(
        lambda *t: s2_attention(*t, group_ratio=0.25, group_size=gs, attention_mask=mask), q, k, v, w
    )
    ref, ref_grads = _grads(lambda *t: naive_s2attn(*t, G, pm[:, None, :].expand(b, s, s)), q, k, v, w)
    valid = pm[:, None, :, None]
    torch.testing.assert_close(out * valid, ref * valid, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("form", ["2d", "index"])
def test_right_padding_takes_the_unmasked_fast_path(form, monkeypatch):
    # Right padding hides nothing from real tokens that causality does not: no mask is needed.
    b, h, hk, s, d = 3, 4, 2, 37, 8
    q, k, v = _qkv(b, h, hk, s, d, seed=8)
    pm = torch.ones(b, s, dtype=torch.bool)
    pm[0, -7:] = False
    pm[2, -20:] = False
    mask = pm if form == "2d" else IndexMask(lambda bi, hi, qi, ki: pm[bi, ki] & (ki <= qi), b, s, key_padding=pm)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    G = resolve_group_size(s, 0.25)
    w = torch.randn(b, h, s, d, dtype=F64) * pm[:, None, :, None]
    out, grads = _grads(lambda *t: s2_attention(*t, attention_mask=mask), q, k, v, w)
    assert calls and all(no_mask and causal for no_mask, causal in calls)
    ref, ref_grads = _grads(lambda *t: naive_s2attn(*t, G, pm[:, None, :].expand(b, s, s)), q, k, v, w)
    valid = pm[:, None, :, None]
    torch.testing.assert_close(out * valid, ref * valid, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # Left padding still needs the mask.
    calls.clear()
    s2_attention(q, k, v, attention_mask=pm.flip(1))
    assert not any(no_mask for no_mask, _ in calls)


def test_packed_documents_index_mask():
    # Three documents packed in one row: attention must not cross document boundaries.
    b, h, hk, s, d = 1, 4, 2, 40, 8
    seg = torch.tensor([0] * 9 + [1] * 20 + [2] * 11)
    q, k, v = _qkv(b, h, hk, s, d, seed=3)
    mask = IndexMask(lambda bi, hi, qi, ki: (seg[qi] == seg[ki]) & (ki <= qi), b, s)
    out = s2_attention(q, k, v, attention_mask=mask)
    allowed = (seg[:, None] == seg[None, :])[None]
    ref = naive_s2attn(q, k, v, resolve_group_size(s, 0.25), allowed)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_pattern_helper_and_dense_masked_attention_agree():
    # Second oracle: full attention with the per-head S²-Attn pattern as a mask.
    b, h, hk, s, d = 2, 4, 2, 29, 8
    q, k, v = _qkv(b, h, hk, s, d, seed=4)
    G = resolve_group_size(s, 0.25)
    pattern = s2_attention_reference_mask(s, h, G)
    kk, vv = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
    scores = (q @ kk.transpose(-1, -2)) / math.sqrt(d)
    ref = torch.softmax(scores.masked_fill(~pattern, float("-inf")), -1) @ vv
    torch.testing.assert_close(s2_attention(q, k, v), ref, rtol=0, atol=1e-12)
    # And the pattern really is sparse and shifted (not plain causal attention).
    assert not torch.equal(pattern[0], pattern[-1])
    assert pattern.sum() < torch.ones(s, s).tril().sum() * h


def test_fast_path_equals_masked_path_and_is_causal():
    b, h, hk, s, d = 2, 4, 4, 33, 8
    q, k, v = _qkv(b, h, hk, s, d, seed=5)
    fast = s2_attention(q, k, v)
    masked = s2_attention(q, k, v, attention_mask=torch.ones(b, s, dtype=torch.bool))
    torch.testing.assert_close(fast, masked, rtol=0, atol=1e-12)
    # Changing future tokens never changes earlier outputs (no wrap-around leak).
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    k2[:, :, 20:] += 1.0
    v2[:, :, 20:] -= 1.0
    torch.testing.assert_close(s2_attention(q2, k2, v2)[:, :, :20], fast[:, :, :20].detach(), rtol=0, atol=0)


def test_index_mask_never_builds_the_full_matrix():
    b, h, s, d = 1, 4, 64, 4
    q, k, v = _qkv(b, h, h, s, d, seed=6)
    sizes = []

    def predicate(bi, hi, qi, ki):
        res = ki <= qi
        sizes.append(torch.broadcast_shapes(bi.shape, qi.shape, ki.shape).numel())
        return res

    s2_attention(q, k, v, attention_mask=IndexMask(predicate, b, s))
    G = resolve_group_size(s, 0.25)
    assert sizes and max(sizes) <= (s // G + 1) * G * G < s * s


def test_bf16_close_to_fp32():
    b, h, hk, s, d = 1, 4, 2, 48, 16
    q, k, v = (t.detach() for t in _qkv(b, h, hk, s, d, seed=7, dtype=torch.float32))
    ref = s2_attention(q, k, v)
    out = s2_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 inputs + outputs: a few bf16 ulps (2**-8 relative) on O(1) values. Measured 0.0138.
    assert (out.float() - ref).abs().max() < 0.03


def test_group_size_resolution():
    assert resolve_group_size(8192, 0.25) == 2048
    assert resolve_group_size(37, 0.25) == 10
    assert resolve_group_size(3, 0.25) == 2
    assert resolve_group_size(1, 0.25) == 1
    assert resolve_group_size(100, 0.25, group_size=7) == 7
    assert resolve_group_size(5, None, group_size=64) == 5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(group_ratio=0.0), "group_ratio"),
        (dict(group_ratio=1.5), "group_ratio"),
        (dict(group_size=0), "group_size"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(attention_mask=torch.ones(2, 5, dtype=torch.bool)), "2-D attention_mask"),
        (dict(attention_mask=torch.ones(2, 1, 16, 15, dtype=torch.bool)), "4-D attention_mask"),
        (dict(attention_mask="causal"), "attention_mask must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    q, k, v = _qkv(2, 4, 2, 16, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        s2_attention(q, k, v, **kwargs)


def test_bad_shapes_raise_clear_errors():
    q, k, v = _qkv(1, 4, 3, 16, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        s2_attention(q, k, v)
    q, k, v = _qkv(1, 1, 1, 16, 8)
    with pytest.raises(ValueError, match="at least 2 query heads"):
        s2_attention(q, k, v)
    q, k, v = _qkv(1, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="no KV cache"):
        s2_attention(q, k[:, :, :8], v[:, :, :8])
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        s2_attention(q[0], k[0], v[0])
