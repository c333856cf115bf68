"""The NaN/Inf check of the training path reads the device once per step (not once per block),
raises during the backward, before any optimizer step, and still names the earliest layer."""

from __future__ import annotations

import pytest
import torch

from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora
from hyclora.quant.checks import FiniteGuard

from hy_models_util import lora_model, tiny_model


def _batch(seed=3, b=2, s=11):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, s), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _layers(model):
    return model.base_model.model.model.layers


@pytest.fixture
def reads(monkeypatch):
    """Counts the host reads of the deferred check (raise_pending calls with flags pending)."""
    calls = []
    original = FiniteGuard.raise_pending

    def counting(self):
        if self.num_pending:
            calls.append(self.num_pending)
        return original(self)

    monkeypatch.setattr(FiniteGuard, "raise_pending", counting)
    return calls


@pytest.mark.parametrize("ckpt", [None, "reentrant", "non_reentrant"])
@pytest.mark.parametrize("layer_type", ["baseline", "intra_inter"])
def test_one_host_read_per_step_and_error_names_the_earliest_layer(reads, ckpt, layer_type):
    model = lora_model(tiny_model("llama", "sdpa", num_hidden_layers=3))
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=4))
    if ckpt is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ckpt == "reentrant"})
    model.train()
    batch = _batch()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
    # 3 layers x (input + output check), read together once per step (a non-reentrant
    # recompute replays a checked forward and is not checked again)
    assert reads == [6 + 3, 6 + 3]  # + the final norm's output, the logits and the loss

    reads.clear()
    with torch.no_grad():  # NaN from layer 1 on: layers 1 and 2 both see it
        _layers(model)[1].mlp.down_proj.base_layer.weight[0, 0] = float("nan")
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss  # the forward no longer stops ...
    assert not torch.isfinite(loss)
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1 \(output of the decoder layer\).*"
                                                 r"6 of the 9 places.*on_nonfinite='ignore'"):
        loss.backward()  # ... the backward does, before the first layer's gradients exist
    assert reads == [9]
    first_a = _layers(model)[0].self_attn.q_proj.lora_A["default"].weight
    assert first_a.grad is None


def test_forward_without_backward_is_read_at_the_next_step(reads):
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    model.train()
    batch = _batch()
    model(**batch)  # e.g. a train-mode loss for logging, never backpropagated
    assert reads == []
    model(**batch).loss.backward()
    assert reads == [7, 7]  # the stale flags first, then this step's (4 layer + 3 output checks)


def test_ignore_records_nothing(reads):
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline", on_nonfinite="ignore"))
    with torch.no_grad():
        _layers(model)[0].mlp.down_proj.base_layer.weight[0, 0] = float("nan")
    model.train()
    model(**_batch()).loss.backward()
    assert reads == []


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten::_local_scalar_dense: every .item()/bool()/int() of a tensor and every
    indexing with a 0-d tensor; each one is a device->host sync on CUDA."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layer_type", [
    "baseline",
    "intra_inter",
    "intra_inter_full_fuse",
])
def test_no_host_reads_in_a_steady_state_step(layer_type):
    model = lora_model(tiny_model("llama", "sdpa"))
    cfg = HyCLoRAConfig(layer_type=layer_type, q_bit=2, kernel_backend="torch", iteration_threshold=1)
    apply_hyclora(model, cfg)
    model.train()
    batch = _batch(b=2, s=16)  # 32 rows: enough for the exact outlier rows to be taken
    for _ in range(2):  # calibrate and freeze
        model(**batch).loss.backward()
    with _ScalarReads() as reads:
        model(**batch).loss.backward()
    assert reads.n == 0
