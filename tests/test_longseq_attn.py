"""S²-Attn through transformers' AttentionInterface, RoPE interpolation, LongLoRA LoRA config and the
chunked causal-LM loss, on tiny random Llama models built from configs (no hub access)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from hyclora.integrations.longseq import (  # noqa: E402
    CausalLMChunkedLoss,
    disable_s2attn,
    enable_s2attn,
    longlora_lora_config,
    rope_scaling_factor,
    s2attn_enabled,
    set_rope_linear_scaling,
)
from hyclora.ops.s2attn import resolve_group_size, s2_attention_reference_mask  # noqa: E402

F64 = torch.float64
H, HK = 4, 2


def tiny_llama(seed=0, **overrides):
    cfg = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=H, num_key_value_heads=HK, max_position_embeddings=128,
        attn_implementation="sdpa", tie_word_embeddings=False,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(F64)


def _reference_mask(b, s, ratio=0.25, pad=None, segments=None):
    """Per-head (b, h, s, s) bool mask of S²-Attn's pattern (+ padding / document boundaries)."""
    allowed = s2_attention_reference_mask(s, H, resolve_group_size(s, ratio))[None].expand(b, H, s, s)
    if pad is not None:
        allowed = allowed & pad.bool()[:, None, None, :]
    if segments is not None:
        allowed = allowed & (segments[:, None] == segments[None, :])
    return allowed.contiguous()


def _logits_and_grads(model, rows=None, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False).logits
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    if rows is not None:
        weight = weight * rows[..., None]  # padding rows never reach a loss
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _pad_mask(b, s):
    pad = torch.ones(b, s, dtype=torch.long)
    pad[0, -6:] = 0  # right padding
    pad[1, :5] = 0   # left padding
    return pad


@pytest.mark.parametrize("case", ["plain", "padded", "right_padded", "packed"])
@pytest.mark.parametrize("s", [32, 30])
def test_training_forward_and_grads_equal_masked_reference(case, s):
    b = 2
    model = tiny_llama()
    ref = copy.deepcopy(model)  # plain sdpa, fed S²-Attn's per-head pattern as an explicit 4-D mask
    enable_s2attn(model, group_ratio=0.25)
    model.train()
    ref.train()
    ids = torch.randint(0, 97, (b, s), generator=torch.Generator().manual_seed(1))
    if case == "plain":
        inputs, ref_inputs = {}, {"attention_mask": _reference_mask(b, s)}
    elif case in ("padded", "right_padded"):
        pad = _pad_mask(b, s)
        if case == "right_padded":  # the usual training layout: S²-Attn's unmasked fast path
            pad = torch.ones(b, s, dtype=torch.long)
            pad[0, -6:] = 0
            pad[1, -11:] = 0
        inputs, ref_inputs = {"attention_mask": pad}, {"attention_mask": _reference_mask(b, s, pad=pad)}
    else:  # documents packed in a row, marked by position_ids restarting at 0
        cut = 11
        pos = torch.cat([torch.arange(cut), torch.arange(s - cut)])[None].expand(b, s)
        seg = (torch.arange(s) >= cut).long()
        inputs = {"position_ids": pos}
        ref_inputs = {"position_ids": pos, "attention_mask": _reference_mask(b, s, segments=seg)}
    rows = inputs["attention_mask"] if "padded" in case else torch.ones(b, s, dtype=torch.long)
    out, grads = _logits_and_grads(model, rows, input_ids=ids, **inputs)
    want, want_grads = _logits_and_grads(ref, rows, input_ids=ids, **ref_inputs)
    valid = rows.bool()[..., None]
    torch.testing.assert_close(torch.where(valid, out, 0), torch.where(valid, want, 0), rtol=0, atol=1e-10)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-9, atol=1e-10, msg=name)
    # S²-Attn really changed the computation (it is not full attention in training).
    full = copy.deepcopy(ref)
    full_out = full(input_ids=ids, use_cache=False, **{k: v for k, v in inputs.items()}).logits
    assert (torch.where(valid, full_out - out, 0)).abs().max() > 1e-4


@pytest.mark.parametrize("padded", [False, True])
def test_eval_mode_is_full_attention_bit_for_bit(padded):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    enable_s2attn(model)
    model.eval()
    ref.eval()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    kw = {"attention_mask": _pad_mask(2, 30)} if padded else {}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, **kw).logits, ref(input_ids=ids, **kw).logits)
    # Generation in eval mode works (KV cache, full attention); in train mode it fails loudly.
    gen = model.generate(ids[:1, :8], max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, ref.generate(ids[:1, :8], max_new_tokens=3, do_sample=False))
    model.train()
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:1, :8], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="model.eval"):
            model(input_ids=ids[:1, 8:9], past_key_values=cache, use_cache=True)


def test_enable_disable_and_peft_lora_grads():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    ref_base = copy.deepcopy(base)
    cfg = longlora_lora_config(r=4, lora_alpha=8, model=base)
    model = peft.get_peft_model(base, cfg)
    ref = peft.get_peft_model(ref_base, copy.deepcopy(cfg))
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):  # non-zero B so lora_A receives gradients too
        for n, p in m.named_parameters():
            if "lora_B" in n:
                with torch.no_grad():
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel(), dtype=F64).view_as(p))
    assert not s2attn_enabled(model)
    enable_s2attn(model, group_ratio=0.5)
    assert s2attn_enabled(model) and model.get_base_model().config.s2attn_group_ratio == 0.5
    model.train()
    ref.train()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    mask = s2_attention_reference_mask(24, H, resolve_group_size(24, 0.5))[None].expand(2, H, 24, 24)
    out, grads = _logits_and_grads(model, input_ids=ids)
    want, want_grads = _logits_and_grads(ref, input_ids=ids, attention_mask=mask.contiguous())
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    trained = [n for n in grads if "lora_" in n or "modules_to_save" in n]
    assert any("lora_A" in n for n in trained) and any("embed_tokens" in n for n in trained)
    assert any("norm" in n for n in trained)
    for n in trained:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-9, atol=1e-10, msg=n)
    disable_s2attn(model)
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_gradient_checkpointing_gives_the_same_grads():
    model = tiny_llama()
    enable_s2attn(model)
    model.train()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    pad = _pad_mask(2, 30)
    out, grads = _logits_and_grads(model, pad, input_ids=ids, attention_mask=pad)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out2, grads2 = _logits_and_grads(model, pad, input_ids=ids, attention_mask=pad)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=0, atol=1e-12)


def test_enable_rejects_bad_ratio_and_non_transformers_models():
    with pytest.raises(ValueError, match="group_ratio"):
        enable_s2attn(tiny_llama(), group_ratio=2.0)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_s2attn(torch.nn.Linear(2, 2))


# -- RoPE position interpolation --------------------------------------------------------------------
def test_rope_linear_scaling_on_config_and_model():
    assert rope_scaling_factor(8192, 4096) == 2 and rope_scaling_factor(5000, 4096) == 2
    assert rope_scaling_factor(100, 4096) == 1
    model = tiny_llama(max_position_embeddings=64)
    inv = model.model.rotary_emb.inv_freq.clone()
    assert set_rope_linear_scaling(model, target_context=256) == 4.0
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv / 4)
    # A model built from the edited config has the same rotary frequencies.
    rebuilt = LlamaForCausalLM(model.config)
    torch.testing.assert_close(rebuilt.model.rotary_emb.inv_freq.to(inv.dtype), inv / 4)
    # Positions 4p under factor 4 see the angles of positions p without scaling.
    x = torch.zeros(1, 4, 8, dtype=F64)
    cos_s, _ = model.model.rotary_emb(x, torch.arange(0, 16, 4)[None])
    cos_0, _ = tiny_llama(max_position_embeddings=64).model.rotary_emb(x, torch.arange(4)[None])
    torch.testing.assert_close(cos_s, cos_0)
    # Idempotent for the same factor; refuses to stack or to touch other rope types.
    assert set_rope_linear_scaling(model.config, 256, original_context=64) == 4.0
    with pytest.raises(ValueError, match="already uses linear"):
        set_rope_linear_scaling(model.config, 1024, original_context=64)
    cfg = LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="dynamic"):
        set_rope_linear_scaling(cfg, 16384)
    assert set_rope_linear_scaling(LlamaConfig(max_position_embeddings=4096), 4096) == 1.0


# -- chunked causal-LM loss -------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_hf_loss_and_grads(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    ref = copy.deepcopy(model)
    wrapper = CausalLMChunkedLoss(model, chunk_size=7)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(6))
    pad = _pad_mask(2, 20)
    loss = wrapper(ids, attention_mask=pad)
    loss.backward()
    want = ref(input_ids=ids, attention_mask=pad, labels=ids.masked_fill(pad == 0, -100), use_cache=False).loss
    want.backward()
    # HF's loss upcasts logits with .float() (fp64 -> fp32 here); ours keeps fp64: fp32 rounding.
    torch.testing.assert_close(loss, want.double(), rtol=1e-6, atol=1e-7)
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-5, atol=1e-7, msg=n)
    # Pre-shifted labels and per-token losses.
    with torch.no_grad():
        per_tok = wrapper(ids[:, :-1], labels=ids[:, 1:], shift_labels=False, reduction="none")
        logp = torch.log_softmax(ref(input_ids=ids[:, :-1]).logits, -1)
        torch.testing.assert_close(per_tok, -logp.gather(-1, ids[:, 1:, None])[..., 0], rtol=1e-10, atol=1e-12)


def test_chunked_loss_with_peft_modules_to_save_and_lora_head_refused():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = peft.get_peft_model(
        base, longlora_lora_config(r=4, trainable_modules=("embed_tokens", "lm_head", "norm"), model=base)
    )
    head = model.get_base_model().lm_head.modules_to_save["default"]
    with torch.no_grad():
        head.weight.mul_(2.0)  # the trained copy differs from the original: the loss must read it
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(7))
    loss = CausalLMChunkedLoss(model)(ids)
    want = model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss, want.double(), rtol=1e-6, atol=1e-7)
    lora_head = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        CausalLMChunkedLoss(lora_head)(ids)
