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
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline", lm_loss="model"))  # HF's forward op by op
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


def test_module_attr_equals_getattr():
    """peft_utils.module_attr (the norms' fast reads) against plain getattr: registry entries, a
    None bias, plain and shadowing instance attributes, properties, a class with its own
    __getattr__, a missing name, a non-module."""
    from torch import nn

    from hyclora.models.peft_utils import module_attr

    class WithProperty(nn.Linear):
        @property
        def eps(self):
            return 0.5

    class Forwarding(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2, bias=False)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    lin = nn.Linear(3, 3, bias=False)
    lin.variance_epsilon = 1e-6
    lin.register_buffer("buf", torch.ones(1))
    shadowed = nn.Linear(2, 2)
    object.__setattr__(shadowed, "weight", "instance value")  # beside the registered parameter
    missing = object()
    for module in (lin, shadowed, WithProperty(2, 2), Forwarding(), object()):
        for name in ("weight", "bias", "buf", "variance_epsilon", "eps", "nothing", "training", "in_features"):
            assert module_attr(module, name, missing) is getattr(module, name, missing), (type(module), name)


def test_registry_reads_index_the_parameter_dict():
    """module_attr and the adapter's member reads index ``_parameters`` (``[name]``), never
    ``.get``: DeepSpeed ZeRO-3 replaces that dict by one whose ``__getitem__`` gathers a
    partitioned parameter, and a norm read past it saw a weight of shape (0,)."""
    from collections import OrderedDict

    from torch import nn

    from hyclora.models.adapter import _member, _members
    from hyclora.models.peft_utils import module_attr

    class Gathering(OrderedDict):
        def __init__(self, items):
            super().__init__(items)
            self.indexed = []

        def __getitem__(self, key):
            self.indexed.append(key)
            return super().__getitem__(key)

    norm = nn.Module()
    norm.weight = nn.Parameter(torch.ones(4))
    norm.variance_epsilon = 1e-6
    norm._parameters = Gathering(norm._parameters)
    assert module_attr(norm, "weight") is norm._parameters["weight"]
    assert norm._parameters.indexed.count("weight") == 2
    norm._parameters.indexed.clear()
    assert _member(norm, "weight") is not None and norm._parameters.indexed == ["weight"]
    norm._parameters.indexed.clear()
    _members(norm, ("weight",))
    assert norm._parameters.indexed == ["weight"]
