"""ZeRO-3 helpers that need no process group: the gather check, leaf registration, the toy fused
block used by the distributed tests, and adapter saving outside DeepSpeed."""

import enum

import pytest
import torch

pytest.importorskip("deepspeed")

from helpers.dist import lora_config, tiny_llama_config, token_data  # noqa: E402
from helpers.toy_fused import fuse_mlps, lora_params  # noqa: E402

from hyclora.integrations.deepspeed import (  # noqa: E402
    ZeRO3GatherError,
    assert_gathered,
    decoder_layers,
    hyclora_blocks,
    install_gather_guards,
    is_partitioned,
    is_zero3,
    leaf_module_config,
    prepare_zero3,
    register_zero3_leaf_modules,
    save_lora_adapter,
)


class FakeStatus(enum.Enum):  # stands in for deepspeed's ZeroParamStatus
    AVAILABLE = 1
    NOT_AVAILABLE = 2


def _peft_model(layers=2, seed=0):
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config()
    cfg.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    torch.manual_seed(seed + 1)
    model = get_peft_model(model, lora_config())
    # Non-zero B so LoRA A gets a gradient at the first step too.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _mark_partitioned(param):
    param.ds_status = FakeStatus.NOT_AVAILABLE


def test_is_partitioned_duck_typing():
    plain = torch.ones(3)
    assert not is_partitioned(plain)
    shard = torch.empty(0)
    shard.ds_numel = 12
    assert is_partitioned(shard)
    gathered = torch.ones(4)
    gathered.ds_status = FakeStatus.AVAILABLE
    assert not is_partitioned(gathered)
    gathered.ds_status = FakeStatus.NOT_AVAILABLE
    assert is_partitioned(gathered)


def test_assert_gathered_names_zero3_and_the_fix():
    shard = torch.empty(0)
    shard.ds_numel = 4096
    assert_gathered({"ok": torch.ones(2)}, "Block")
    with pytest.raises(ZeRO3GatherError) as info:
        assert_gathered([("mlp.gate_proj.weight", shard), ("fine", torch.ones(1))], "LlamaDecoderLayer")
    msg = str(info.value)
    assert "ZeRO-3" in msg and "mlp.gate_proj.weight" in msg and "prepare_zero3" in msg
    assert "fine" not in msg
    with pytest.raises(ZeRO3GatherError, match="#0"):
        assert_gathered([shard], "Block")


def test_toy_fused_mlp_matches_peft_exactly():
    """The stand-in for hyclora's blocks is only meaningful if it computes LoRA correctly."""
    x = token_data()[:2]
    ref = _peft_model()
    fused = _peft_model()
    fuse_mlps(fused)
    loss_ref = ref(input_ids=x, labels=x).loss
    loss_fused = fused(input_ids=x, labels=x).loss
    loss_ref.backward()
    loss_fused.backward()
    torch.testing.assert_close(loss_fused, loss_ref, rtol=0, atol=1e-6)
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads_fused = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert grads_ref.keys() == grads_fused.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert all(g.abs().sum() > 0 for g in grads_fused.values())


def test_guard_raises_in_forward_and_backward_and_is_removable():
    model = _peft_model()
    mlps = fuse_mlps(model)
    assert hyclora_blocks(model) == mlps  # flagged blocks win over the generic decoder layers
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    handle = install_gather_guards(model)
    x = token_data()[:1]
    model(input_ids=x, labels=x).loss.backward()  # nothing partitioned: passes

    victim = lora_params(mlps[1])[3]
    _mark_partitioned(victim)
    with pytest.raises(ZeRO3GatherError, match=r"LlamaMLP\.forward.*up_proj\.lora_B"):
        model(input_ids=x, labels=x)
    del victim.ds_status

    # Gathered for forward, released before backward: the backward check must catch it before
    # the block's own backward reads the weight.
    loss = model(input_ids=x, labels=x).loss
    _mark_partitioned(victim)
    with pytest.raises(ZeRO3GatherError, match="LlamaMLP backward"):
        loss.backward()
    del victim.ds_status

    handle.remove()
    assert all("forward" in m.__dict__ for m in mlps)  # the toy's own instance forward is back
    _mark_partitioned(victim)
    model(input_ids=x, labels=x)  # no guard any more: no check
    del victim.ds_status


def test_guard_on_class_forward_restores_class_forward():
    model = _peft_model()
    layers = hyclora_blocks(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    handle = install_gather_guards(model)
    assert all("forward" in m.__dict__ for m in layers)
    assert install_gather_guards(model).modules == [], "installing twice must not double-wrap"
    handle.remove()
    assert all("forward" not in m.__dict__ for m in layers)


def test_leaf_registration_and_prepare_zero3():
    model = _peft_model()
    assert not is_zero3(model)
    leaves = prepare_zero3(model, guard=False)
    assert [type(m).__name__ for m in leaves] == ["LlamaDecoderLayer"] * 2
    assert all(getattr(m, "_z3_leaf", False) for m in leaves)
    # Input gradients on (see prepare_zero3: ZeRO-3 leaf reduction needs them).
    emb = model.get_base_model().get_input_embeddings()
    assert emb(torch.zeros(1, 2, dtype=torch.long)).requires_grad
    assert leaf_module_config(model) == {
        "classes": ["LlamaDecoderLayer"]
    }


def test_leaf_registration_refuses_when_too_late_or_nothing_found():
    model = _peft_model()
    # deepspeed.initialize marks every hooked module with ds_id
    model.get_base_model().model.layers[0].self_attn.ds_id = 5
    with pytest.raises(RuntimeError, match="before deepspeed.initialize"):
        register_zero3_leaf_modules(model)
    with pytest.raises(ValueError, match="classes="):
        register_zero3_leaf_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_save_lora_adapter_without_deepspeed_round_trips(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = _peft_model()
    save_lora_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    want = {n: p for n, p in model.named_parameters() if "lora_" in n}
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    with pytest.raises(TypeError, match="get_peft_model"):
        save_lora_adapter(torch.nn.Linear(2, 2), tmp_path / "x")
