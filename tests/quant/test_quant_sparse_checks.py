"""SparseProbs (top-k per row of attention probabilities) and check_finite."""

import math

import pytest
import torch

from hyclora.quant import SparseProbs, check_finite, densify_probs, sparsify_probs


def _probs(b=2, h=3, s=17, causal=True, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, s, s, generator=g) * 3
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1).to(dtype)


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_keeps_exactly_the_largest_entries_of_each_row(ratio, dtype):
    p = _probs(dtype=dtype)
    sp = sparsify_probs(p, ratio)
    k = math.ceil(ratio * 17)
    assert sp.values.shape == (2, 3, 17, k) and sp.indices.dtype == torch.int16
    d = densify_probs(sp)
    assert d.shape == p.shape and d.dtype == dtype
    kept = d != 0
    # kept entries are exact, everything else is 0
    assert torch.equal(d[kept], p[kept])
    # every kept value >= every dropped value of the same row (ties allowed)
    dropped_max = p.masked_fill(kept, float("-inf")).amax(-1)
    kept_min = p.masked_fill(~kept, float("inf")).amin(-1)
    nonzero_rows = kept.any(-1)
    assert torch.all(kept_min[nonzero_rows] >= dropped_max[nonzero_rows])
    # the kept mass equals the sum of the top-k
    topk_sum = p.float().topk(k, -1).values.sum(-1)
    assert torch.allclose(d.float().sum(-1), topk_sum, rtol=1e-3)


def test_ratio_edges_and_bytes():
    p = _probs(s=20, dtype=torch.float32)
    full = sparsify_probs(p, 1.0)
    assert torch.equal(densify_probs(full), p)
    none = sparsify_probs(p, 0.0)
    assert none.values.shape[-1] == 0 and torch.all(densify_probs(none) == 0)
    sp = sparsify_probs(p.bfloat16(), 0.1)
    assert sp.values.shape[-1] == 2  # ceil(0.1 * 20), no float round-up to 3
    assert sp.nbytes == 2 * 3 * 20 * 2 * (2 + 2)
    r = SparseProbs.restore(sp.tensors(), sp.meta())
    assert torch.equal(densify_probs(r), densify_probs(sp))


def test_long_rows_use_int32_indices():
    p = torch.rand(1, 1, 1, 40000)
    sp = sparsify_probs(p, 0.001)
    assert sp.indices.dtype == torch.int32
    assert torch.equal(densify_probs(sp).nonzero()[:, -1].sort().values,
                       p.topk(40, -1).indices.flatten().sort().values)


@pytest.mark.parametrize("p,ratio,exc,match", [
    (torch.rand(2, 3, 4), 0.1, ValueError, "batch, heads"),
    (torch.rand(1, 1, 2, 2), 1.5, ValueError, "ratio=1.5"),
    (torch.rand(1, 1, 2, 2), -0.1, ValueError, r"\[0, 1\]"),
    (torch.randint(0, 3, (1, 1, 2, 2)), 0.1, TypeError, "bf16/fp16/fp32"),
])
def test_bad_inputs(p, ratio, exc, match):
    with pytest.raises(exc, match=match):
        sparsify_probs(p, ratio)


def test_check_finite_names_the_place_and_the_fix():
    check_finite(torch.randn(4, 4), "layer 0 input")  # passes silently
    check_finite(torch.arange(3), "ints are never non-finite")
    x = torch.randn(4, 4, dtype=torch.bfloat16)
    x[1, 2] = float("nan")
    x[3, 3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"layers\.3\.mlp input: 1 NaN and 1 Inf") as err:
        check_finite(x, "layers.3.mlp input")
    assert "on_nonfinite='ignore'" in str(err.value) and "learning rate" in str(err.value)
