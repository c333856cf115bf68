"""hyclora.ops.attention's dispatch (attention_forward / attention_recompute / block_attention_mask)
for the S²-Attn implementation name, against hyclora.ops.s2attn.s2_attention and plain autograd."""

import pytest
import torch

from hyclora.ops.attention import (
    SUPPORTED_IMPLEMENTATIONS,
    attention_forward,
    attention_recompute,
    block_attention_mask,
    check_implementation,
    sdpa_attention_forward,
)
from hyclora.ops.s2attn import S2ATTN_NAME, IndexMask, s2_attention

F64 = torch.float64


def _qkv(b=2, h=4, hk=2, s=30, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, s, d, generator=g, dtype=F64), torch.randn(b, hk, s, d, generator=g, dtype=F64),
            torch.randn(b, hk, s, d, generator=g, dtype=F64))


def _causal_padding(pad):
    keep = pad.bool()
    return lambda b, h, q, kv: (kv <= q) & keep[b, kv]


def test_s2_name_is_supported():
    assert S2ATTN_NAME in SUPPORTED_IMPLEMENTATIONS
    check_implementation(S2ATTN_NAME)
    with pytest.raises(ValueError, match="flash_attention_2.*not supported"):
        check_implementation("flash_attention_2")


@pytest.mark.parametrize("ratio,size", [(0.25, None), (0.5, None), (None, 6)])
def test_forward_and_recompute_equal_s2_attention(ratio, size):
    # s = 30: no group size here divides it (G = 8, 15 -> 15 does, so 0.5 covers the even case).
    q, k, v = _qkv()
    b, h, s, d = q.shape
    pad = torch.ones(b, s, dtype=torch.long)
    pad[1, :4] = 0  # left padding
    scaling = 0.3
    got = attention_forward(S2ATTN_NAME, q, k, v, pad, scaling, True, ratio, size)
    ref = s2_attention(q, k, v, group_ratio=ratio, group_size=size, attention_mask=pad, scaling=scaling)
    assert got.shape == (b, s, h * d)
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(b, s, h * d), rtol=0, atol=0)

    # The recompute differentiates the same function: its gradients equal autograd through s2_attention.
    do = torch.randn(b, s, h * d, generator=torch.Generator().manual_seed(5), dtype=F64)
    do = do * pad[..., None]  # padding rows never reach a loss
    o_re, leaves = attention_recompute(S2ATTN_NAME, q, k, v, pad, scaling, True, ratio, size)
    torch.testing.assert_close(o_re.detach(), got, rtol=0, atol=0)
    grads = torch.autograd.grad(o_re, leaves, do)
    refs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = s2_attention(*refs, group_ratio=ratio, group_size=size, attention_mask=pad, scaling=scaling)
    ref_grads = torch.autograd.grad(out.transpose(1, 2).reshape(b, s, h * d), refs, do)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_s2_differs_from_full_attention():
    # Guards the tests above: if the dispatch ignored the S² name they would still pass only if
    # S²-Attn equalled full attention, which it does not past the first group.
    q, k, v = _qkv()
    full = sdpa_attention_forward(q, k, v, None, 0.3, True)
    s2 = attention_forward(S2ATTN_NAME, q, k, v, None, 0.3, True)
    g = 8  # ceil(30 / 4)
    torch.testing.assert_close(s2[:, : g // 2], full[:, : g // 2])  # shifted heads' first segment = full
    assert (s2[:, g:] - full[:, g:]).abs().max() > 1e-2


def test_sdpa_and_eager_dispatch_unchanged():
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 30, 30, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False
    mask[1, :, :3, 0] = True  # keep every row non-empty
    for impl in ("sdpa", "eager"):
        got = attention_forward(impl, q, k, v, mask, 0.3, True)
        torch.testing.assert_close(got, sdpa_attention_forward(q, k, v, mask, 0.3, True))


def test_bad_calls_raise_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="causal"):
        attention_forward(S2ATTN_NAME, q, k, v, None, 0.3, False)
    with pytest.raises(ValueError, match="whole sequences"):
        attention_forward(S2ATTN_NAME, q[:, :, :1], k, v, None, 0.3, True)
    with pytest.raises(ValueError, match="not supported"):
        attention_forward("flex_attention", q, k, v, None, 0.3, True)
    with pytest.raises(ValueError, match="group_ratio"):
        attention_forward(S2ATTN_NAME, q, k, v, None, 0.3, True, 1.5)


def test_block_mask_right_padding_needs_none_left_padding_keeps_2d():
    b, s = 2, 12
    right = torch.ones(b, s, dtype=torch.long)
    right[0, -3:] = 0
    lazy = IndexMask(_causal_padding(right), b, s, key_padding=right.bool())
    assert block_attention_mask(S2ATTN_NAME, lazy, "layer") is None  # causal already hides right padding

    left = torch.ones(b, s, dtype=torch.long)
    left[1, :3] = 0
    lazy = IndexMask(_causal_padding(left), b, s, key_padding=left.bool())
    got = block_attention_mask(S2ATTN_NAME, lazy, "layer")
    assert got.shape == (b, s) and torch.equal(got, left.bool())


def test_block_mask_general_predicate_becomes_dense_once():
    b, s = 2, 10
    seg = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])  # packed documents
    pred = lambda bi, h, qi, ki: (ki <= qi) & (seg[bi, qi] == seg[bi, ki])  # noqa: E731
    lazy = IndexMask(pred, b, s)
    dense = block_attention_mask(S2ATTN_NAME, lazy)
    t = torch.arange(s)
    ref = (t[None, :, None] >= t[None, None, :]) & (seg[:, :, None] == seg[:, None, :])
    assert dense.shape == (b, 1, s, s) and torch.equal(dense[:, 0], ref)
    assert block_attention_mask(S2ATTN_NAME, lazy) is dense  # shared by every layer of a forward
    # S²-Attn on the dense mask equals S²-Attn on the lazy one.
    q, k, v = _qkv(b=b, s=s)
    torch.testing.assert_close(
        attention_forward(S2ATTN_NAME, q, k, v, dense, 0.3, True),
        attention_forward(S2ATTN_NAME, q, k, v, IndexMask(pred, b, s), 0.3, True),
        rtol=1e-12, atol=1e-12,
    )


def test_block_mask_rejects_what_the_block_cannot_save():
    lazy = IndexMask(lambda b, h, q, k: k <= q, 1, 4)
    with pytest.raises(ValueError, match="4-D mask"):
        block_attention_mask("sdpa", lazy, "model.layers.0")  # a lazy mask without S²-Attn
    with pytest.raises(ValueError, match="model.layers.0"):
        block_attention_mask("sdpa", torch.ones(1, 4, dtype=torch.bool), "model.layers.0")
    four_d = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert block_attention_mask("sdpa", four_d) is four_d
    assert block_attention_mask(S2ATTN_NAME, four_d) is four_d
    assert block_attention_mask("eager", None) is None
