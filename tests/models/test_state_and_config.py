"""hyclora's per-layer state in checkpoints (accelerate's safetensors ``save_state`` /
``load_state``, ``save_pretrained`` of a merged model) and HyCLoRAConfig's type checks and
assignment rules (issue 20, items 1 and 6)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from hyclora.config import ConfigInUseError, HyCLoRAConfig
from hyclora.models import apply_hyclora, revert_hyclora
from hyclora.models.state import exclude_state_from_save_pretrained, include_state_in_save_pretrained

from helpers.models import lora_model, needs_quant, tiny_model

# 5% outlier channels: the 64-wide norm inputs get 3 exact channels, every other statistic none
# (an empty outlier_idx, which safetensors used to drop). Statistics freeze after 2 counted
# forwards and expire after 2 more, so a run of 6 steps crosses a recalibration.
CONFIG = dict(layer_type="intra_inter", q_bit=4, iteration_threshold=2, recalibrate_every=2,
              layernorm_outlier_ratio=0.05)


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _model():
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(**CONFIG))
    return model


def _train(model, optimizer, steps):
    model.train()
    losses = []
    for step in steps:
        loss = model(**_batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _hyclora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".hyclora_state." in k}


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture
def accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@needs_quant
def test_accelerate_save_state_load_state_round_trips_the_calibration_state(tmp_path, accelerator_state):
    from accelerate import Accelerator
    from safetensors.torch import load_file

    def setup():
        acc = Accelerator(cpu=True)
        model = _model()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model, opt = acc.prepare(model, opt)
        return acc, model, opt

    acc, model, opt = setup()
    # 3 steps: frozen after 2, one forward into the frozen window (expires after step 4)
    _train(model, opt, range(3))
    before = _hyclora_state(model)
    empty = [k for k in before if k.endswith("outlier_idx") and before[k].numel() == 0]
    assert not empty  # no zero-element tensor reaches state_dict (safetensors drops them)
    assert any(k.endswith("x_in.outlier_idx") and before[k].numel() == 3 for k in before)
    used = [k[: -len("count")] for k, v in before.items() if k.endswith(".count") and int(v) == 2]
    assert used and {int(before[k + "frozen_forwards"]) for k in used} == {1}  # o / V: unused with sdpa
    acc.save_state(str(tmp_path / "ckpt"))  # safetensors, the default
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert before.keys() <= saved.keys()

    acc2, resumed, opt2 = setup()
    acc2.load_state(str(tmp_path / "ckpt"))  # strict: failed on the dropped outlier_idx keys
    _assert_equal_states(_hyclora_state(resumed), before)
    # the resumed run continues exactly as the uninterrupted one, through the recalibration
    # after step 4 (a count since freezing that restarted at 0 expired it a step late)
    losses_a = _train(model, opt, range(3, 7))
    losses_b = _train(resumed, opt2, range(3, 7))
    assert losses_b == losses_a
    _assert_equal_states(_hyclora_state(resumed), _hyclora_state(model))


@needs_quant
def test_channel_stats_state_dict_has_no_empty_tensor_and_old_checkpoints_load():
    from hyclora.quant import ChannelStats

    none = ChannelStats(8, num_outliers=0, iteration_threshold=1, recalibrate_every=3)
    some = ChannelStats(8, num_outliers=2, iteration_threshold=1, recalibrate_every=3)
    window = {"next_lo", "next_hi", "next_score", "observing", "window_observed"}
    assert set(none.state_dict()) == {"lo", "hi", "outlier_score", "count", "frozen_forwards"} | window
    assert set(some.state_dict()) == {"lo", "hi", "outlier_score", "outlier_idx", "count", "frozen_forwards"} | window
    assert all(t.numel() > 0 for t in none.state_dict().values())
    assert none.outlier_idx.numel() == 0  # still there for the code that reads it
    # a checkpoint written before: an empty outlier_idx, no frozen_forwards or window; strict load works
    old = {k: v for k, v in none.state_dict().items() if k != "frozen_forwards" and k not in window}
    old["outlier_idx"] = torch.empty(0, dtype=torch.long)
    ChannelStats(8, num_outliers=0).load_state_dict(old, strict=True)
    # statistics built under inference_mode still give a state_dict outside it
    with torch.inference_mode():
        frozen_in_inference = ChannelStats(8)
    assert int(frozen_in_inference.state_dict()["frozen_forwards"]) == 0
    # ... but a non-empty outlier_idx for stats without outlier channels is still refused
    old["outlier_idx"] = torch.tensor([1])
    with pytest.raises(RuntimeError, match="outlier_idx"):
        ChannelStats(8, num_outliers=0).load_state_dict(old, strict=True)


@needs_quant
def test_channel_stats_expire_at_the_same_forward_after_a_round_trip():
    from hyclora.quant import ChannelStats

    def forward(s, step):
        s.note_counted_forward()
        s.range_for(torch.randn(4, 8, generator=torch.Generator().manual_seed(step)))

    a = ChannelStats(8, num_outliers=0, iteration_threshold=1, recalibrate_every=3)
    for step in range(3):  # 1 calibrating forward, 2 frozen ones
        forward(a, step)
    b = ChannelStats(8, num_outliers=0, iteration_threshold=1, recalibrate_every=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert int(b.frozen_forwards) == 2
    for step in range(3, 9):
        assert b.expires_at_next_forward() == a.expires_at_next_forward(), step
        forward(a, step)
        forward(b, step)
        assert torch.equal(a.lo, b.lo) and int(a.count) == int(b.count), step
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@needs_quant
def test_merged_model_saves_the_plain_models_keys(tmp_path):
    from safetensors.torch import load_file

    model = _model()
    exclude_state_from_save_pretrained(model)  # apply_hyclora's job once wired there
    assert exclude_state_from_save_pretrained(model) == 0  # idempotent
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _train(model, opt, range(2))
    # the PEFT model's state_dict keeps the statistics (Trainer / accelerate checkpoints)
    state = _hyclora_state(model)
    assert len(state) > 20
    merged = model.merge_and_unload()  # the transformers model, its layers still patched
    assert any(".hyclora_state." in k for k in merged.state_dict())
    merged.save_pretrained(str(tmp_path / "merged"))
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(saved) == set(tiny_model("llama", "sdpa").state_dict())

    # revert_hyclora (with include_state_in_save_pretrained) leaves the set as it found it
    other = lora_model(tiny_model("llama", "sdpa"))
    hf = other.get_base_model()
    before = set(hf._keys_to_ignore_on_save or ())
    apply_hyclora(other, HyCLoRAConfig(**CONFIG))
    exclude_state_from_save_pretrained(other)
    assert set(hf._keys_to_ignore_on_save) > before
    include_state_in_save_pretrained(other)
    revert_hyclora(other)
    assert set(hf._keys_to_ignore_on_save or ()) == before


# -- HyCLoRAConfig ---------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("q_bit", 4.0), ("q_bit", True), ("q_bit", "4"), ("q_bit", 6),
    ("iteration_threshold", 5.0), ("iteration_threshold", False),
    ("recalibrate_every", 50.0), ("recalibrate_every", True),
])
def test_config_refuses_non_int_values_for_int_fields(field, value):
    with pytest.raises(ValueError, match=rf"HyCLoRAConfig\.{field}="):
        HyCLoRAConfig(**{field: value})


def test_config_assignment_is_validated_and_a_bad_value_is_not_kept():
    cfg = HyCLoRAConfig(q_bit=4)
    cfg.q_bit = 2  # a valid change before apply_hyclora is fine
    assert cfg.q_bit == 2
    with pytest.raises(ValueError, match=r"HyCLoRAConfig\.q_bit=6 is invalid: expected an int, one of 2, 4, 8"):
        cfg.q_bit = 6
    assert cfg.q_bit == 2
    with pytest.raises(ValueError, match=r"HyCLoRAConfig\.q_bit=4\.0"):
        cfg.q_bit = 4.0
    with pytest.raises(ValueError, match="layer_type"):
        cfg.layer_type = "intra-inter"
    assert cfg == HyCLoRAConfig(q_bit=2)
    cfg.attention_probs = "sparse"  # the tests' way of setting a knob before applying
    assert cfg.attention_probs == "sparse"


def test_config_in_use_refuses_assignment_and_names_the_fix():
    cfg = HyCLoRAConfig(q_bit=4)
    cfg._attach()  # what apply_hyclora does
    assert cfg.in_use
    with pytest.raises(ConfigInUseError, match=r"revert_hyclora\(model\).*apply_hyclora\(model, "
                       r"dataclasses\.replace\(config, q_bit=2\)\)"):
        cfg.q_bit = 2
    with pytest.raises(AttributeError):  # ConfigInUseError is an AttributeError
        cfg.iteration_threshold = 1
    assert cfg.q_bit == 4 and cfg.iteration_threshold == 5
    fresh = dataclasses.replace(cfg, q_bit=2)  # the fix the message names
    assert fresh.q_bit == 2 and not fresh.in_use
    cfg._detach()  # revert_hyclora
    cfg.q_bit = 8
    assert cfg.q_bit == 8 and cfg.to_dict()["q_bit"] == 8
    assert "_in_use" not in cfg.to_dict() and "in_use" not in cfg.to_dict()


def test_apply_hyclora_locks_the_config_and_saves_plain_keys_until_revert(tmp_path):
    from safetensors.torch import load_file

    model = lora_model(tiny_model("llama", "sdpa"))
    cfg = HyCLoRAConfig(layer_type="intra_inter", q_bit=4)
    apply_hyclora(model, cfg)
    with pytest.raises(ConfigInUseError, match=r"revert_hyclora\(model\)"):
        cfg.q_bit = 2  # used to fail much later with "bits=6 is not supported" style errors
    x = torch.randint(3, 128, (2, 9))
    model(input_ids=x, labels=x).loss.backward()
    merged = copy.deepcopy(model).merge_and_unload()  # without revert_hyclora
    merged.save_pretrained(str(tmp_path / "merged"))
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("hyclora_state" in k for k in saved)
    revert_hyclora(model)
    cfg.q_bit = 2  # free again
    assert cfg.q_bit == 2


def test_statistics_follow_the_tensor_spec_table():
    from hyclora.ops import tensor_specs as ts

    # the storage rules the table encodes (see its module docstring for why)
    assert ts.GROUPED_TENSORS == {"v", "o", "hidden"} and ts.ROW_OUTLIER_EXEMPT == {"gate", "up"}
    # attn_out / mlp_out: the post-norm inputs of Gemma's sandwich norms (rows of the POST_NORMS
    # feature: only layers with post-norms keep them or own statistics for them)
    assert ts.double_bit_names(ts.DECODER) == {"x_in", "x_mid", "q", "k", "gate", "attn_out", "mlp_out"}
    assert {s.name for s in ts.SPECS if s.feature == ts.POST_NORMS} == {
        "attn_out", "rstd_attn_out", "mlp_out", "rstd_mlp_out"}
    assert ts.double_bit_names(ts.ENCODER) == {"k"}
    assert ts.stats_names(ts.DECODER, "intra") == ("x_in", "q", "k", "v", "o", "x_mid", "gate", "up", "silu", "hidden")
    assert ts.stats_names(ts.ENCODER, "intra_inter") == ("x_n1", "q", "k", "v", "o", "z1", "x_n2", "up", "z2")
    assert ts.stats_names(ts.DECODER, "baseline") == ()
    layer = _model().base_model.model.model.layers[0]
    stats = layer.hyclora_state.stats
    assert tuple(stats) == ts.stats_names(ts.DECODER, "intra_inter")
    # 64-wide norm inputs at a 5% ratio: 3 exact channels; every other statistic none
    assert {n: s.num_outliers for n, s in stats.items() if s.num_outliers} == {"x_in": 3, "x_mid": 3}
