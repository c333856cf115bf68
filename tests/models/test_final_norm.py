"""The final RMSNorm (``LlamaModel.norm``) runs through ``hyclora.ops.rmsnorm.RMSNormFn`` in training:
the same output as transformers', gradients equal to rounding, the bf16 input kept instead of an
fp32 upcast, chunked fp32 work; eval forwards, revert and the trainable (modules_to_save) case."""

from __future__ import annotations

import pytest
import torch

import hyclora.kernels.rmsnorm as rmsnorm
from hyclora.config import HyCLoRAConfig
from hyclora.memory import measure_live_peak
from hyclora.models import apply_hyclora, revert_hyclora
from hyclora.ops.rmsnorm import RMSNormFn

from helpers.models import lora_model, needs_quant, step_grads, tiny_model
from helpers.numerics import worst_rel_err

pytestmark = needs_quant


def _batch(s=24):
    ids = torch.randint(0, 128, (2, s), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("layer_type", ["baseline", "intra_inter"])
def test_final_norm_is_patched_and_gradients_match(kind, layer_type, monkeypatch):
    model = lora_model(tiny_model(kind, "sdpa"), r=4, train_norms=True)
    ref_loss, ref = step_grads(model, _batch())
    calls = []
    real = RMSNormFn.apply
    monkeypatch.setattr(RMSNormFn, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    # the model's own loss: the baseline's forward is then HF's op by op (an equal loss)
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=8, iteration_threshold=0, lm_loss="model"))
    loss, grads = step_grads(model, _batch())
    assert calls == [torch.Size([2, 24, 64])]  # the final norm only (the layers use their blocks)
    if layer_type == "baseline":
        assert float(loss) == float(ref_loss)
        assert worst_rel_err(grads, ref) < 1e-5
    norm_name = next(n for n in ref if n.endswith("model.norm.weight"))
    assert worst_rel_err({norm_name: grads[norm_name]}, {norm_name: ref[norm_name]}) < (1e-5 if layer_type == "baseline" else 0.05)
    model.eval()
    with torch.no_grad():
        calls.clear()
        model(**_batch())
    assert calls == []  # eval: the original forward
    revert_hyclora(model)
    model.train()
    step_grads(model, _batch())
    assert calls == []
    assert not any("_hyclora_final_norm" in m.__dict__ for m in model.modules())


def test_rmsnorm_fn_chunks_and_keeps_the_input(monkeypatch):
    """Bit-identical forward and backward with 4-row chunks; what it keeps is the bf16 input + rstd."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 32, generator=gen).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(32, generator=gen)).to(torch.bfloat16)
    dy = torch.randn(3, 10, 32, generator=gen).to(torch.bfloat16)

    def run():
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = RMSNormFn.apply(xr, wr, 1e-5)
        y.backward(dy)
        return y.detach(), xr.grad, wr.grad

    whole = run()
    monkeypatch.setattr(rmsnorm, "_CHUNK_ELEMENTS", 4 * 32)
    chunked = run()
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    # against autograd through transformers' formula
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(32, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    y = norm(xr)
    y.backward(dy)
    assert torch.equal(y, whole[0])
    assert (xr.grad.float() - whole[1].float()).abs().max() <= 2 ** -6 * xr.grad.float().abs().max()


def test_final_norm_lowers_the_step_peak():
    """One layer, a wide model and a long sequence so the final norm's fp32 work shows."""

    def peak(patch):
        model = lora_model(tiny_model("llama", "sdpa", num_hidden_layers=1, hidden_size=256, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=4), r=4, train_norms=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(torch.bfloat16)
        if patch:
            apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
        ids = torch.randint(0, 128, (1, 2048), generator=torch.Generator().manual_seed(0))

        def run():
            model(input_ids=ids, labels=ids).loss.backward()

        return measure_live_peak(run, model, snapshot=False)[1].peak_bytes

    assert peak(True) < 0.8 * peak(False)
