"""The NaN/Inf check of the training path reads the device once per step (not once per block),
raises during the backward, before any optimizer step, and still names the earliest layer; a NaN
born after the last decoder layer (final norm, logits, loss) stops the same backward; hooks on
submodules of a patched layer, which hyclora's fused training forward never calls, are reported."""

from __future__ import annotations

import warnings

import pytest
import torch

from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora, revert_hyclora
from hyclora.quant.checks import FiniteGuard

from helpers.models import lora_model, tiny_model


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
    # 3 layers' output checks and the first layer's input check (a layer's input is the checked
    # output of the layer before; a reentrant checkpoint's recompute gets a new input tensor, checked
    # too), read together once per step (a non-reentrant recompute replays a checked forward and is
    # not checked again)
    inputs = 3 if ckpt == "reentrant" else 1
    # + the final norm's output and the loss (the default chunked LM loss builds no logits)
    assert reads == [inputs + 3 + 2, inputs + 3 + 2]

    reads.clear()
    with torch.no_grad():  # NaN from layer 1 on: layers 1 and 2 both see it
        _layers(model)[1].mlp.down_proj.base_layer.weight[0, 0] = float("nan")
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss  # the forward no longer stops ...
    assert not torch.isfinite(loss)
    bad = 5 if ckpt == "reentrant" else 4  # outputs of layers 1 and 2 (reentrant: layer 2's input), norm, loss
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1 \(output of the decoder layer\).*"
                                                 rf"{bad} of the {inputs + 5} places.*on_nonfinite='ignore'"):
        loss.backward()  # ... the backward does, before the first layer's gradients exist
    assert reads == [inputs + 5]
    first_a = _layers(model)[0].self_attn.q_proj.lora_A["default"].weight
    assert first_a.grad is None


def test_an_output_changed_in_place_is_checked_again_as_the_next_input(reads):
    """A layer's input is not checked again when it is the previous layer's checked output, unless
    it changed since: a hook that writes a NaN into layer 0's output in place is caught at layer 1's input."""
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4))
    model.train()

    def poison(module, args, out):
        (out[0] if isinstance(out, tuple) else out).view(-1)[0] = float("nan")

    _layers(model)[0].register_forward_hook(poison)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a hook on the layer itself is not reported
        loss = model(**_batch()).loss
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1 \(input of the decoder layer\)"):
        loss.backward()
    assert reads == [6]  # the first input, layer 1's input, 2 outputs, final norm, loss


def test_forward_without_backward_is_read_at_the_next_step(reads):
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    model.train()
    batch = _batch()
    model(**batch)  # e.g. a train-mode loss for logging, never backpropagated
    assert reads == []
    model(**batch).loss.backward()
    assert reads == [5, 5]  # the stale flags first, then this step's (first input + 2 layer outputs + norm + loss)


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


# -- after the last decoder layer (final norm, logits, loss), and hooks on submodules ------------

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


@pytest.mark.parametrize("where, poison, lm_loss", [
    (r"model\.norm \(output of the final norm\)", _poison_final_norm, "auto"),
    (r"the model's logits", _poison_lm_head, "model"),
    (r"the model's loss", _poison_lm_head, "auto"),  # the chunked loss: no logits to check
    (r"the model's loss", _poison_loss, "auto"),
])
@pytest.mark.parametrize("layer_type", ["baseline", "intra_inter"])
def test_nan_after_the_last_layer_stops_this_backward(where, poison, lm_loss, layer_type):
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=8, lm_loss=lm_loss))
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


def test_one_host_read_per_step_with_the_output_checks(reads):
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    model.train()
    for _ in range(2):
        model(**_batch()).loss.backward()
    # the first layer's input, 2 layer outputs (each the next layer's input), final norm, loss
    # (the default chunked LM loss builds no logits): one read per step
    assert reads == [5, 5]


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


def test_hook_scan_skips_tensor_hooks_but_not_a_swapped_submodule_hook():
    """The scan is skipped while the submodules' hooks are unchanged, though torch's handle
    counter moves every step (FiniteGuard's tensor hook); a hook removed and another added
    between two steps (same count of hooks) is still reported."""
    from hyclora.models import adapter as adapter_module

    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    model.train()
    first, second = (lambda m, a, o: None), (lambda m, a, o: None)  # both kept: distinct ids
    old = _layers(model)[0].mlp.register_forward_hook(first)
    with pytest.warns(UserWarning, match=r"layers\.0\.mlp does not run"):
        model(**_batch()).loss.backward()
    scans = []
    real_user_hooks = adapter_module._user_hooks
    adapter_module._user_hooks = lambda submodules: scans.append(1) or real_user_hooks(submodules)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(**_batch()).loss.backward()
        assert scans == []  # nothing changed on the submodules: no scan
        old.remove()
        _layers(model)[0].mlp.register_forward_hook(second)
        with pytest.warns(UserWarning, match=r"layers\.0\.mlp does not run"):
            model(**_batch()).loss.backward()
    finally:
        adapter_module._user_hooks = real_user_hooks
