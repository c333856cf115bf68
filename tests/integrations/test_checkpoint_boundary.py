"""Compressed checkpoint boundaries (enable_activation_checkpointing(boundary_bits=...)): the forward
is unchanged, the gradients stay close to the exact ones, and the live peak of a step drops."""

import pytest
import torch

pytest.importorskip("peft")

from hyclora import HyCLoRAConfig, apply_hyclora  # noqa: E402
from hyclora.demo import build_tiny_llama  # noqa: E402
from hyclora.integrations.checkpointing import (  # noqa: E402
    BoundaryCodec,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)
from hyclora.memory import measure_live_peak  # noqa: E402


def _model():
    model, _ = build_tiny_llama(hidden=128, layers=3, heads=4, kv_heads=2, ffn=344, vocab=256)
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _cos(a, b):
    assert a.keys() == b.keys()
    c = [torch.nn.functional.cosine_similarity(a[n].flatten(), b[n].flatten(), 0).item() for n in a]
    return min(c)


def test_codec_round_trip_keeps_outlier_channels_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 100)
    x[..., 7] *= 500.0  # a massive channel, as in a trained Llama's residual stream
    codec = BoundaryCodec(bits=8, outlier_ratio=0.01)
    x_hat = codec.restore(codec.compress(x))
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert torch.equal(x_hat[..., 7], x[..., 7])
    rel = (x_hat - x).norm() / x.norm()
    assert rel < 0.01
    with pytest.raises(ValueError, match="boundary_bits"):
        BoundaryCodec(bits=3)


@pytest.mark.parametrize("hyclora", [False, True])
def test_same_loss_close_gradients_lower_peak(hyclora, monkeypatch):
    import hyclora.integrations.checkpointing as ck

    monkeypatch.setattr(ck, "PLAIN_FIRST_PASS_ELEMENTS", 0)  # the non-reentrant path (its peak is below)
    model = _model()
    if hyclora:
        apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4, iteration_threshold=1))
    ids = torch.randint(0, 256, (1, 384), generator=torch.Generator().manual_seed(0))
    enable_activation_checkpointing(model, backend="torch")
    _step(model, ids)  # calibration step (hyclora)
    loss_exact, g_exact = _step(model, ids)
    _, peak_exact = measure_live_peak(lambda: _step(model, ids), model=model, snapshot=False)

    summary = enable_activation_checkpointing(model, backend="torch", boundary_bits=8)
    assert summary["boundary_bits"] == 8
    loss_8, g_8 = _step(model, ids)
    assert torch.equal(loss_8, loss_exact)  # the forward sees the exact layer inputs
    assert _cos(g_exact, g_8) > 0.999
    _, peak_8 = measure_live_peak(lambda: _step(model, ids), model=model, snapshot=False)
    # 3 boundaries of 384 x 128 fp32 (192 KiB each) are kept at ~1/4 of their bytes
    assert peak_8.peak_bytes < peak_exact.peak_bytes
    disable_activation_checkpointing(model)


def test_boundary_bits_needs_torch_non_reentrant():
    model = _model()
    with pytest.raises(ValueError, match="non-reentrant"):
        enable_activation_checkpointing(model, backend="torch", use_reentrant=True, boundary_bits=4)


def _count_plain_first_passes(monkeypatch):
    import hyclora.integrations.checkpointing as ck

    calls = []
    original = ck._PlainFirstPass.apply

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(ck._PlainFirstPass, "apply", spy)
    return calls


def _reference_grads(ids):
    model = _model()  # same seed: same weights and LoRA init
    return _step(model, ids)[1]


@pytest.mark.parametrize("layer_type", ["intra_inter", "intra_inter_full_fuse"])
def test_plain_first_pass_same_loss_same_fidelity(monkeypatch, layer_type):
    """Short inputs: the checkpointed first pass is the layer's original forward (no_grad) and the
    backward recomputes with hyclora; against the compressed first pass of non-reentrant
    checkpointing: the same losses, the same gradients while calibrating, and the same fidelity
    against exact gradients once frozen (the statistics come from the restored boundary instead
    of the exact one)."""
    import hyclora.integrations.checkpointing as ck

    ids = torch.randint(0, 256, (1, 384), generator=torch.Generator().manual_seed(0))
    ref = _reference_grads(ids)
    runs = {}
    for plain in (True, False):
        monkeypatch.setattr(ck, "PLAIN_FIRST_PASS_ELEMENTS", 1 << 25 if plain else 0)
        calls = _count_plain_first_passes(monkeypatch)
        model = _model()
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=4, iteration_threshold=2))
        enable_activation_checkpointing(model, backend="torch", boundary_bits=8)
        layer = next(m for m in model.modules() if hasattr(m, "hyclora_state"))
        steps = []
        for i in range(4):
            steps.append(_step(model, ids))
            assert int(layer.hyclora_state.forward_count) == i + 1  # one counted forward per step
        assert len(calls) == (4 * 3 if plain else 0)  # 3 checkpointed layers per step
        runs[plain] = steps
    for (loss_p, g_p), (loss_n, g_n) in zip(runs[True], runs[False]):
        assert torch.equal(loss_p, loss_n)
    if layer_type == "intra_inter":  # op by op: the calibrating steps agree bit for bit
        assert all(torch.equal(runs[True][0][1][n], runs[False][0][1][n]) for n in runs[False][0][1])
    cos_p, cos_n = _cos(runs[True][-1][1], ref), _cos(runs[False][-1][1], ref)
    assert cos_p > 0.99 and abs(cos_p - cos_n) < 1e-3


def test_plain_first_pass_not_taken_with_dropout_or_long_inputs(monkeypatch):
    import hyclora.integrations.checkpointing as ck

    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    model = _model()
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4, iteration_threshold=1))
    enable_activation_checkpointing(model, backend="torch", boundary_bits=8)
    calls = _count_plain_first_passes(monkeypatch)
    monkeypatch.setattr(ck, "PLAIN_FIRST_PASS_ELEMENTS", 96 * 128 - 1)  # one element too few
    _step(model, ids)
    assert not calls
    monkeypatch.setattr(ck, "PLAIN_FIRST_PASS_ELEMENTS", 96 * 128)
    _step(model, ids)
    assert len(calls) == 3
    # dropout anywhere in the layer: the two passes would draw different masks
    layer = next(m for m in model.modules() if hasattr(m, "hyclora_state"))
    x = torch.zeros(1, 96, 128)
    assert ck._plain_first_pass_ok(layer, lambda t: t, x)
    layer.self_attn.attention_dropout = 0.1
    assert not ck._plain_first_pass_ok(layer, lambda t: t, x)
    layer.self_attn.attention_dropout = 0.0
    layer.extra_dropout = torch.nn.Dropout(0.1)
    assert not ck._plain_first_pass_ok(layer, lambda t: t, x)
    layer.extra_dropout.p = 0.0  # p is read per call; the module list is cached
    assert ck._plain_first_pass_ok(layer, lambda t: t, x)
    layer.extra_dropout = torch.nn.Dropout(0.2)  # a re-registration refreshes the cache
    assert not ck._plain_first_pass_ok(layer, lambda t: t, x)
    del layer.extra_dropout
    layer.extra_linear = torch.nn.Linear(2, 2)  # any registration: the cached walk is redone
    assert ck._plain_first_pass_ok(layer, lambda t: t, x)
    assert any(p is layer.extra_linear.weight for p in ck._layer_structure(layer)[0])
    del layer.extra_linear
    # a bound keyword tensor that needs a gradient would not get one
    import functools

    assert not ck._plain_first_pass_ok(layer, functools.partial(lambda t, e: t, e=torch.ones(2, requires_grad=True)), x)
    p = next(layer.parameters())
    p.ds_id = 0  # a DeepSpeed ZeRO-3 parameter
    assert not ck._plain_first_pass_ok(layer, lambda t: t, x)
    del p.ds_id
    model.eval()
    assert not ck._plain_first_pass_ok(layer, lambda t: t, x)


def test_plain_first_pass_peak_close_to_compressed_pass(monkeypatch):
    """The plain first pass keeps the incoming gradient and the recomputed output of one layer
    alive while it differentiates the recompute (two (tokens, hidden) tensors more than the
    non-reentrant checkpoint, which stops its recompute early)."""
    import hyclora.integrations.checkpointing as ck

    ids = torch.randint(0, 256, (1, 384), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for plain in (True, False):
        monkeypatch.setattr(ck, "PLAIN_FIRST_PASS_ELEMENTS", 1 << 25 if plain else 0)
        model = _model()
        apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4, iteration_threshold=1))
        enable_activation_checkpointing(model, backend="torch", boundary_bits=8)
        _step(model, ids)
        _, rep = measure_live_peak(lambda: _step(model, ids), model=model, snapshot=False)
        peaks[plain] = rep.peak_bytes
    hidden_bytes = 384 * 128 * 4
    assert peaks[True] <= peaks[False] + 2 * hidden_bytes


def test_plain_first_pass_longlora_recipe_with_s2attn(monkeypatch):
    """LongLoRA's recipe (LoRA + trainable embeddings and norms) with S²-Attn: the trainable norm
    weights are inputs of the plain first pass's Function, so they get the same gradients as under
    the non-reentrant path (up to rounding)."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import hyclora.integrations.checkpointing as ck
    from hyclora.integrations.longseq import enable_s2attn, longlora_lora_config

    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(3))
    grads = {}
    for plain in (True, False):
        monkeypatch.setattr(ck, "PLAIN_FIRST_PASS_ELEMENTS", 1 << 25 if plain else 0)
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
        model = get_peft_model(LlamaForCausalLM(cfg), longlora_lora_config(r=4, lora_alpha=8, model=None))
        with torch.no_grad():  # as after some training, so the LoRA-A gradients are not zero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.01)
        enable_s2attn(model)
        apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=8, iteration_threshold=1))
        enable_activation_checkpointing(model, backend="torch", boundary_bits=8)
        calls = _count_plain_first_passes(monkeypatch)
        model.train()
        loss, g = _step(model, ids)
        assert len(calls) == (2 if plain else 0)
        assert any("norm" in n for n in g) and any("embed" in n for n in g) and any("lora_A" in n for n in g)
        grads[plain] = (loss, g)
    assert torch.equal(grads[True][0], grads[False][0])
    assert grads[True][1].keys() == grads[False][1].keys()
    for n, ref in grads[False][1].items():
        got = grads[True][1][n]
        # statistics calibrated on the restored boundary (the recompute) instead of the exact one
        # (the first pass), and another summation order: rounding-level differences (~3e-7)
        assert float((got - ref).norm()) <= 1e-5 * float(ref.norm()) + 1e-12, n

