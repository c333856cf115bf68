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


def _check_topk(p, d, groups):
    """d keeps exactly the largest entries of p within each group (ties allowed), values exact."""
    kept = d != 0
    assert torch.equal(d[kept], p[kept])
    pg, kg = p.reshape(groups, -1).float(), kept.reshape(groups, -1)
    dropped_max = pg.masked_fill(kg, float("-inf")).amax(-1)
    kept_min = pg.masked_fill(~kg, float("inf")).amin(-1)
    has = kg.any(-1)
    assert torch.all(kept_min[has] >= dropped_max[has])


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scope", ["global", "head", "row"])
def test_keeps_exactly_the_largest_entries(ratio, dtype, scope):
    p = _probs(dtype=dtype)
    sp = sparsify_probs(p, ratio, scope=scope)
    numel = p.numel()
    expected = {"global": math.ceil(ratio * numel - 1e-9),
                "head": 6 * math.ceil(ratio * 17 * 17 - 1e-9),
                "row": 6 * 17 * math.ceil(ratio * 17 - 1e-9)}[scope]
    assert sp.kept == expected and sp.cols.dtype == torch.int16
    d = densify_probs(sp)
    assert d.shape == p.shape and d.dtype == dtype
    groups = {"global": 1, "head": 6, "row": 6 * 17}[scope]
    # each group keeps its k largest; where a (causal) row has fewer non-zeros, zeros fill up
    nnz = (p != 0).reshape(groups, -1).sum(-1)
    assert int((d != 0).sum()) == int(torch.clamp(nnz, max=expected // groups).sum())
    _check_topk(p, d, groups)
    if sp.counts is not None:
        assert sp.counts.dtype == torch.int16 and int(sp.counts.long().sum()) == expected
        assert torch.equal(sp.counts.long(), (d != 0).reshape(-1, 17).sum(-1))


def test_ratio_edges_and_bytes():
    p = _probs(s=20, dtype=torch.float32)
    for scope in ("global", "head", "row"):
        full = sparsify_probs(p, 1.0, scope=scope)
        assert torch.equal(densify_probs(full), p)
        none = sparsify_probs(p, 0.0, scope=scope)
        assert none.kept == 0 and torch.all(densify_probs(none) == 0)
    sp = sparsify_probs(p.bfloat16(), 0.1, scope="row")
    assert sp.values.shape[-1] == 2  # ceil(0.1 * 20), no float round-up to 3
    assert sp.nbytes == 2 * 3 * 20 * 2 * (2 + 2)
    g = sparsify_probs(p.bfloat16(), 0.05)
    k = math.ceil(0.05 * p.numel())
    assert g.nbytes == k * (2 + 2) + 2 * 3 * 20 * 2  # values + int16 cols + int16 row counts
    for sp in (sparsify_probs(p, 0.1, scope="row"), g):
        r = SparseProbs.restore(sp.tensors(), sp.meta())
        assert torch.equal(densify_probs(r), densify_probs(sp))


def test_global_scope_follows_the_mass():
    # a sharp row and a flat row, budget 11 of 20: globally the flat row keeps all ten entries
    # and the sharp row only its peak; per row both would keep 6
    p = torch.zeros(1, 1, 2, 10)
    p[0, 0, 0] = torch.tensor([0.91] + [0.01] * 9)
    p[0, 0, 1] = 0.1
    d = densify_probs(sparsify_probs(p, 0.55))
    assert d[0, 0, 0].tolist() == [pytest.approx(0.91)] + [0.0] * 9
    assert torch.equal(d[0, 0, 1], p[0, 0, 1])
    r = densify_probs(sparsify_probs(p, 0.55, scope="row"))
    assert (r != 0).sum(-1).tolist() == [[[6, 6]]]
    assert d.sum() > r.sum()


@pytest.mark.parametrize("p,ratio,exc,match", [
    (torch.rand(2, 3, 4), 0.1, ValueError, "batch, heads"),
    (torch.rand(1, 1, 2, 2), 1.5, ValueError, "ratio=1.5"),
    (torch.rand(1, 1, 2, 2), -0.1, ValueError, r"\[0, 1\]"),
    (torch.randint(0, 3, (1, 1, 2, 2)), 0.1, TypeError, "bf16/fp16/fp32"),
])
def test_bad_inputs(p, ratio, exc, match):
    with pytest.raises(exc, match=match):
        sparsify_probs(p, ratio)
    with pytest.raises(ValueError, match="scope='batch'"):
        sparsify_probs(torch.rand(1, 1, 2, 2), 0.5, scope="batch")


def test_check_finite_names_the_place_and_the_fix():
    check_finite(torch.randn(4, 4), "layer 0 input")  # passes silently
    check_finite(torch.arange(3), "ints are never non-finite")
    x = torch.randn(4, 4, dtype=torch.bfloat16)
    x[1, 2] = float("nan")
    x[3, 3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"layers\.3\.mlp input: 1 NaN and 1 Inf") as err:
        check_finite(x, "layers.3.mlp input")
    assert "on_nonfinite='ignore'" in str(err.value) and "learning rate" in str(err.value)


# -- deferred checks (FiniteGuard): no host read until raise_pending ---------------------------


def _no_host_reads(monkeypatch):
    """Make every Tensor -> Python conversion fail, so a hidden host sync cannot pass."""
    def boom(*_a, **_k):
        raise AssertionError("host read of a tensor inside a deferred check")

    for attr in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, attr, boom)


def test_deferred_check_reads_nothing_until_raise_pending(monkeypatch):
    from hyclora.quant.checks import FiniteGuard, active_guard

    guard = FiniteGuard()
    bad = torch.randn(3, 5)
    bad[2, 1] = float("inf")
    with monkeypatch.context() as m:
        _no_host_reads(m)
        with guard.scope(order=2):
            assert active_guard() is guard
            check_finite(torch.randn(4, 4), "layers.2 input")
            check_finite(bad, "layers.2 output")  # no raise yet
        with guard.scope(order=1):  # recorded later, but an earlier layer (reentrant recompute)
            check_finite(bad.double(), "layers.1 output")
            check_finite(torch.arange(3), "ints are skipped")
    assert active_guard() is None
    assert guard.num_pending == 3
    with pytest.raises(FloatingPointError, match=r"in layers\.1 output \(shape \(3, 5\), torch\.float64\); "
                                                 r"2 of the 3 places") as err:
        guard.raise_pending()
    assert "on_nonfinite='ignore'" in str(err.value) and "learning rate" in str(err.value)
    assert guard.num_pending == 0
    guard.raise_pending()  # flags were consumed: nothing left to raise
    # all finite: silent
    with guard.scope():
        check_finite(torch.randn(2, 2), "fine")
    guard.raise_pending()
    # outside any scope: immediate again
    with pytest.raises(FloatingPointError, match="1 NaN and 0 Inf"):
        check_finite(torch.tensor([float("nan"), 1.0]), "immediate")


def test_deferred_check_raises_in_the_backward_through_the_armed_output():
    from hyclora.quant.checks import FiniteGuard

    guard = FiniteGuard()
    w = torch.randn(4, requires_grad=True)
    x = torch.ones(4)
    x[0] = float("nan")
    with guard.scope(order=0):
        check_finite(x, "layers.0 output")
    y = x * w
    assert not guard.arm(x)  # needs grad: nothing to hook
    assert guard.arm(y) and guard.armed
    with pytest.raises(FloatingPointError, match=r"layers\.0 output"):
        y.sum().backward()
    assert w.grad is None and not guard.armed  # raised before w's gradient was written
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        with guard.scope():
            check_finite([1.0], "a list")


def test_pending_flags_are_bounded(monkeypatch):
    from hyclora.quant import checks

    monkeypatch.setattr(checks, "MAX_PENDING", 3)
    guard = checks.FiniteGuard()
    with guard.scope():
        check_finite(torch.ones(2), "a")
        check_finite(torch.ones(2), "b")
        assert guard.num_pending == 2
        check_finite(torch.ones(2), "c")  # read and cleared at the cap
        assert guard.num_pending == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_flag_equals_isfinite_all(dtype):
    """The deferred flag against the plain reference ``isfinite(x).all()``: one NaN / +-Inf
    anywhere, the dtype's largest finite magnitudes (no overflow), a requires-grad input (no
    autograd record), 0-d and 1-element inputs."""
    from hyclora.quant.checks import _all_finite

    big = torch.finfo(dtype).max
    cases = [torch.randn(3, 5, 7).to(dtype) * 100, torch.tensor([big, -big], dtype=dtype),
             torch.tensor(1.5, dtype=dtype), torch.zeros(1, dtype=dtype)]
    for i, bad in enumerate((math.nan, math.inf, -math.inf)):
        x = torch.randn(4, 9).to(dtype)
        x.view(-1)[7 * i + 3] = bad
        cases.append(x)
    cases.append(torch.tensor([math.inf, -math.inf], dtype=dtype))
    for x in cases:
        flag = _all_finite(x)
        assert flag.dtype == torch.bool and flag.dim() == 0
        assert bool(flag) == bool(torch.isfinite(x).all()), x
    x = torch.randn(6, 6, dtype=dtype, requires_grad=True) * 2
    flag = _all_finite(x)
    assert bool(flag) and not flag.requires_grad and flag.grad_fn is None
