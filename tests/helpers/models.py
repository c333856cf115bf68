"""Tiny Llama/Mistral models (from configs, no hub; or the pretrained 260K-parameter Llama of
../shared/data) wrapped with PEFT LoRA, and one training step's gradients."""

from __future__ import annotations

from typing import Dict, Iterable

import pytest
import torch

from helpers.repo import TINYLLAMA

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(kind: str = "llama", impl: str = "sdpa", **overrides):
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    common.update(overrides)
    if kind == "llama":
        cfg = LlamaConfig(**common)
    elif kind == "mistral":
        common.setdefault("sliding_window", 5)  # shorter than the test sequences
        cfg = MistralConfig(**common)
    else:
        raise ValueError(kind)
    cfg._attn_implementation = impl
    return cfg


def tiny_model(kind: str = "llama", impl: str = "sdpa", dtype=torch.float32, seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(kind, impl, **overrides)
    cls = LlamaForCausalLM if kind == "llama" else MistralForCausalLM
    model = cls(cfg)
    model.set_attn_implementation(impl)
    return model.to(dtype)


def draw_lora_b(model, b_std: float, seed: int) -> None:
    """Every lora_B drawn from N(0, b_std^2) (PEFT initialises them to zero), in parameter order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)


def lora_model(
    model,
    targets: Iterable[str] = ALL_TARGETS,
    r: int = 4,
    alpha: int = 8,
    dropout: float = 0.0,
    rslora: bool = False,
    b_std: float = 0.05,
    seed: int = 1,
    train_norms: bool = False,
    train_embeddings: bool = False,
):
    """PEFT LoRA with lora_B drawn non-zero (as after some training), so lora_A gets gradients."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # lora_A is initialised from the global generator
    pm = get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, use_rslora=rslora),
    )
    draw_lora_b(pm, b_std, seed)
    for name, p in pm.named_parameters():
        if train_norms and "norm" in name:
            p.requires_grad_(True)
        if train_embeddings and "embed_tokens" in name:
            p.requires_grad_(True)
    return pm


def step_grads(model, batch: Dict[str, torch.Tensor]):
    """One training forward/backward; returns (loss, {name: grad})."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def quant_available() -> bool:
    try:
        from hyclora.quant import ChannelStats, quantize  # noqa: F401
    except ImportError:
        return False
    return True


needs_quant = pytest.mark.skipif(not quant_available(), reason="hyclora.quant has not landed yet")


def tinyllama(kind: str = "llama", impl: str = "eager"):
    if not (TINYLLAMA / "config.json").exists():
        pytest.skip(f"pretrained tiny Llama not found at {TINYLLAMA}")
    from transformers import LlamaForCausalLM, MistralForCausalLM

    cls = LlamaForCausalLM if kind == "llama" else MistralForCausalLM
    model = cls.from_pretrained(str(TINYLLAMA), attn_implementation=impl, dtype=torch.float32)
    return model


def compare_with_peft(model, batch, tol, config=None):
    """One step of ``model`` (a PEFT model) as is and with hyclora applied (``baseline`` by
    default): the loss and the worst relative gradient error must stay within ``tol``, and the
    compressed path must have been taken. Returns ``(worst error, hyclora's gradients)``."""
    import copy

    from hyclora.config import HyCLoRAConfig
    from hyclora.models import apply_hyclora, buffered_tensors

    from helpers.numerics import worst_rel_err

    ref = copy.deepcopy(model)
    loss_ref, g_ref = step_grads(ref, batch)
    apply_hyclora(model, config if config is not None else HyCLoRAConfig(layer_type="baseline"))
    loss, g = step_grads(model, batch)
    assert any(buffered_tensors(model).values()), "the compressed path was not taken"
    assert abs(float(loss) - float(loss_ref)) <= tol * max(1.0, abs(float(loss_ref)))
    err = worst_rel_err(g, g_ref)
    assert err <= tol, f"worst relative gradient error {err:.3g} > {tol}"
    return err, g



def check_s2attn_step_equals_peft(model, batch) -> None:
    """S²-Attn (group ratio 1/4) on a PEFT ``model``: hyclora's baseline equals PEFT's step to
    rounding (and full attention does not: the comparison has teeth), 8-bit intra_inter is within
    1e-4 in loss and 0.999 in LoRA-gradient cosine."""
    import copy

    from hyclora.config import HyCLoRAConfig
    from hyclora.integrations.longseq import disable_s2attn, enable_s2attn
    from hyclora.models import apply_hyclora, buffered_tensors, revert_hyclora

    from helpers.numerics import cosine, worst_rel_err

    enable_s2attn(model, group_ratio=0.25)
    ref = copy.deepcopy(model)
    batch = dict(batch, use_cache=False)
    loss_ref, g_ref = step_grads(ref, batch)
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline"))
    _, g = step_grads(model, batch)
    assert all(buffered_tensors(model).values())
    assert worst_rel_err(g, g_ref) <= 1e-5
    full = copy.deepcopy(ref)
    disable_s2attn(full)
    assert worst_rel_err(step_grads(full, batch)[1], g_ref) > 1e-2
    revert_hyclora(model)
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=8))
    loss8, g8 = step_grads(model, batch)
    assert abs(float(loss8) - float(loss_ref)) <= 1e-4 * abs(float(loss_ref))
    assert min(cosine(g8[n], g_ref[n]) for n in g_ref if "lora_" in n) >= 0.999


def fidelity_batch(vocab: int = 128, seed: int = 11, shape=(4, 32)) -> Dict[str, torch.Tensor]:
    """A padded batch (row 1 left-padded, row 3 right-padded) for the fidelity checks."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, shape, generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[3, -5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def check_compression_fidelity(model, batch, layer_type: str, lora_params: int, what: str = ""):
    """LoRA-gradient cosines of ``layer_type`` at 8 and 4 bits against the exact step of the same
    PEFT ``model``: 8-bit min >= 0.999, 4-bit mean >= 0.98 (``intra``: 8 bits only). Returns
    ``{bits: (mean, min)}``; ``lora_params``: how many LoRA tensors the model has."""
    from hyclora.config import HyCLoRAConfig
    from hyclora.models import apply_hyclora, revert_hyclora

    from helpers.numerics import cosine

    _, ref = step_grads(model, batch)
    out = {}
    for bits in (8, 4):
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits))
        _, grads = step_grads(model, batch)
        revert_hyclora(model)
        values = torch.tensor([cosine(grads[n], ref[n]) for n in ref if "lora_" in n])
        assert len(values) == lora_params
        out[bits] = (round(float(values.mean()), 5), round(float(values.min()), 5))
    print(what, layer_type, out)
    assert out[8][1] >= 0.999, f"{what} {layer_type} 8 bits: min cosine {out[8][1]}"
    if layer_type != "intra":
        assert out[4][0] >= 0.98, f"{what} {layer_type} 4 bits: mean cosine {out[4][0]}"
    return out
