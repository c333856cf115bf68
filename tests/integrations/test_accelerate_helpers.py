"""hyclora.integrations.accelerate without starting processes: when the gloo backend is added,
what the DeepSpeed plugin carries, and which models get ZeRO-3 preparation. (The full accelerate
+ DeepSpeed ZeRO-3 run on 2 ranks is in test_zero_parity.)"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")
accelerate = pytest.importorskip("accelerate")

from hyclora.integrations import accelerate as hy_acc  # noqa: E402


@pytest.fixture
def distributed_cpu_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_backend_needed_only_for_multi_process_cpu(monkeypatch, distributed_cpu_env):
    assert hy_acc.cpu_backend_needed()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not hy_acc.cpu_backend_needed()


def test_single_process_needs_nothing(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not hy_acc.cpu_backend_needed()
    assert hy_acc.trainer_cpu_deepspeed_kwargs() == {}


def test_make_accelerator_adds_gloo_and_the_plugin(monkeypatch, distributed_cpu_env):
    captured = {}

    class FakeAccelerator:
        def __init__(self, **kwargs):
            captured.update(kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    hy_acc.make_accelerator("zero3", gradient_accumulation_steps=4)
    handlers = captured["kwargs_handlers"]
    assert [type(h).__name__ for h in handlers] == ["InitProcessGroupKwargs"] and handlers[0].backend == "gloo"
    plugin = captured["deepspeed_plugin"]
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 3
    assert captured["gradient_accumulation_steps"] == 4
    # a handler the caller passed is kept, not duplicated
    from accelerate.utils import InitProcessGroupKwargs

    mine = InitProcessGroupKwargs(backend="gloo")
    hy_acc.make_accelerator(None, kwargs_handlers=[mine])
    assert captured["kwargs_handlers"] == [mine] and captured["deepspeed_plugin"] is None
    with pytest.raises(ValueError, match="ds_config"):
        hy_acc.make_accelerator(None, plugin_kwargs={"zero3_init_flag": True})


def test_prepare_model_registers_leaves_only_under_zero3():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2)
        return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules="all-linear"))

    def fake_accelerator(stage):
        plugin = None if stage is None else SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))

    for stage in (None, 2):
        m = hy_acc.prepare_model(fake_accelerator(stage), model())
        assert not any(getattr(x, "_z3_leaf", False) for x in m.modules())
    m = hy_acc.prepare_model(fake_accelerator(3), model())
    leaves = [type(x).__name__ for x in m.modules() if getattr(x, "_z3_leaf", False)]
    assert leaves == ["LlamaDecoderLayer"]
