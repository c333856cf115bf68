"""hyclora.memory.measure_live_peak: peak of live tensor bytes (CPU), against hand-computed cases."""

import pytest
import torch

from hyclora.memory import LivePeakReport, measure_live_peak, track_live_tensors

N = 1000  # fp32 elements: 4000 bytes per vector


def test_forward_backward_hand_computed():
    a = torch.randn(N, requires_grad=True)  # created before the tracker: static, not counted

    def run():
        x = torch.ones(N)      # +4000
        y = x * a              # +4000 (saves x and a)
        z = y.exp()            # +4000 (saves z)
        del y                  # exp saves its output and mul saves x: y is freed here
        loss = z.sum()         # +4 (0-dim)
        loss.backward()        # ones_like +4; dz*z (+4000) then *x (+4000) -> a.grad
        return loss

    _, rep = measure_live_peak(run)
    # forward: x, z, loss (y was freed) = 8004; backward: grad seed 4 + d(exp) 4000 + d(a) 4000
    assert rep.peak_bytes == 2 * 4 * N + 4 + 4 + 2 * 4 * N
    assert rep.peak_phase == "bwd"
    assert rep.end_bytes == 4 * N + 4  # a.grad and the returned loss; x, z and the graph are gone
    assert a.grad is not None
    assert sorted(t.nbytes for t in rep.at_peak) == [4, 4] + [4 * N] * 4
    # forward phase: x, y and z all alive when exp ran (y is freed after it)
    assert rep.per_phase_peak[("fwd", "other")] == 3 * 4 * N


def test_views_inplace_and_frees_are_not_double_counted():
    def run():
        x = torch.zeros(N)           # +4000
        v = x.view(10, 100).t()      # views: +0
        x.add_(1.0)                  # in place: +0
        w = torch.empty(2 * N)       # +8000 -> peak 12000
        del w                        # -8000
        u = v.contiguous()           # +4000 -> 8000 (below the peak)
        return x, u

    (x, u), rep = measure_live_peak(run)
    assert rep.peak_bytes == 3 * 4 * N
    assert rep.end_bytes == 2 * 4 * N
    assert [t.op for t in sorted(rep.at_peak, key=lambda t: t.nbytes)] == ["zeros", "empty"]


def test_regions_and_tags():
    layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
    x = torch.randn(4, 8)
    with track_live_tensors(layers=list(layers)) as tracker:
        tracker.tag = "step"
        h = layers[1](layers[0](x))
    rep: LivePeakReport = tracker.report
    regions = {t.region for t in rep.at_peak}
    assert regions == {0, 1}
    assert all(t.tag == "step" and t.phase == "fwd" for t in rep.at_peak)
    assert rep.peak_bytes == 2 * 4 * 8 * 4
    del h


def test_tiny_llama_gradient_checkpointing_lowers_the_peak():
    pytest.importorskip("peft")
    from hyclora.demo import build_tiny_llama

    model, cfg = build_tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, ffn=172, vocab=128)
    ids = torch.randint(0, 128, (1, 128))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        # detached: a live graph would keep the embedding output (a leaf under GC) and its grad
        return loss.detach()

    _, plain = measure_live_peak(step, model=model, snapshot=False)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, ckpt = measure_live_peak(step, model=model, snapshot=False)
    assert 0 < ckpt.peak_bytes < plain.peak_bytes
    assert ckpt.end_bytes == plain.end_bytes == 4  # the loss only: grads set to None, graph freed
