"""The host-time caches of the patched layers (issue 4) never serve stale PEFT state: after an
adapter or parameter change, the compressed training forward still equals the unpatched model.

Forward outputs of the compressed path are exact, so the training loss with grad (compressed
path) must equal the same forward under no_grad (the original forward) bit for bit."""

from __future__ import annotations

import torch

from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora

from helpers.models import lora_model, tiny_model


def _batch(seed=3, b=2, s=11):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, s), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _losses(model, batch):
    model.train()
    with torch.no_grad():
        ref = model(**batch).loss
    loss = model(**batch).loss  # compressed path
    if loss.requires_grad:  # nothing trainable with the adapters disabled
        loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach(), ref


def _q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_resolve_cache_follows_adapter_and_parameter_changes():
    model = lora_model(tiny_model())
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    batch = _batch()
    for _ in range(2):  # the second call runs from the caches
        loss, ref = _losses(model, batch)
        assert torch.equal(loss, ref)

    q = _q_proj(model)
    # a replaced parameter (e.g. load_state_dict(assign=True)) is picked up
    q.lora_B["default"].weight = torch.nn.Parameter(torch.randn_like(q.lora_B["default"].weight))
    loss2, ref2 = _losses(model, batch)
    assert torch.equal(loss2, ref2) and not torch.equal(loss2, loss)

    q.scaling["default"] = 3.0  # PEFT's set_scale writes this dict
    loss3, ref3 = _losses(model, batch)
    assert torch.equal(loss3, ref3) and not torch.equal(loss3, loss2)

    with model.disable_adapter():
        loss4, ref4 = _losses(model, batch)
        assert torch.equal(loss4, ref4) and not torch.equal(loss4, loss3)
    loss5, ref5 = _losses(model, batch)
    assert torch.equal(loss5, ref5) and torch.equal(loss5, loss3)


def test_setup_cache_follows_attention_implementation():
    model = lora_model(tiny_model(impl="sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    batch = _batch()
    loss, ref = _losses(model, batch)
    assert torch.equal(loss, ref)
    model.base_model.model.set_attn_implementation("eager")
    loss2, ref2 = _losses(model, batch)
    assert torch.equal(loss2, ref2)
    layer = model.base_model.model.model.layers[0]
    assert layer._hyclora_patch.setup[0][2] == "eager"
