"""Activation checkpointing (torch and DeepSpeed backends, hybrid every-k policy): gradients equal
the uncheckpointed ones, and the layers the policy names really are recomputed (and only those).

DeepSpeed's checkpointing module needs its communication backend, so a 1-process gloo group is
started for this module and torn down after it.
"""

import importlib
import os

import pytest
import torch

from hyclora.models.adapter import in_backward_pass

deepspeed = pytest.importorskip("deepspeed")

from helpers.dist import free_port, lora_config, tiny_llama_config, token_data  # noqa: E402
from helpers.toy_fused import fuse_mlps  # noqa: E402

from hyclora.integrations import deepspeed as hy_ds  # noqa: E402
from hyclora.integrations.checkpointing import (  # noqa: E402
    checkpointed_indices,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)

LAYERS = 3


@pytest.fixture(scope="module")
def ds_comm():
    from deepspeed import comm as ds_comm_mod

    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    started = not ds_comm_mod.is_initialized()
    if started:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1")
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield
    # Leave DeepSpeed's checkpointing defaults and no process group behind for other tests.
    deepspeed.checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False,
                                      checkpoint_in_cpu=False, num_checkpoints=None)
    if started:
        torch.distributed.destroy_process_group()
        importlib.import_module("deepspeed.comm.comm").cdb = None
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


VARIANTS = {
    "peft": {},
    "toyfused": {"fuse": True},
    # iteration_threshold=0: statistics from the current batch only, so the recompute inside the
    # backward quantises exactly what an uncheckpointed forward would.
    "hyclora_baseline": {"hyclora": {"layer_type": "baseline"}},
    "hyclora_intra_inter": {"hyclora": {"layer_type": "intra_inter", "q_bit": 4, "iteration_threshold": 0}},
}


def _model(variant="peft"):
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    spec = VARIANTS[variant]
    cfg = tiny_llama_config()
    cfg.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    model = get_peft_model(model, lora_config())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if spec.get("fuse"):
        fuse_mlps(model)
    if spec.get("hyclora"):
        from hyclora import HyCLoRAConfig
        from hyclora.models import apply_hyclora

        apply_hyclora(model, HyCLoRAConfig(**spec["hyclora"]))
    model.train()
    return model


def _count_layer_calls(model):
    """Forward runs per decoder layer (a checkpointed layer runs twice: forward + recompute).

    The first pass is counted by a pre-hook outside the backward, the recompute by the function
    the checkpoint replays inside it: transformers < 5.23 checkpoints ``__call__`` (hooks run
    again in the recompute), later releases ``forward`` (hooks stay outside)."""
    layers = model.get_base_model().model.layers
    counts = [0] * len(layers)

    def bump(i):
        counts[i] += 1

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: None if in_backward_pass() else bump(i))
        inner = layer.__dict__.get("_gradient_checkpointing_func")
        if inner is None:
            continue

        def counting(function, *args, _inner=inner, _i=i, **kwargs):
            def run(*a, **k):
                if in_backward_pass():
                    bump(_i)
                return function(*a, **k)

            return _inner(run, *args, **kwargs)

        layer._gradient_checkpointing_func = counting
    return counts


def _step(model):
    x = token_data()[:2]
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


_REFERENCE = {}


def _reference(variant):
    if variant not in _REFERENCE:
        _REFERENCE[variant] = _step(_model(variant))
    return _REFERENCE[variant]


# (backend, every_k, extra kwargs)
CASES = [
    ("torch", 1, {}),
    ("torch", 2, {"use_reentrant": True}),
    ("deepspeed", 1, {}),
    ("deepspeed", 2, {}),
    ("deepspeed", 1, {"partition_activations": True}),
    ("deepspeed", 2, {"partition_activations": True, "contiguous_memory_optimization": True,
                      "cpu_checkpointing": True}),
    ("deepspeed", 3, {"use_reentrant": False}),
]
# Every case on plain PEFT; the cases that differ in mechanism on the blocks that matter.
PARAMS = [(v, *c) for v in ("peft",) for c in CASES] + [
    (v, *CASES[i]) for v in ("toyfused", "hyclora_baseline", "hyclora_intra_inter") for i in (0, 3, 5, 6)
]


@pytest.mark.parametrize("variant,backend,every_k,extra", PARAMS)
def test_checkpointed_gradients_equal_uncheckpointed(ds_comm, variant, backend, every_k, extra):
    ref_loss, ref_grads = _reference(variant)
    model = _model(variant)
    summary = enable_activation_checkpointing(model, every_k=every_k, backend=backend, **extra)
    chosen = checkpointed_indices(LAYERS, every_k)
    assert summary["layers"] == chosen
    if extra.get("contiguous_memory_optimization"):
        # number_checkpoints filled from the policy
        assert summary["settings"]["number_checkpoints"] == len(chosen)
    counts = _count_layer_calls(model)
    loss, grads = _step(model)
    assert counts == [2 if i in chosen else 1 for i in range(LAYERS)]
    # Same ops in the same order on the same inputs (measured: bit-identical on CPU); the
    # tolerance only allows for a BLAS that splits work differently between calls.
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_json_block_drives_deepspeed_checkpointing(ds_comm):
    """The activation_checkpointing block reaches deepspeed.checkpointing (HF alone ignores it)."""
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    model = _model()
    # cpu_checkpointing needs partitioning on a CPU-only run (see the test below).
    summary = enable_activation_checkpointing(model, backend="deepspeed", ds_config="zero3_actckpt_cpu",
                                              partition_activations=True)
    assert summary["settings"]["cpu_checkpointing"] is True and ds_ckpt.CPU_CHECKPOINT is True
    assert ds_ckpt.PARTITION_ACTIVATIONS is True
    assert summary["reentrant"] is True
    enable_activation_checkpointing(model, backend="deepspeed", ds_config="zero3_actckpt_cpu",
                                    cpu_checkpointing=False)
    assert ds_ckpt.CPU_CHECKPOINT is False, "explicit arguments override the JSON"
    assert ds_ckpt.PARTITION_ACTIVATIONS is False


def test_cpu_checkpointing_refused_on_cpu_accelerator(ds_comm):
    """On a CPU-only run DeepSpeed's host copy is the tensor itself, which it then empties: the
    recompute would read garbage. We refuse instead (partitioned + cpu is covered above)."""
    with pytest.raises(ValueError, match="cpu_checkpointing"):
        enable_activation_checkpointing(_model(), backend="deepspeed", cpu_checkpointing=True)


def test_disable_restores_plain_forward(ds_comm):
    model = _model()
    enable_activation_checkpointing(model, backend="deepspeed", every_k=1)
    disable_activation_checkpointing(model)
    counts = _count_layer_calls(model)
    _step(model)
    assert counts == [1] * LAYERS


def test_bad_arguments_raise():
    model = _model()
    with pytest.raises(ValueError, match="every_k"):
        enable_activation_checkpointing(model, every_k=0)
    with pytest.raises(ValueError, match="backend"):
        enable_activation_checkpointing(model, backend="megatron")
    with pytest.raises(ValueError, match="backend='deepspeed'"):
        enable_activation_checkpointing(model, ds_config="zero3_actckpt")
    with pytest.raises(ValueError, match="backend='deepspeed'"):
        enable_activation_checkpointing(model, cpu_checkpointing=True)
    with pytest.raises(ValueError, match="no checkpointable"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_configure_needs_the_communication_backend(monkeypatch):
    from deepspeed import comm as ds_comm_mod

    monkeypatch.setattr(ds_comm_mod, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="init_distributed"):
        hy_ds.configure_activation_checkpointing("zero3_actckpt")
    with pytest.raises(ValueError, match="number_checkpoints"):
        hy_ds.configure_activation_checkpointing(
            None, partition_activations=True, contiguous_memory_optimization=True)
