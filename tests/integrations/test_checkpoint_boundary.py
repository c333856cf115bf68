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
def test_same_loss_close_gradients_lower_peak(hyclora):
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
