"""hyclora.cuda_graphs: refusals, the eager/capture/replay decisions, and equality with the eager
hyclora step.

CPU tests run the dispatcher against an emulation of ``torch.cuda.make_graphed_callables``
(same call surface and the same static-buffer semantics: one static input per sample arg, copied
into unless it is the same storage; one saved forward per callable, replaced by the next
forward; a static output buffer, gradients copied out of static buffers), so that everything
except the CUDA capture itself is exercised: counting, recalibration and re-capture, shared static
inputs, gradient accumulation, the deferred NaN/Inf check. GPU tests capture for real.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch

from hyclora import HyCLoRAConfig, apply_hyclora
from hyclora.cuda_graphs import DecoderLayerGraphs, graph_decoder_layers, graph_layer_chain, stats_ready
from hyclora.demo import build_lora_llama
from hyclora.quant import ChannelStats

from helpers.graph_emulation import EmulatedCapture, chain_grapher, emulated_grapher
from helpers.repo import REPO

CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- helpers ---------------------------------------------------------------------------------------


def _model(layer_type="intra_inter_full_fuse", q_bit=2, threshold=2, every=3, device="cpu", dtype=torch.float32,
           calibration="eager", **cfg):
    """The dispatcher tests count ``threshold`` eager calibrating steps; the quick calibration (the
    library's default) is parametrized where it changes what the graphs do."""
    model, _ = build_lora_llama(hidden=64, layers=3, heads=4, kv_heads=2, ffn=96, vocab=128, device=device,
                                dtype=dtype)
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=q_bit, iteration_threshold=threshold,
                                       recalibrate_every=every, calibration=calibration, **cfg))
    return model


def _batch(seed, b=2, s=12, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (b, s), generator=gen).to(device)


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _backward(model, seed):
    model(input_ids=_batch(seed), labels=_batch(seed)).loss.backward()


def _lockstep(eager, graphed, seed):
    """One step of both models from fresh gradients; the LoRA gradients must agree."""
    for model in (eager, graphed):
        model.zero_grad(set_to_none=True)
        _backward(model, seed)
    _compare(_lora_grads(graphed), _lora_grads(eager), 1e-6)


def _steps_in_lockstep(eager, graphed, steps, device, loss_tol, grad_tol):
    """``steps`` training steps of both models on the same batches (fresh gradients each): equal
    losses and LoRA gradients within the tolerances."""
    for step in range(steps):
        ids = _batch(step, device=device)
        losses = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(float(loss.detach()))
        assert abs(losses[0] - losses[1]) <= loss_tol * abs(losses[0]), step
        _compare(_lora_grads(graphed), _lora_grads(eager), grad_tol)


def _graphs(model, **kw):
    grapher = kw.pop("grapher", emulated_grapher)
    return DecoderLayerGraphs(model, _grapher=grapher, **kw)


def _graphed_after(steps, **kw):
    """A model (frozen statistics after 2 steps) with graphs, after ``steps`` training steps."""
    model = _model(every=0)
    graphs = _graphs(model, **kw)
    for step in range(steps):
        _backward(model, step)
    return model, graphs


def _layers(model):
    return model.base_model.model.model.layers


def _compare(a, b, tol):
    assert a.keys() == b.keys() and a
    for n in a:
        err = float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30))
        assert err <= tol, (n, err)


# -- refusals (CPU) ----------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
def test_refuses_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA graphs need the model on a CUDA device"):
        graph_decoder_layers(_model())


def test_bad_arguments_and_models():
    model = _model()
    with pytest.raises(ValueError, match="sample_shape"):
        _graphs(model, sample_shape=(4,))
    with pytest.raises(ValueError, match="num_warmup_iters"):
        _graphs(model, num_warmup_iters=0)
    plain, _ = build_lora_llama(hidden=32, layers=1, heads=2, kv_heads=2, ffn=48, vocab=64)
    with pytest.raises(ValueError, match="apply_hyclora"):
        _graphs(plain)
    g = _graphs(model)
    with pytest.raises(ValueError, match="already graphed"):
        _graphs(model)
    g.remove()
    _graphs(model).remove()  # after remove() it can be graphed again


def test_refuses_lora_dropout():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    cfg._attn_implementation = "sdpa"
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4))
    with pytest.raises(ValueError, match="dropout with p=0.1"):
        _graphs(model)


def test_stats_ready_predicts_expiry():
    s = ChannelStats(8, iteration_threshold=2, recalibrate_every=3, refresh=False)
    state = torch.nn.Module()
    state.stats = torch.nn.ModuleDict({"x": s})
    x = torch.randn(5, 8)
    history = []
    for _ in range(12):
        ready = stats_ready(state)
        s.note_counted_forward()  # what count_forward does first ...
        history.append((ready, s.frozen))
        if not s.frozen:
            s.range_for(x)  # ... then the blocks calibrate
    # ready exactly when the forward about to be counted runs with frozen stats
    assert [r for r, _ in history] == [f for _, f in history]
    assert history[:6] == [(False, False), (False, False), (True, True), (True, True), (True, True), (False, False)]
    # a statistic the layer never calibrates (unused by its path) does not block the others
    state.stats["unused"] = ChannelStats(8, iteration_threshold=2)
    assert stats_ready(state) == s.frozen
    fresh = torch.nn.Module()
    fresh.stats = torch.nn.ModuleDict({"a": ChannelStats(8), "b": ChannelStats(8)})
    assert not stats_ready(fresh)  # nothing calibrated yet (before the first forward)


# -- dispatch against the emulation (CPU) -------------------------------------------------------------


@pytest.mark.parametrize("on_nonfinite", ["raise", "ignore"])
def test_equal_to_eager_over_recalibration(on_nonfinite):
    eager = _model(on_nonfinite=on_nonfinite, recalibrate_mode="reset")
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed)
    for step in range(10):  # calibrate 2, frozen 3 (capture + replays), expire, calibrate 2, ...
        ids = _batch(step)
        losses = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), step
        _compare(_lora_grads(graphed), _lora_grads(eager), 0.0)
    for a, b in zip(_layers(eager), _layers(graphed)):
        assert int(a.hyclora_state.forward_count) == int(b.hyclora_state.forward_count) == 10
    c = graphs.counts
    assert c["capture"] == 2 and c["release: statistics expire (recalibration)"] == 1
    assert c["replay"] == 3 * 6  # steps 2-4 and 7-9 (captures at 2 and 7), 3 layers
    assert c["eager: statistics calibrating"] == 3 * 4  # steps 0-1 and 5-6
    graphs.remove()
    assert "_hyclora_graphs" not in _layers(graphed)[0].__dict__


@pytest.mark.parametrize("calibration", ["eager", "quick"])
@pytest.mark.parametrize("grapher", ["emulated", "chain"])
def test_refresh_recalibrates_inside_the_graphs(grapher, calibration):
    """recalibrate_mode="refresh" (the default): the statistics are renewed while the graphs keep
    replaying (one capture, no release, no eager step after the first calibration), with the
    same losses and gradients as the eager model, and the renewed parameters reach the graphs.
    Quick calibration: one eager step, the capture at the second, whose replays refine the first
    statistics with the running range (a flag the graphs read) as the eager model does."""
    eager = _model(calibration=calibration)  # calibrate 2 (quick: 1 + a window of 1), then every 3 a window of 2
    assert _layers(eager)[0]._hyclora_patch.config.recalibrate_mode == "refresh"
    graphed = copy.deepcopy(eager)
    graphs = (_graphs(graphed) if grapher == "emulated"
              else _graphs(graphed, grapher=chain_grapher, num_warmup_iters=1))
    stats = _layers(graphed)[1].hyclora_state.stats["x_mid"]
    _steps_in_lockstep(eager, graphed, 3, "cpu", loss_tol=0.0, grad_tol=0.0)  # calibrate, capture
    params = [t.clone() for t in stats.frozen_params(4)[:3]]
    _steps_in_lockstep(eager, graphed, 11, "cpu", loss_tol=0.0, grad_tol=0.0)  # two renewal windows
    c = graphs.counts
    calibrating = 2 if calibration == "eager" else 1
    assert c["capture"] == 1 and not any(k.startswith("release") for k in c), dict(c)
    assert c["replay"] == 3 * (14 - calibrating) and c["eager: statistics calibrating"] == 3 * calibrating
    # two windows closed (forwards 6-7 and 11-12 of each layer): new parameters, same tensors
    assert not all(torch.equal(a, b) for a, b in zip(stats.frozen_params(4)[:3], params))
    graphs.remove()


def test_gradient_accumulation_and_two_forwards_before_backward():
    eager = _model(every=0)
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed)
    for model in (eager, graphed):
        for step in range(3):  # calibrate (2) and capture at the third
            model.zero_grad(set_to_none=True)
            _backward(model, step)
    for model in (eager, graphed):
        model.zero_grad(set_to_none=True)
        for step in (3, 4):  # accumulated over two micro-batches
            _backward(model, step)
    _compare(_lora_grads(graphed), _lora_grads(eager), 1e-6)  # .grad never aliases a static buffer
    for model in (eager, graphed):
        model.zero_grad(set_to_none=True)
        total = sum(model(input_ids=_batch(s), labels=_batch(s)).loss for s in (5, 6))
        total.backward()
    _compare(_lora_grads(graphed), _lora_grads(eager), 1e-6)
    assert graphs.counts["eager: previous graphed forward awaits its backward"] == 3
    # a forward whose graph is dropped without a backward does not block the next replay
    replays = graphs.counts["replay"]
    graphed(input_ids=_batch(7), labels=_batch(7))
    graphed(input_ids=_batch(8), labels=_batch(8)).loss.backward()
    assert graphs.counts["replay"] == replays + 6


@pytest.mark.parametrize("layer_type", ["baseline", "intra", "intra_inter"])
def test_other_layer_types(layer_type):
    # compressing layers > 0 share one static input buffer (their backward must not read it);
    # baseline keeps its input, so each layer gets its own
    eager = _model(layer_type=layer_type, q_bit=4, every=0)
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed)
    for step in range(5):
        _lockstep(eager, graphed, step)
    assert graphs.counts["replay"] == 3 * (5 if layer_type == "baseline" else 3)


def test_input_grads_and_no_recapture():
    # enable_input_require_grads: the first layer's input requires grad too (sample args follow)
    eager = _model(threshold=1, every=2, recalibrate_mode="reset")
    graphed = copy.deepcopy(eager)
    for model in (eager, graphed):
        model.enable_input_require_grads()
    graphs = _graphs(graphed, recapture=False)
    for step in range(6):  # calibrate 1, frozen 2 (capture), expire -> released for good
        _lockstep(eager, graphed, step)
    assert graphs.counts["capture"] == 1 and graphs.counts["replay"] == 3 * 2
    assert graphs._captured is None and graphs.counts["eager: graphs released (recapture=False)"] == 2


def test_eager_reasons():
    model, graphs = _graphed_after(3, sample_shape=(2, 12))
    assert graphs.captured and graphs.counts["replay"] == 3
    model(input_ids=_batch(0, s=9), labels=_batch(0, s=9)).loss.backward()
    assert graphs.counts["eager: batch shape"] == 3
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding: a mask tensor reaches the layers
    model(input_ids=_batch(1), attention_mask=mask, labels=_batch(1)).loss.backward()
    assert graphs.counts["eager: attention_mask"] == 3
    with torch.no_grad():
        model(input_ids=_batch(1))
    model.eval()
    model(input_ids=_batch(1))
    model.train()
    assert graphs.counts["eager: not a training forward with grad"] == 6
    graphs.enabled = False
    model(input_ids=_batch(1), labels=_batch(1)).loss.backward()
    assert graphs.counts["eager: disabled"] == 3
    graphs.enabled = True
    with torch.no_grad():  # storage moved: the graphs are stale and captured again
        for layer in _layers(model):
            layer.post_attention_layernorm.weight.data = layer.post_attention_layernorm.weight.data.clone()
    model(input_ids=_batch(2), labels=_batch(2)).loss.backward()
    assert graphs.counts["release: stale graph (statistics or storage changed)"] == 1
    assert graphs.counts["capture"] == 2
    line = graphs.summary()  # what the examples and launch/longseq.py print at the end
    assert line.startswith(f"CUDA graphs: {graphs.counts['replay']} decoder-layer calls replayed, 2 capture(s);")
    assert "'batch shape': 3" in line and "'attention_mask': 3" in line and "'disabled': 3" in line


def test_checkpoint_recompute_runs_eager():
    eager = _model(every=0)
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed)
    for model in (eager, graphed):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for step in range(4):
        _lockstep(eager, graphed, step)
    assert graphs.counts["replay"] == 0 and graphs.counts["capture"] == 0
    assert graphs.counts["eager: gradient checkpointing or saved-tensor hooks"] == 3 * 4


def test_saved_tensor_measurement_runs_eager():
    from hyclora.memory import measure_saved_tensors

    model, graphs = _graphed_after(4)
    assert graphs.counts["replay"] == 6
    loss, report = measure_saved_tensors(model, lambda: model(input_ids=_batch(5), labels=_batch(5)).loss)
    loss.backward()
    assert graphs.counts["replay"] == 6 and report.mean_layer_bytes > 0


def test_nonfinite_check_survives_replay():
    model, graphs = _graphed_after(3)
    assert graphs.counts["replay"] == 3
    with torch.no_grad():
        _layers(model)[1].mlp.down_proj.base_layer.weight[0, 0] = float("nan")
    loss = model(input_ids=_batch(3), labels=_batch(3)).loss
    assert graphs.counts["replay"] == 6
    with pytest.raises(FloatingPointError, match=r"layers\.1 \(output of the decoder layer\)"):
        loss.backward()


def test_bench_smoke(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cuda_graphs.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "graphed variant is skipped" in out.stdout and "| 2x64 | hyclora full_fuse 2-bit eager |" in out.stdout
    assert (tmp_path / "cuda_graphs.csv").read_text().count("\n") == 5  # header + PEFT, PEFT + GC, eager, graphed


# -- real CUDA graphs ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["reset", "refresh", "refresh_quick"])
@pytest.mark.parametrize("layer_type,q_bit", [("intra_inter_full_fuse", 2), ("intra_inter", 4)])
@pytest.mark.parametrize("warm_up_layers", ["all", "distinct"])  # distinct: layer 2 is captured unwarmed
def test_cuda_graphs_equal_eager_over_recalibration(layer_type, q_bit, mode, warm_up_layers):
    eager = _model(layer_type=layer_type, q_bit=q_bit, device="cuda", recalibrate_mode=mode.split("_")[0],
                   calibration="quick" if mode.endswith("quick") else "eager")
    graphed = copy.deepcopy(eager)
    graphs = graph_decoder_layers(graphed, num_warmup_iters=2, warm_up_layers=warm_up_layers)
    _steps_in_lockstep(eager, graphed, 10, "cuda", loss_tol=1e-5, grad_tol=1e-4)
    # reset: released and captured again after each window; refresh: one capture replays throughout
    # (quick: captured at the second step, inside the window that refines the first statistics)
    expected = {"reset": (2, 18), "refresh": (1, 24), "refresh_quick": (1, 27)}[mode]
    assert (graphs.counts["capture"], graphs.counts["replay"]) == expected, dict(graphs.counts)
    graphs.remove()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graphs_accumulation_and_nonfinite():
    eager = _model(device="cuda", every=0)
    graphed = copy.deepcopy(eager)
    graphs = graph_decoder_layers(graphed, num_warmup_iters=2)
    for model in (eager, graphed):
        for step in range(3):
            model.zero_grad(set_to_none=True)
            model(input_ids=_batch(step, device="cuda"), labels=_batch(step, device="cuda")).loss.backward()
        model.zero_grad(set_to_none=True)
        for step in (3, 4):
            model(input_ids=_batch(step, device="cuda"), labels=_batch(step, device="cuda")).loss.backward()
    _compare(_lora_grads(graphed), _lora_grads(eager), 1e-4)
    assert graphs.counts["replay"] == 9
    with torch.no_grad():
        _layers(graphed)[1].mlp.down_proj.base_layer.weight[0, 0] = float("nan")
    loss = graphed(input_ids=_batch(5, device="cuda"), labels=_batch(5, device="cuda")).loss
    with pytest.raises(FloatingPointError, match=r"layers\.1 \(output of the decoder layer\)"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graphs_share_one_output_and_hidden_states_stay_per_layer():
    eager = _model(device="cuda", every=0)
    graphed = copy.deepcopy(eager)
    graphs = graph_decoder_layers(graphed, num_warmup_iters=1)
    _steps_in_lockstep(eager, graphed, 4, "cuda", loss_tol=1e-5, grad_tol=1e-4)
    assert graphs._captured.shared_output and graphs.counts["replay"] == 2 * 3, dict(graphs.counts)
    ids = _batch(7, device="cuda")
    want = eager(input_ids=ids, output_hidden_states=True).hidden_states
    got = graphed(input_ids=ids, output_hidden_states=True).hidden_states
    assert graphs.counts["replay"] == 3 * 3 and len({t.data_ptr() for t in got}) == len(got) == 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    del got, want
    _steps_in_lockstep(eager, graphed, 2, "cuda", loss_tol=1e-5, grad_tol=1e-4)
    graphs.remove()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_no_collection_runs_inside_a_capture():
    # a collection inside a capture runs destructors that may call the driver and invalidate it:
    # at threshold 1 each tensor the captured function makes would start one, yet none may, and
    # the capture holds with an earlier graph and a recorded event left in garbage
    import gc

    from hyclora.cuda_graphs import CudaGraphCapture

    x = torch.zeros(64, device="cuda")
    earlier = torch.cuda.CUDAGraph()
    with torch.cuda.graph(earlier):
        x.add_(1)
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    cycle = [earlier, event]
    cycle.append(cycle)
    del earlier, event, cycle  # garbage that only the cyclic collector frees
    inside = []

    def record(phase, info):
        if phase == "start" and torch.cuda.is_current_stream_capturing():
            inside.append(info["generation"])

    threshold = gc.get_threshold()
    gc.callbacks.append(record)
    gc.set_threshold(1)
    try:
        graph, out = CudaGraphCapture().capture(lambda: [x * k for k in range(50)][-1])
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(record)
    assert inside == [], f"cyclic collections of generations {inside} ran inside the capture"
    x.fill_(2)
    graph.replay()
    torch.testing.assert_close(out, torch.full_like(x, 98.0))
    gc.collect()


# -- graph_layer_chain (the grapher of real runs) with an emulated capture (CPU) -------------------


@pytest.mark.parametrize("layer_type,q_bit", [("intra_inter_full_fuse", 2), ("intra_inter", 4)])
def test_layer_chain_equals_eager_over_recalibration(layer_type, q_bit):
    # the shared gradient buffers: each layer's backward overwrites the input gradient the next
    # (earlier) layer's backward has just copied in; the gradients must still equal eager's
    eager = _model(layer_type=layer_type, q_bit=q_bit, recalibrate_mode="reset")
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed, grapher=chain_grapher, num_warmup_iters=1)
    _steps_in_lockstep(eager, graphed, 8, "cpu", loss_tol=1e-6, grad_tol=1e-6)
    assert graphs.counts["capture"] >= 2 and graphs.counts["replay"] > 0
    graphs.remove()


def test_layer_chain_gradient_accumulation_and_trainable_embeddings():
    # gradients accumulate over two steps into .grad (never aliasing a static buffer); with
    # trainable embeddings the first layer's input gradient (the shared buffer) reaches them
    eager = _model(every=0)
    for p in eager.parameters():
        if p.dim() == 2 and p.shape[0] == 128 and p.shape[1] == 64:  # the embedding table
            p.requires_grad_(True)
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed, grapher=chain_grapher, num_warmup_iters=1)
    for model in (eager, graphed):
        for step in range(3):
            model.zero_grad(set_to_none=True)
            _backward(model, step)
        model.zero_grad(set_to_none=True)
        for step in (3, 4):
            _backward(model, step)
    grads = _lora_grads(graphed)
    assert any(g.shape == (128, 64) for g in grads.values())
    _compare(grads, _lora_grads(eager), 1e-6)
    assert graphs.counts["replay"] == 3 * 3
    graphs.remove()


def test_layer_chain_shares_one_output_buffer_and_hooks_get_copies():
    # compressing layers write their outputs into the one static input buffer: every layer after the
    # first returns it, and output_hidden_states (forward hooks) still sees each layer's own output
    eager = _model(every=0)
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed, grapher=chain_grapher, num_warmup_iters=1)
    for step in range(3):
        _lockstep(eager, graphed, step)
    assert graphs._captured.shared_output and graphs.counts["replay"] == 3
    returned = []
    handles = [layer.register_forward_hook(lambda m, a, out: returned.append(out)) for layer in _layers(graphed)]
    ids = _batch(7)
    want = eager(input_ids=ids, output_hidden_states=True).hidden_states
    got = graphed(input_ids=ids, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    assert len(got) == len(want) == 4 and len({t.data_ptr() for t in got}) == 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    graphed.zero_grad(set_to_none=True)
    _backward(graphed, 8)  # without hooks: the layers return the shared buffer
    plain = [graphs._captured.graphed[i](*((returned[-1],) if i else (got[0],)), *graphs._captured.static_rope[i])
             for i in range(2)]
    assert plain[0].data_ptr() == plain[1].data_ptr()
    graphs.remove()


def test_layer_chain_keeps_outputs_apart_for_layers_that_keep_their_input():
    # baseline layers keep their input for the backward: one static input and output each
    eager = _model(layer_type="baseline", every=0)
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed, grapher=chain_grapher, num_warmup_iters=1)
    for step in range(3):
        _lockstep(eager, graphed, step)
    assert graphs.counts["replay"] == 3 * 3 and not graphs._captured.shared_output  # no statistics to calibrate
    graphs.remove()


@pytest.mark.parametrize("saves_output", ["exp", "function", "none"])
def test_layer_chain_keeps_an_output_its_backward_reads(saves_output):
    # the chain gives each layer's own output block back after its forward capture, except where
    # the node that made the output saved it (exp saves its result; a custom Function may too)
    class SaveOut(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            out = t * 2
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, g):
            (out,) = ctx.saved_tensors
            return g * out / out.clamp_min(1e-6).detach() * 2  # reads the saved output's data

    class Layer(torch.nn.Module):  # keeps nothing of its input (as the compressing layers): may share it
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(4) * 0.1)

        def forward(self, t):
            z = t * 0.5 + self.bias
            if saves_output == "exp":
                return torch.exp(z)
            return SaveOut.apply(z) if saves_output == "function" else z + 1

    torch.manual_seed(0)
    layers = [Layer() for _ in range(3)]
    shared = torch.randn(2, 4, requires_grad=True)
    first = torch.randn(2, 4, requires_grad=True)
    graphed = graph_layer_chain(layers, ((first,), (shared,), (shared,)), num_warmup_iters=1,
                                shared_hidden=shared, _capture=EmulatedCapture())
    x = torch.randn(2, 4, requires_grad=True)
    y = x
    for f in graphed:
        y = f(y)
    y.square().sum().backward()
    want_x = x.detach().clone().requires_grad_(True)
    y = want_x
    for layer in layers:
        y = layer(y)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, want_x.grad)


def test_layer_chain_shares_parameter_gradient_buffers_and_hands_out_copies():
    # the backward graphs of layers with one parameter layout write one set of static gradient
    # buffers; autograd gets copies, so accumulation into .grad and torch.autograd.grad with .grad
    # already set still see each layer's own gradient
    class Layer(torch.nn.Module):
        def __init__(self, scale_shape):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4) * 0.5)
            self.scale = torch.nn.Parameter(torch.rand(scale_shape) + 0.5)

        def forward(self, t):
            return torch.tanh(t @ self.weight) * self.scale + t

    class Recording(EmulatedCapture):
        def __init__(self):
            self.results = []

        def capture(self, fn):
            graph, result = super().capture(fn)
            self.results.append(result)
            return graph, result

    torch.manual_seed(0)
    layers = [Layer(4), Layer(4), Layer(1)]  # the third's scale has another layout
    reference = copy.deepcopy(layers)
    capture = Recording()  # the layers keep their inputs for the backward: one static input each
    graphed = graph_layer_chain(layers, tuple((torch.randn(2, 4, requires_grad=True),) for _ in layers),
                                num_warmup_iters=1, _capture=capture)
    backward_buffers = [r for r in capture.results if isinstance(r, tuple)][::-1]  # captured last to first
    weights = {b[0].data_ptr() for b in backward_buffers}
    scales = [b[1].data_ptr() for b in backward_buffers]
    assert len(weights) == 1 and scales[0] == scales[1] != scales[2]

    def loss_of(fns, x):
        for f in fns:
            x = f(x)
        return x.square().sum()

    params = [p for layer in layers for p in layer.parameters()]
    want_params = [p for layer in reference for p in layer.parameters()]
    for seed in (1, 2):  # two micro-batches accumulate into .grad
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        loss_of(graphed, x.clone().requires_grad_(True)).backward()
        loss_of(reference, x.clone().requires_grad_(True)).backward()
    for p, want in zip(params, want_params):
        torch.testing.assert_close(p.grad, want.grad)
        assert all(p.grad.data_ptr() != b.data_ptr() for bufs in backward_buffers for b in bufs)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(loss_of(graphed, x.clone().requires_grad_(True)), params)
    want = torch.autograd.grad(loss_of(reference, x.clone().requires_grad_(True)), want_params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("warm_up_layers", [None, "distinct", "all"])
def test_warm_up_runs_one_layer_of_each_kind(warm_up_layers, monkeypatch):
    """The warm-ups before a capture (Triton tuning, the capture stream's lazy set-up) run the first
    layer of each kind only (the default): layer 0's input needs no gradient (the embeddings are
    frozen), layers 1 and 2 are alike, so two warm-ups instead of three. The graphs then equal the
    eager model."""
    eager = _model(every=0)
    graphed = copy.deepcopy(eager)
    seen = []

    def grapher(*args, **kwargs):
        seen.append(kwargs["warm_up"])
        return chain_grapher(*args, **kwargs)

    calls = collections.Counter()  # compressed forwards per layer
    index = {id(layer): i for i, layer in enumerate(_layers(graphed))}
    adapter = _layers(graphed)[0]._hyclora_patch.adapter
    real = adapter.compressed_forward

    def counted(layer, *args, **kwargs):
        calls.update([index[id(layer)]])
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(adapter, "compressed_forward", counted)
    chosen = {} if warm_up_layers is None else dict(warm_up_layers=warm_up_layers)
    graphs = _graphs(graphed, grapher=grapher, num_warmup_iters=1, **chosen)
    _steps_in_lockstep(eager, graphed, 2, "cpu", loss_tol=0.0, grad_tol=0.0)  # calibrate
    calls.clear()
    _steps_in_lockstep(eager, graphed, 2, "cpu", loss_tol=0.0, grad_tol=0.0)  # capture, replay
    distinct = warm_up_layers != "all"
    assert seen == [(0, 1) if distinct else (0, 1, 2)]
    # per layer: its warm-up (not layer 2's with "distinct"), the forward capture and the emulated
    # replays of the two steps
    assert calls == ({0: 4, 1: 4, 2: 3} if distinct else {0: 4, 1: 4, 2: 4}), calls
    assert graphs.counts["capture"] == 1 and graphs.counts["replay"] == 6, dict(graphs.counts)
    graphs.remove()
    with pytest.raises(ValueError, match="warm_up_layers"):
        _graphs(graphed, warm_up_layers="first")


def test_layers_of_another_kind_get_their_own_warm_up():
    from hyclora.cuda_graphs import _first_of_each_kind

    model = _model()
    layers = list(_layers(model))
    x = torch.randn(2, 12, 64, requires_grad=True)
    samples = [(x,), (x,), (x,)]
    assert _first_of_each_kind(layers, samples) == (0,)
    assert _first_of_each_kind(layers, [(x,), (x[:, :6],), (x,)]) == (0, 1)  # another input shape
    layers[2].register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))  # another parameter set
    assert _first_of_each_kind(layers, samples) == (0, 2)
    layers[1].register_buffer("table", torch.zeros(5))  # another buffer set
    assert _first_of_each_kind(layers, samples) == (0, 1, 2)


def test_layer_chain_refuses_what_it_cannot_graph():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError, match="only the first input"):
        graph_layer_chain((layer,), ((x, torch.randn(2, 4, requires_grad=True)),), _capture=EmulatedCapture())
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing that requires grad"):
        graph_layer_chain((frozen,), ((torch.randn(2, 4),),), _capture=EmulatedCapture())
    class Pair(torch.nn.Linear):
        def forward(self, t):
            return super().forward(t), t

    with pytest.raises(RuntimeError, match="one tensor that requires grad"):
        graph_layer_chain((Pair(4, 4),), ((x,),), _capture=EmulatedCapture())


def test_layer_chain_with_s2attn_equals_eager():
    # LongLoRA's S²-Attn (no padding: the layers get no mask) is graphable; graphed = eager
    from hyclora.integrations.longseq import enable_s2attn

    eager = _model(every=0)
    enable_s2attn(eager, group_ratio=0.25)
    graphed = copy.deepcopy(eager)
    graphs = _graphs(graphed, grapher=chain_grapher, num_warmup_iters=1)
    for step in range(4):
        ids = _batch(step, s=16)
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        _compare(_lora_grads(graphed), _lora_grads(eager), 1e-6)
    assert graphs.counts["capture"] == 1 and graphs.counts["replay"] == 2 * 3, dict(graphs.counts)
    graphs.remove()
    # S²-Attn really ran (its groups change the loss against full causal attention)
    from hyclora.integrations.longseq import disable_s2attn

    ids = _batch(9, s=16)
    s2_loss = float(eager(input_ids=ids, labels=ids).loss)
    disable_s2attn(eager)
    assert abs(float(eager(input_ids=ids, labels=ids).loss) - s2_loss) > 1e-4


def test_a_failed_capture_names_the_fix():
    # the error a capture meets when the previous step's autograd graph is still alive (a loss
    # kept until it is reassigned; measured in launch/longseq.py on an H200) gets its cause named;
    # any other failure says to train without graphs
    def failing(message):
        def grapher(*args, **kwargs):
            raise RuntimeError(message)
        return grapher

    for message, expected in (
            ("CUDA error: operation would make the legacy stream depend on a capturing blocking stream",
             r"loss = loss.detach\(\)"),
            ("something else", r"Train without graphs \(graphs.remove\(\)\) and report this")):
        model = _model(every=0)
        graphs = _graphs(model, grapher=failing(message))
        for step in range(2):  # calibrate
            _backward(model, step)
        with pytest.raises(RuntimeError, match=expected):
            _backward(model, 2)
        graphs.remove()


def test_capture_silences_only_the_accumulate_grad_stream_warning():
    import warnings

    from hyclora.cuda_graphs import quiet_grad_stream_warning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_grad_stream_warning():
            warnings.warn("The AccumulateGrad node's stream does not match the stream of the node that produced "
                          "the incoming gradient.", UserWarning)
            warnings.warn("something else", UserWarning)
        warnings.warn("The AccumulateGrad node's stream does not match (outside)", UserWarning)
    assert [str(w.message) for w in seen] == ["something else",
                                              "The AccumulateGrad node's stream does not match (outside)"]


def test_capture_pauses_the_cyclic_garbage_collector():
    # a collection inside a capture could run CUDA destructors of earlier graphs; the state is
    # given back as it was, also after an error
    import gc

    from hyclora.cuda_graphs import no_cyclic_gc

    assert gc.isenabled()
    with no_cyclic_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="capture failed"):
        with no_cyclic_gc():
            raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_cyclic_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
