"""ChannelStats: calibration merge, freezing, update semantics, buffers as state."""

import io

import pytest
import torch

from hyclora.quant import ChannelStats, dequantize, quantize
from hyclora.quant.core import unpack_codes


def _batch(seed, n=6, rows=10, big=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * scale
    if big is not None:
        ch, val = big
        x[:, ch] = val
    return x


def test_range_merges_running_min_max_over_all_rows_then_freezes():
    s = ChannelStats(6, iteration_threshold=2)
    x1 = _batch(0)
    x2 = _batch(1, scale=3.0)
    lo1, hi1 = s.range_for(x1)
    # all rows count (the reference looked at x[0] only)
    assert torch.equal(lo1, x1.amin(0)) and torch.equal(hi1, x1.amax(0))
    assert not s.frozen and int(s.count) == 1
    lo2, hi2 = s.range_for(x2)
    # while calibrating, the micro-batch is quantised with its own range ...
    assert torch.equal(lo2, x2.amin(0)) and torch.equal(hi2, x2.amax(0))
    # ... and the stored range is the running min/max of both
    assert torch.equal(s.lo, torch.minimum(x1.amin(0), x2.amin(0)))
    assert torch.equal(s.hi, torch.maximum(x1.amax(0), x2.amax(0)))
    assert s.frozen and int(s.count) == 2
    lo3, hi3 = s.range_for(_batch(2, scale=100.0))
    assert torch.equal(lo3, s.lo) and torch.equal(hi3, s.hi) and int(s.count) == 2


def test_update_false_does_not_count_or_merge():
    s = ChannelStats(6, iteration_threshold=2)
    s.range_for(_batch(0))
    lo_before, hi_before = s.lo.clone(), s.hi.clone()
    x = _batch(1, scale=10.0)
    lo, hi = s.range_for(x, update=False)
    assert torch.equal(lo, x.amin(0)) and torch.equal(hi, x.amax(0))
    assert torch.equal(s.lo, lo_before) and torch.equal(s.hi, hi_before)
    assert int(s.count) == 1 and not s.frozen


def test_zero_threshold_never_freezes():
    s = ChannelStats(6, num_outliers=1, iteration_threshold=0)
    for i in range(7):
        x = _batch(i, big=(i % 6, 50.0))
        lo, hi = s.range_for(x)
        assert torch.equal(lo, x.amin(0))
        assert not s.frozen
    assert int(s.count) == 7
    # outliers are recomputed from each micro-batch alone
    x = _batch(9, big=(4, 50.0))
    assert s.select_outliers(x).tolist() == [4]
    assert s.select_outliers(_batch(10, big=(1, 50.0))).tolist() == [1]


def test_outlier_scores_accumulate_across_calibration_batches():
    s = ChannelStats(6, num_outliers=1, iteration_threshold=3)
    # batch 1: channel 2 huge; batches 2, 3: channel 5 moderately large. Last-batch-only (the
    # reference) would pick 5; over the whole window channel 2 has the larger L2 norm.
    order = [(2, 40.0), (5, 15.0), (5, 15.0)]
    picked = []
    for i, big in enumerate(order):
        x = _batch(i, big=big)
        picked.append(s.select_outliers(x).tolist())
        s.range_for(x)
    assert picked == [[2], [2], [2]]
    expected = sum((_batch(i, big=b) ** 2).sum(0) for i, b in enumerate(order))
    assert torch.allclose(s.outlier_score, expected)
    assert s.frozen and s.outlier_idx.tolist() == [2]
    # frozen: the stored set, whatever the batch
    assert s.select_outliers(_batch(7, big=(0, 1e3))).tolist() == [2]


def test_scores_merge_can_change_the_set():
    s = ChannelStats(6, num_outliers=1, iteration_threshold=5)
    assert s.select_outliers(_batch(0, big=(1, 10.0))).tolist() == [1]
    s.range_for(_batch(0))
    assert s.select_outliers(_batch(1, big=(3, 30.0))).tolist() == [3]


def test_recompute_reproduces_the_counted_forward():
    torch.manual_seed(0)
    s = ChannelStats(8, num_outliers=2, iteration_threshold=4)
    quantize(torch.randn(5, 8) * torch.arange(1, 9), 2, stats=s)
    x = torch.randn(5, 8) * torch.arange(8, 0, -1)
    q1 = quantize(x, 2, stats=s)
    state = {k: v.clone() for k, v in s.state_dict().items()}
    q2 = quantize(x, 2, stats=s, update=False)  # gradient-checkpointing recompute
    assert torch.equal(q1.codes, q2.codes) and torch.equal(q1.outlier_idx, q2.outlier_idx)
    assert torch.equal(dequantize(q1), dequantize(q2))
    for k, v in s.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert int(s.count) == 2


def test_update_false_before_any_update_uses_the_tensor_itself():
    s = ChannelStats(6, num_outliers=1)
    assert s.select_outliers(_batch(0, big=(4, 30.0)), update=False).tolist() == [4]
    assert int(s.count) == 0 and torch.all(s.outlier_score == 0)


def test_frozen_range_clamps():
    s = ChannelStats(3, iteration_threshold=1)
    s.range_for(torch.tensor([[0.0, -1.0, 2.0], [1.0, 1.0, 4.0]]))
    assert s.frozen
    x = torch.tensor([[5.0, -7.0, 3.0]])
    y = dequantize(quantize(x, 4, stats=s))
    assert y.tolist() == [[1.0, -1.0, pytest.approx(3.0, abs=2 / 15 / 2)]]


def test_quantize_with_stats_keeps_outliers_exact_and_counts_once():
    s = ChannelStats(16, num_outliers=2, iteration_threshold=2)
    x = torch.randn(3, 4, 16)
    x[..., 3] += 100
    x[..., 11] -= 80
    q = quantize(x, 2, stats=s)
    assert q.outlier_idx.tolist() == [3, 11] and int(s.count) == 1
    y = dequantize(q)
    assert torch.equal(y[..., [3, 11]], x[..., [3, 11]])
    # outlier columns carry code 0 (no information in the packed bits)
    assert torch.all(unpack_codes(q.codes, 2, 16)[:, [3, 11]] == 0)


def test_state_dict_round_trip_and_fp32_kept_under_casts():
    s = ChannelStats(5, num_outliers=2, iteration_threshold=2)
    for i in range(2):
        quantize(_batch(i, n=5, big=(i, 20.0)), 4, stats=s)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = ChannelStats(5, num_outliers=2, iteration_threshold=2)
    assert not t.frozen
    t.load_state_dict(torch.load(buf))
    assert t.frozen and int(t.count) == 2
    for name in ("lo", "hi", "outlier_score", "outlier_idx", "count"):
        assert torch.equal(getattr(t, name), getattr(s, name)), name
    assert set(s.state_dict()) == {"lo", "hi", "outlier_score", "outlier_idx", "count", "frozen_forwards",
                                   "next_lo", "next_hi", "next_score", "observing", "window_observed"}
    # as a child of a model cast to bf16 / half: stats stay exact fp32
    parent = torch.nn.Sequential(torch.nn.Linear(5, 5), t)
    parent.to(torch.bfloat16)
    assert parent[0].weight.dtype == torch.bfloat16
    assert t.lo.dtype == torch.float32 and torch.equal(t.lo, s.lo)
    parent.half()
    assert t.outlier_score.dtype == torch.float32 and torch.equal(t.outlier_score, s.outlier_score)
    t.to("cpu")
    assert t.frozen
    t.reset()
    assert not t.frozen and int(t.count) == 0 and torch.all(t.outlier_score == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_moves_every_buffer():
    s = ChannelStats(4, num_outliers=1).cuda()
    assert all(b.is_cuda for b in s.buffers())
    quantize(torch.randn(3, 4, device="cuda"), 4, stats=s)
    assert int(s.count) == 1


def test_bad_stats_usage_raises_clear_errors():
    with pytest.raises(ValueError, match="width"):
        ChannelStats(0)
    with pytest.raises(ValueError, match="num_outliers=9"):
        ChannelStats(8, num_outliers=9)
    with pytest.raises(ValueError, match="iteration_threshold=-1"):
        ChannelStats(8, iteration_threshold=-1)
    s = ChannelStats(8)
    with pytest.raises(ValueError, match="width 8 got a tensor of width 7"):
        quantize(torch.randn(2, 7), 4, stats=s)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(2, 8), 4, stats=s, group_size=4)
    with pytest.raises(ValueError, match="meta"):
        quantize(torch.randn(2, 8, device="meta"), 4, stats=s, backend="torch")


def test_frozen_params_are_cached_and_equal_the_uncached_path():
    torch.manual_seed(1)
    s = ChannelStats(16, num_outliers=2, iteration_threshold=1)
    quantize(torch.randn(4, 16) * torch.arange(1, 17), 4, stats=s)
    assert s.frozen
    x2, x3 = torch.randn(2, 5, 16) * 4, torch.randn(3, 16)
    q1, q2 = quantize(x2, 4, stats=s), quantize(x3, 4, stats=s)
    assert q1.lo is q2.lo and q1.step is q2.step  # computed once, shared
    # the general path (explicit outlier set, range from range_for) gives the same result
    q3 = quantize(x2, 4, stats=s, outlier_idx=s.outlier_idx.clone())
    assert torch.equal(q1.codes, q3.codes) and torch.equal(dequantize(q1), dequantize(q3))
    assert torch.equal(q1.lo, q3.lo) and torch.equal(q1.step, q3.step)
    # a load or reset drops the cache
    s.load_state_dict(s.state_dict())
    q4 = quantize(x2, 4, stats=s)
    assert q4.lo is not q1.lo and torch.equal(q4.codes, q1.codes)
    s.reset()
    with pytest.raises(RuntimeError, match="frozen"):
        s.frozen_params(4)


def test_explicit_empty_outlier_set_overrides_the_stats():
    s = ChannelStats(8, num_outliers=2, iteration_threshold=3)
    x = torch.randn(4, 8)
    q = quantize(x, 4, stats=s, outlier_idx=torch.empty(0, dtype=torch.long))
    assert q.outlier_idx is None and q.num_outliers == 0 and torch.all(s.outlier_score == 0)


def test_frozen_statistics_expire_after_recalibrate_every():
    st = ChannelStats(4, num_outliers=1, iteration_threshold=2, recalibrate_every=3, refresh=False)
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0], [1.0, -1.0, 0.5, 9.0]])
    for _ in range(2):  # calibration window
        st.note_counted_forward()
        st.range_for(x)
        st.select_outliers(x)
    assert st.frozen
    for _ in range(3):  # 3 forwards with the frozen statistics
        st.note_counted_forward()
        assert st.frozen
    shifted = x * 4 + 1  # the activations moved; a new window measures them afresh
    st.note_counted_forward()
    assert not st.frozen and int(st.count) == 0
    lo, hi = st.range_for(shifted)
    assert torch.equal(lo, shifted.min(0).values) and torch.equal(hi, shifted.max(0).values)
    st.note_counted_forward()
    st.range_for(shifted)
    assert st.frozen and torch.equal(st.hi, shifted.max(0).values)  # the stale range is gone


def test_recalibrate_every_zero_keeps_frozen_statistics():
    st = ChannelStats(3, iteration_threshold=1)
    st.note_counted_forward()
    st.range_for(torch.ones(2, 3))
    for _ in range(100):
        st.note_counted_forward()
    assert st.frozen and int(st.count) == 1
    with pytest.raises(ValueError, match="recalibrate_every"):
        ChannelStats(3, recalibrate_every=-1)


# -- refresh (recalibrate_mode="refresh"): new statistics gathered beside the frozen ones ------------


def _calibrated(width=4, outliers=1, threshold=2, every=3):
    st = ChannelStats(width, num_outliers=outliers, iteration_threshold=threshold, recalibrate_every=every)
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0], [1.0, -1.0, 0.5, 9.0]])
    for _ in range(threshold):
        st.note_counted_forward()
        st.select_outliers(x)
        st.range_for(x)
    assert st.frozen
    return st


def test_refresh_swaps_new_statistics_into_the_frozen_parameters_in_place():
    st = _calibrated()
    params = st.frozen_params(4)
    before = [t.clone() for t in params[:3]] + [params[3].clone()]
    ptrs = [t.data_ptr() for t in params]
    moved = torch.tensor([[5.0, -3.0, 1.0, 0.0], [20.0, -4.0, 2.0, 0.5], [-7.0, 50.0, 3.0, 1.0]])
    seen = []
    for forward in range(3 + 2 + 1):  # 3 frozen, a window of 2 observed forwards, the swap
        st.note_counted_forward()
        assert st.frozen and not st.expires_at_next_forward()
        x = moved * (forward + 1)
        st.observe(x, skip_rows=torch.tensor([2]))  # the exact rows are not observed
        if st._observing:
            seen.append(x[:2])
        same = all(torch.equal(a, b) for a, b in zip(st.frozen_params(4), before))
        assert same == (forward < 5), forward  # the old parameters stay in use until the swap
    assert len(seen) == 2 and not st._observing and int(st.observing) == 0
    window = torch.cat(seen)
    assert torch.equal(st.lo, window.min(0).values) and torch.equal(st.hi, window.max(0).values)
    assert torch.equal(st.outlier_score, (window * window).sum(0))
    assert st.outlier_idx.tolist() == [(window * window).sum(0).argmax().item()]
    new = st.frozen_params(4)
    assert new is params and [t.data_ptr() for t in new] == ptrs  # same tensors: a graph keeps reading them
    from hyclora.quant.core import affine_params

    lo, step, inv = (t.index_fill(0, st.outlier_idx, 0.0) for t in affine_params(st.lo, st.hi, 4))
    assert torch.equal(new[0], lo) and torch.equal(new[1], step) and torch.equal(new[2], inv)
    assert torch.equal(new[3], st.outlier_idx)


def test_refresh_observes_nothing_outside_a_window_and_not_on_a_recompute():
    st = _calibrated(every=5)
    lo = st.lo.clone()
    st.note_counted_forward()
    st.observe(torch.full((2, 4), 99.0))  # no window open: not even launched
    assert torch.equal(st.next_lo, torch.full((4,), float("inf")))
    for _ in range(5):
        st.note_counted_forward()
    assert st._observing
    st.observe(torch.full((2, 4), 99.0), update=False)  # a checkpoint recompute of that forward
    assert torch.equal(st.next_lo, torch.full((4,), float("inf"))) and torch.equal(st.lo, lo)


def test_refresh_window_that_saw_nothing_keeps_the_statistics():
    st = _calibrated(outliers=1)
    params = [t.clone() for t in st.frozen_params(2)]
    for _ in range(3 + 2 + 1):
        st.note_counted_forward()  # a path that never quantises this tensor
    assert all(torch.equal(a, b) for a, b in zip(st.frozen_params(2), params))


def test_refresh_resumes_inside_a_window_as_the_uninterrupted_run():
    st = _calibrated()
    for _ in range(4):  # 3 frozen + the first observed forward of the window
        st.note_counted_forward()
        st.observe(torch.randn(3, 4))
    assert st._observing
    loaded = ChannelStats(4, num_outliers=1, iteration_threshold=2, recalibrate_every=3)
    loaded.load_state_dict(st.state_dict())
    assert loaded.frozen and loaded._observing and loaded._observed == 1 and int(loaded.observing) == 1
    for _ in range(2):  # the window's second forward, then the swap
        x = torch.randn(3, 4)
        for s in (st, loaded):
            s.note_counted_forward()
            s.observe(x)
    assert not loaded._observing and loaded._frozen_forwards == st._frozen_forwards
    for name in ("lo", "hi", "outlier_score", "outlier_idx"):
        assert torch.equal(getattr(loaded, name), getattr(st, name)), name


def test_refresh_window_missing_from_an_older_checkpoint_opens_again():
    st = _calibrated()
    for _ in range(4):
        st.note_counted_forward()
        st.observe(torch.randn(3, 4))
    old = {k: v for k, v in st.state_dict().items()
           if k not in ("next_lo", "next_hi", "next_score", "observing", "window_observed")}
    loaded = ChannelStats(4, num_outliers=1, iteration_threshold=2, recalibrate_every=3)
    loaded.load_state_dict(old)
    assert loaded.frozen and not loaded._observing and loaded._frozen_forwards == 3
    loaded.note_counted_forward()
    assert loaded._observing and loaded._observed == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_observe_columns_kernel_matches_torch(dtype):
    from hyclora.kernels.common import INTERPRET
    from hyclora.quant.core import observe_columns_torch

    if not INTERPRET:
        pytest.skip("the Triton kernel runs on the CPU under TRITON_INTERPRET=1")
    from hyclora.quant.triton_kernels import observe_columns

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 40, generator=gen).to(dtype)
    skip = torch.tensor([3, 17, 69])
    results = []
    for fn in (observe_columns, observe_columns_torch):
        bufs = (torch.full((40,), float("inf")), torch.full((40,), float("-inf")), torch.zeros(40))
        flag = torch.ones((), dtype=torch.int32)
        fn(x, flag, *bufs, skip)
        fn(x * 2, flag, *bufs, skip)
        flag.zero_()
        fn(x * 10, flag, *bufs, skip)  # flag 0: nothing changes
        results.append(bufs)
    keep = torch.ones(70, dtype=torch.bool)
    keep[skip] = False
    seen = torch.cat([x[keep], 2 * x[keep]]).float()
    for lo, hi, score in results:
        assert torch.equal(lo, seen.min(0).values) and torch.equal(hi, seen.max(0).values)
        torch.testing.assert_close(score, (seen * seen).sum(0), rtol=1e-5, atol=0)


def test_observe_kernel_compiles_for_sm90_without_spills(tmp_path):
    pytest.importorskip("triton")
    from helpers.kernels import compile_for_sm90

    cases = [dict(module="hyclora.quant.triton_kernels", kernel="_col_observe_kernel",
                  ptrs=dict(x_ptr=dtype, flag_ptr="i32", lo_ptr="fp32", hi_ptr="fp32", score_ptr="fp32",
                            skip_ptr="i64"),
                  floats=[], consts=dict(BLOCK_M=32, BLOCK_N=128, ROW_TILES=4, K_PAD=k), warps=8,
                  tag=[dtype, k]) for dtype in ("bf16", "fp32") for k in (1, 32)]
    for tag, regs, stack, local in compile_for_sm90(cases, tmp_path):
        assert local == 0 and stack == 0, (tag, regs, stack)


# -- quick first calibration (HyCLoRAConfig.calibration="quick") ----------------------------------


def _layer_forward(st, x, bits=4):
    """What a layer does per counted forward: note it, let an open window observe, quantise."""
    st.note_counted_forward()
    if st.frozen:
        st.observe(x)
    return quantize(x, bits, stats=st)


@pytest.mark.parametrize("every", [0, 4])
def test_quick_calibration_freezes_what_eager_calibration_freezes(every):
    from hyclora.quant.core import affine_params

    threshold = 3
    quick = ChannelStats(4, num_outliers=1, iteration_threshold=threshold, recalibrate_every=every, quick=True)
    eager = ChannelStats(4, num_outliers=1, iteration_threshold=threshold, recalibrate_every=every)
    batches = [_batch(s, n=4, big=(s % 4, 30.0 + s), scale=1.0 + s) for s in range(threshold + 1)]
    for i, x in enumerate(batches[:threshold]):
        qt = _layer_forward(quick, x)
        _layer_forward(eager, x)
        assert quick.frozen and eager.frozen == (i == threshold - 1)
        # the first forward quantises with its own range, each later one with the range of those before it
        seen = torch.cat(batches[:max(i, 1)])
        lo, step, _ = (t.index_fill(0, quick.outlier_idx, 0.0)
                       for t in affine_params(seen.min(0).values, seen.max(0).values, 4))
        assert torch.equal(qt.lo, lo) and torch.equal(qt.step, step), i
        assert quick.outlier_idx.tolist() == qt.outlier_idx.tolist()
    cache = quick._param_cache[4]
    assert int(quick.count) == 1 and quick._observing and int(quick.observing) == 1
    _layer_forward(quick, batches[-1])  # the window ends: the statistics are written in place
    _layer_forward(eager, batches[-1])
    assert not quick._observing and int(quick.count) == threshold == int(eager.count)
    for name in ("lo", "hi", "outlier_score", "outlier_idx"):
        assert torch.equal(getattr(quick, name), getattr(eager, name)), name
    assert quick.frozen_params(4) is cache  # the cached tensors, rewritten: a graph keeps reading them
    assert all(torch.equal(a, b) for a, b in zip(cache, eager.frozen_params(4)))
    assert quick._frozen_forwards == eager._frozen_forwards == 1  # the renewal schedule is eager's


def test_quick_calibration_resumes_inside_its_window():
    st = ChannelStats(4, num_outliers=1, iteration_threshold=3, quick=True)
    for seed in range(2):  # the calibrating forward and the window's first
        _layer_forward(st, _batch(seed, n=4))
    loaded = ChannelStats(4, num_outliers=1, iteration_threshold=3, quick=True)
    loaded.load_state_dict(st.state_dict())
    assert loaded.frozen and int(loaded.count) == 1 and loaded._observing and loaded._observed == 1
    for seed in range(2, 4):  # the window's last forward, then the swap
        for s in (st, loaded):
            _layer_forward(s, _batch(seed, n=4))
    assert not loaded._observing and int(loaded.count) == 3
    xs = torch.cat([_batch(s, n=4) for s in range(3)])
    assert torch.equal(loaded.lo, xs.min(0).values) and torch.equal(loaded.hi, xs.max(0).values)
    for name in ("lo", "hi", "outlier_score", "outlier_idx", "count"):
        assert torch.equal(getattr(loaded, name), getattr(st, name)), name


def test_quick_calibration_needs_refresh_and_a_threshold():
    with pytest.raises(ValueError, match="quick=True"):
        ChannelStats(4, iteration_threshold=3, refresh=False, quick=True)
    with pytest.raises(ValueError, match="quick=True"):
        ChannelStats(4, iteration_threshold=0, quick=True)
    st = ChannelStats(4, iteration_threshold=1, quick=True)  # nothing to refine: frozen after one forward
    _layer_forward(st, _batch(0, n=4))
    _layer_forward(st, _batch(1, n=4))
    assert st.frozen and not st._observing and int(st.count) == 1
