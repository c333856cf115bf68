"""The shipped DeepSpeed configs: valid, fully resolvable ("auto") both by HF's Trainer logic and by
our fill_auto for plain loops, accepted by DeepSpeed, and with the settings hyclora relies on."""

import json
from types import SimpleNamespace

import pytest

deepspeed = pytest.importorskip("deepspeed")

from hyclora.integrations.deepspeed import (  # noqa: E402
    DS_CONFIG_DIR,
    activation_checkpointing_settings,
    fill_auto,
    find_auto,
    load_config,
    zero_stage,
)

CONFIGS = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
EXPECTED = {"zero1", "zero2", "zero3", "zero3_offload", "zero2_actckpt", "zero3_actckpt", "zero3_actckpt_cpu"}


def test_all_expected_configs_shipped():
    assert EXPECTED <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_resolves_and_deepspeed_accepts_it(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = load_config(name)
    assert find_auto(raw), "configs are meant to leave batch/precision to the trainer ('auto')"
    cfg = fill_auto(raw, micro_batch_size=2, gradient_accumulation_steps=3, world_size=1, hidden_size=64)
    assert find_auto(cfg) == []
    assert cfg["train_batch_size"] == 6
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_optimization_stage == zero_stage(name) == int(name[4])
    if parsed.zero_optimization_stage == 3:
        # HF bucket rules; the persistence threshold decides which LoRA tensors stay unpartitioned.
        assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 640
        assert cfg["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        # Without it, Trainer saves only a DeepSpeed checkpoint and the adapter file is empty.
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_trainer_fills_every_auto(name):
    """The same files under HF Trainer: its own 'auto' logic must leave nothing unresolved."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(load_config(name))
    args = SimpleNamespace(
        world_size=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0,
        learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=True, bf16_full_eval=False,
        get_warmup_steps=lambda n: 0,
    )
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=4096)), 100)
    assert find_auto(hf.config) == []
    assert hf.config["train_batch_size"] == 16 and hf.config["bf16"]["enabled"] is True


def test_offload_config_lets_a_torch_optimizer_run():
    cfg = load_config("zero3_offload")
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_actckpt_configs_carry_the_block():
    assert activation_checkpointing_settings("zero3_actckpt_cpu")["cpu_checkpointing"] is True
    plain = activation_checkpointing_settings("zero3_actckpt")
    assert plain["cpu_checkpointing"] is False and plain["number_checkpoints"] is None
    # The non-checkpointing configs carry no block on purpose (it would look active and is not).
    assert "activation_checkpointing" not in load_config("zero3")


def test_fill_auto_keeps_explicit_values_and_reports_leftovers():
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(ValueError, match=r"optimizer\.params\.lr"):
        fill_auto(cfg, micro_batch_size=2, world_size=1)
    out = fill_auto(cfg, micro_batch_size=2, world_size=4, learning_rate=1e-3)
    assert out["train_micro_batch_size_per_gpu"] == 8  # explicit value wins, as in HF
    assert out["train_batch_size"] == 8 and out["optimizer"]["params"]["lr"] == 1e-3
    assert cfg["train_batch_size"] == "auto", "the caller's dict must not be modified"


def test_fill_auto_errors_name_the_fix():
    with pytest.raises(ValueError, match="hidden_size"):
        fill_auto("zero3", micro_batch_size=1, world_size=1)
    with pytest.raises(ValueError, match="pick one"):
        fill_auto("zero2", micro_batch_size=1, world_size=1, hidden_size=8, bf16=True, fp16=True)
    with pytest.raises(ValueError, match=">= 1"):
        fill_auto("zero2", micro_batch_size=0, world_size=1, hidden_size=8)


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="zero3"):
        load_config("zero7")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert zero_stage(good) == 2 and zero_stage({}) == 0
    with pytest.raises(ValueError, match="0, 1, 2 or 3"):
        zero_stage({"zero_optimization": {"stage": "auto"}})


def test_activation_checkpointing_settings_validation():
    with pytest.raises(ValueError, match="cpu_offload"):
        activation_checkpointing_settings({"activation_checkpointing": {"cpu_offload": True}})
    with pytest.raises(ValueError, match="partition_activations"):
        activation_checkpointing_settings(None, contiguous_memory_optimization=True)
    with pytest.raises(ValueError, match="true or false"):
        activation_checkpointing_settings({"activation_checkpointing": {"cpu_checkpointing": "yes"}})
    with pytest.raises(ValueError, match="positive integer"):
        activation_checkpointing_settings(None, number_checkpoints=0)
    got = activation_checkpointing_settings({"activation_checkpointing": {"cpu_checkpointing": True}},
                                            cpu_checkpointing=False, partition_activations=True)
    assert got["cpu_checkpointing"] is False and got["partition_activations"] is True
