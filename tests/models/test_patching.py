"""Layer patching by class swap (hyclora.models.patching) on the installed transformers: HF's
activation checkpointing really recomputes hyclora's layers and the saved bytes drop; a
wrapper that would bypass hyclora's forward is refused; revert, deepcopy and pickle work."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from hyclora.compat import checkpointing_disable, checkpointing_enable, is_checkpointing
from hyclora.config import HyCLoRAConfig
from hyclora.memory import measure_saved_tensors
from hyclora.models import apply_hyclora, is_patched, revert_hyclora
from hyclora.models.adapter import LayerAdapter, in_backward_pass
from hyclora.models.patching import is_forward_patched, original_class

from helpers.models import lora_model, step_grads, tiny_model
from helpers.numerics import worst_rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layers(model):
    return list(model.get_base_model().model.layers)


def _batch(seed=0, b=2, s=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (b, s), generator=gen)
    return {"input_ids": ids, "labels": ids}


@pytest.fixture
def hyclora_forwards(monkeypatch):
    """Counts of hyclora's compressed decoder-layer forwards, outside and inside the backward
    (a checkpoint's recompute runs inside it)."""
    counts = {"forward": 0, "recompute": 0}
    inner = LayerAdapter.compressed_forward

    def counting(self, layer, patch, args, kwargs):
        counts["recompute" if in_backward_pass() else "forward"] += 1
        return inner(self, layer, patch, args, kwargs)

    monkeypatch.setattr(LayerAdapter, "compressed_forward", counting)
    return counts


@pytest.mark.parametrize("layer_type", ["baseline", "intra_inter"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_checkpointing_recomputes_hyclora_layers(hyclora_forwards, layer_type, reentrant):
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=8))
    batch = _batch()
    _, g_plain = step_grads(model, batch)
    assert hyclora_forwards == {"forward": 2, "recompute": 0}

    checkpointing_enable(model, use_reentrant=reentrant)
    assert is_checkpointing(model)
    hyclora_forwards.update(forward=0, recompute=0)
    _, g_ckpt = step_grads(model, batch)
    # non-reentrant: compressed first pass + recompute in the backward; reentrant: the first pass
    # runs without grad (the original forward), the compressed one runs inside the backward
    assert hyclora_forwards == {"forward": 0 if reentrant else 2, "recompute": 2}
    tol = 1e-6 if layer_type == "baseline" else 0.05  # the recompute re-quantises with frozen-or-updated ranges
    assert worst_rel_err(g_ckpt, g_plain) <= tol

    checkpointing_disable(model)
    hyclora_forwards.update(forward=0, recompute=0)
    step_grads(model, batch)
    assert hyclora_forwards == {"forward": 2, "recompute": 0}


def test_checkpointing_drops_the_saved_bytes():
    model = lora_model(tiny_model("llama", "sdpa", num_hidden_layers=4))
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4))
    model.train()
    batch = _batch(s=32)
    layers = _layers(model)

    def saved():
        loss, report = measure_saved_tensors(model, lambda: model(**batch).loss, layers=layers)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(report.layer_bytes())

    plain = saved()
    checkpointing_enable(model)
    ckpt = saved()
    # only the checkpoint boundaries stay: the exact fp32 layer inputs (counted in the layers'
    # regions where transformers checkpoints forward inside the module hooks, from 5.23)
    boundaries = len(layers) * batch["input_ids"].numel() * model.config.hidden_size * 4
    assert ckpt <= boundaries < plain / 2, (ckpt, boundaries, plain)


def test_class_swap_keeps_name_state_and_reverts():
    model = lora_model(tiny_model("llama", "sdpa"))
    layer = _layers(model)[0]
    cls, keys = type(layer), set(model.state_dict())
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    assert is_forward_patched(layer) and isinstance(layer, cls) and original_class(layer) is cls
    assert type(layer).__name__ == cls.__name__ and "forward" not in layer.__dict__
    assert repr(layer).startswith(cls.__name__)
    # copies keep the patch and train on their own
    twin = copy.deepcopy(model)
    assert is_patched(twin) and type(_layers(twin)[0]) is type(layer)
    _, g = step_grads(model, _batch())
    _, g_twin = step_grads(twin, _batch())
    assert worst_rel_err(g_twin, g) == 0
    # pickle finds the subclass by its qualified name in this process
    again = pickle.loads(pickle.dumps(model))
    assert is_patched(again) and type(_layers(again)[0]) is type(layer)
    revert_hyclora(model)
    assert type(layer) is cls and not is_patched(model)
    assert set(model.state_dict()) == keys
    assert type(model.get_base_model().model.norm).__module__.startswith("transformers.")


def test_a_shadowing_instance_forward_is_refused():
    model = lora_model(tiny_model("llama", "sdpa"))
    layer = _layers(model)[1]
    original = layer.forward
    # what accelerate's device-map hooks do: an instance forward calling the bound class forward
    layer.forward = lambda *args, **kwargs: original(*args, **kwargs)
    with pytest.raises(RuntimeError, match=r"layers\.1 would not run hyclora's forward: an instance-level forward"):
        apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    # refused before anything stays patched
    assert not is_patched(model) and not any(is_forward_patched(m) for m in model.modules())


def test_revert_refuses_an_instance_forward_installed_after():
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    layer = _layers(model)[0]
    inner = layer.forward
    layer.forward = lambda *a, **k: inner(*a, **k)
    with pytest.raises(ValueError, match="instance-level forward installed after apply_hyclora"):
        revert_hyclora(model)
    del layer.forward
    revert_hyclora(model)
    assert not is_patched(model)
