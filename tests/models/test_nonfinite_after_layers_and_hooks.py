"""Issue 20 items 2 and 3: a NaN born after the last decoder layer (final norm, logits, loss)
stops the step in the same backward, before any optimizer step; hooks on submodules of a
patched layer, which hyclora's fused training forward never calls, are reported by name."""

from __future__ import annotations

import warnings

import pytest
import torch

from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora, revert_hyclora
from hyclora.quant.checks import FiniteGuard

from hy_models_util import lora_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=3, b=2, s=11):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, s), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _layers(model):
    return model.base_model.model.model.layers


def _first_lora_a(model):
    return _layers(model)[0].self_attn.q_proj.lora_A["default"].weight


def _poison_final_norm(model):
    with torch.no_grad():
        model.base_model.model.model.norm.weight[0] = float("nan")


def _poison_lm_head(model):
    with torch.no_grad():
        model.base_model.model.lm_head.weight[5, 0] = float("inf")


def _poison_loss(model):
    # before hyclora's own output hook, as if the model's loss computation produced it
    model.base_model.model.register_forward_hook(
        lambda m, a, out: out.__setitem__("loss", out["loss"] * float("nan")), prepend=True)


@pytest.mark.parametrize("where, poison", [
    (r"model\.norm \(output of the final norm\)", _poison_final_norm),
    (r"the model's logits", _poison_lm_head),
    (r"the model's loss", _poison_loss),
])
@pytest.mark.parametrize("layer_type", ["baseline", "intra_inter"])
def test_nan_after_the_last_layer_stops_this_backward(where, poison, layer_type):
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=8))
    model.train()
    batch = _batch()
    model(**batch).loss.backward()  # a clean step first
    model.zero_grad(set_to_none=True)
    poison(model)
    loss = model(**batch).loss
    assert not torch.isfinite(loss)
    with pytest.raises(FloatingPointError, match=where):
        loss.backward()
    assert _first_lora_a(model).grad is None  # stopped before the first layer's gradients


def test_output_check_is_off_with_ignore_and_removed_on_revert():
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline", on_nonfinite="ignore"))
    _poison_final_norm(model)
    model.train()
    model(**_batch()).loss.backward()  # no check: NaN gradients, no error
    assert not torch.isfinite(_first_lora_a(model).grad).all()
    revert_hyclora(model)
    hf = model.get_base_model()
    assert "_hyclora_output_check" not in hf.__dict__ and not hf._forward_hooks


def test_one_host_read_per_step_with_the_output_checks(monkeypatch):
    reads = []
    original = FiniteGuard.raise_pending

    def counting(self):
        if self.num_pending:
            reads.append(self.num_pending)
        return original(self)

    monkeypatch.setattr(FiniteGuard, "raise_pending", counting)
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    model.train()
    for _ in range(2):
        model(**_batch()).loss.backward()
    # 2 layers x (input + output) + final norm + logits + loss, one read per step
    assert reads == [7, 7]


def test_hooks_on_submodules_are_reported_by_name():
    model = lora_model(tiny_model("llama", "sdpa"))
    fired = []

    def record_mlp(module, args, output):
        fired.append("mlp")

    _layers(model)[0].mlp.register_forward_hook(record_mlp)
    with pytest.warns(UserWarning, match=r"record_mlp.*layers\.0\.mlp does not run in hyclora's training forward"):
        apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, not at every step
        model(**_batch()).loss.backward()
    assert fired == []  # the documented behaviour: not in the training forward ...
    with torch.no_grad():
        model(**_batch())
    assert fired == ["mlp"]  # ... but under no_grad
    # a hook registered after apply_hyclora: reported at the next training forward
    _layers(model)[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: None)
    with pytest.warns(UserWarning, match=r"layers\.1\.self_attn\.q_proj does not run"):
        model(**_batch()).loss.backward()
    # the decoder layer's own hooks do fire: no warning for them
    _layers(model)[0].register_forward_hook(lambda m, a, o: fired.append("layer"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**_batch()).loss.backward()
    assert fired[-1] == "layer"
