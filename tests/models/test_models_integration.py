"""apply/revert, dispatch (eval, no_grad, generate), gradient checkpointing, accounting of
what is saved, and the clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from hyclora.config import HyCLoRAConfig
from hyclora.memory import measure_saved_tensors
from hyclora.models import apply_hyclora, buffered_tensors, is_patched, revert_hyclora
from hyclora.models.patching import is_forward_patched

from helpers.models import lora_model, needs_quant, step_grads, tiny_model
from helpers.numerics import worst_rel_err

BASELINE = HyCLoRAConfig(layer_type="baseline")


def _batch(seed=3, b=2, s=11):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, s), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _layers(model):
    return model.base_model.model.model.layers


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_outputs_identical_in_every_mode(impl):
    model = lora_model(tiny_model("mistral", impl))
    ref = copy.deepcopy(model)
    apply_hyclora(model, BASELINE)
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    for m in (model, ref):
        m.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)
        prompt = batch["input_ids"][:1, :4]
        gen_a = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        gen_b = ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(gen_a, gen_b)
    assert not any(buffered_tensors(model).values()), "eval/generate must use the original forward"
    model.train()
    ref.train()
    with torch.no_grad():  # training mode without grad: original path too
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)
    assert not any(buffered_tensors(model).values())
    # training forward with grad: compressed path, same outputs (forward outputs are exact)
    assert torch.equal(model(**inputs).logits, ref(**inputs).logits)
    assert all(buffered_tensors(model).values())


@pytest.mark.parametrize("layer_type", ["baseline", pytest.param("intra_inter", marks=needs_quant)])
def test_apply_then_revert_restores_everything(layer_type):
    model = lora_model(tiny_model("llama", "sdpa"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batch()
    _, g_before = step_grads(model, batch)
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=4))
    assert is_patched(model)
    layer = _layers(model)[0]
    assert is_forward_patched(layer) and hasattr(layer, "hyclora_state")
    sd = model.state_dict()
    assert any(".hyclora_state.forward_count" in k for k in sd)
    if layer_type != "baseline":  # calibration statistics are state, saved with the model
        assert any(".hyclora_state.stats.x_in." in k for k in sd)
        assert any(".hyclora_state.stats.q." in k for k in sd)
    with pytest.raises(ValueError, match="already patched"):
        apply_hyclora(model, BASELINE)
    step_grads(model, batch)
    revert_hyclora(model)
    assert not is_patched(model)
    assert not is_forward_patched(layer) and type(layer).__module__.startswith("transformers.")
    assert "forward" not in layer.__dict__ and not hasattr(layer, "hyclora_state")
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    _, g_after = step_grads(model, batch)
    assert worst_rel_err(g_after, g_before) == 0.0


def test_use_hyclora_false_leaves_model_untouched():
    model = lora_model(tiny_model("llama", "sdpa"))
    assert apply_hyclora(model, HyCLoRAConfig(use_hyclora=False)) is model
    assert not is_patched(model)
    assert not any("hyclora" in k for k in model.state_dict())


def _counts(model):
    return [int(layer.hyclora_state.forward_count) for layer in _layers(model)]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gradient_checkpointing_composes(reentrant, impl):
    model = lora_model(tiny_model("llama", impl), train_norms=True)
    batch = _batch()
    apply_hyclora(model, BASELINE)
    _, g_plain = step_grads(model, batch)
    assert _counts(model) == [1, 1]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for step in range(2):
        _, g_ckpt = step_grads(model, batch)
        # one counted (calibrating) forward per layer and step, whichever checkpoint mode:
        # non-reentrant recomputes inside the backward (not counted); reentrant runs the first
        # pass without grad (original forward) and the counted one in the backward
        assert _counts(model) == [2 + step, 2 + step]
        assert worst_rel_err(g_ckpt, g_plain) <= 1e-6
    assert all(buffered_tensors(model).values())


def test_saved_bytes_match_manifest_and_nothing_on_ctx():
    # Everything a block keeps goes through save_for_backward: an independent saved-tensor
    # hook count equals the blocks' manifest, and no tensor hides on the autograd ctx.
    model = lora_model(tiny_model("llama", "eager"))
    apply_hyclora(model, BASELINE)
    model.train()
    batch = _batch()
    loss, report = measure_saved_tensors(model, lambda: model(**batch).loss, layers=list(_layers(model)))
    manifest = buffered_tensors(model)
    for index, name in enumerate(["base_model.model.model.layers.0", "base_model.model.model.layers.1"]):
        listed = sum(e["nbytes"] for block in manifest[name].values() for e in block)
        shared = 0
        if index == 0:  # cos, sin and the mask are shared by all layers; counted once, in layer 0
            cfg = model.config
            b, s = batch["input_ids"].shape
            head_dim = cfg.hidden_size // cfg.num_attention_heads
            # cos/sin are (1, s, head_dim) (default position_ids); the eager path with a stored
            # map does not keep the mask
            shared = 2 * s * head_dim * 4
        assert report.per_region[index] == listed + shared
    # walk the graph: our nodes carry only non-tensor metadata on ctx
    seen, stack, found = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("AttentionBlockFnBackward", "MLPBlockFnBackward"):
            found += 1
            assert not [k for k, v in vars(node).items() if torch.is_tensor(v)]
        stack.extend(f for f, _ in node.next_functions)
    assert found == 4
    loss.backward()


def test_nonfinite_activation_raises_naming_the_layer():
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, BASELINE)
    with torch.no_grad():
        _layers(model)[0].mlp.down_proj.base_layer.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0 .*output"):
        step_grads(model, _batch())
    revert_hyclora(model)
    apply_hyclora(model, HyCLoRAConfig(layer_type="baseline", on_nonfinite="ignore"))
    loss, _ = step_grads(model, _batch())
    assert not torch.isfinite(loss)


def test_unsupported_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    from hyclora.models import supported_model_types

    # the list grows with each architecture (tests/models/test_architectures.py); sorted, all named
    assert {"bert", "llama", "ministral", "mistral", "qwen2", "roberta"} <= set(supported_model_types())
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported model types: "
                       + ", ".join(supported_model_types())):
        apply_hyclora(model, BASELINE)


def test_unsupported_attention_implementation():
    model = lora_model(tiny_model("llama", "sdpa"))
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not supported; use one of eager, sdpa"):
        apply_hyclora(model, BASELINE)
    # switched after patching: refused at the next training forward
    model.config._attn_implementation = "sdpa"
    apply_hyclora(model, BASELINE)
    model.base_model.model.model.layers[0].self_attn.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        _layers(model)[0](torch.randn(1, 3, 64), position_embeddings=(torch.ones(1, 3, 16), torch.zeros(1, 3, 16)))


def test_unsupported_peft_features():
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        apply_hyclora(dora, BASELINE)
    merged = lora_model(tiny_model("llama"))
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        apply_hyclora(merged, BASELINE)
    two = lora_model(tiny_model("llama"), targets=("q_proj",))
    two.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    two.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="several active adapters"):
        apply_hyclora(two, BASELINE)
    lbias = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match="lora_bias"):
        apply_hyclora(lbias, BASELINE)


def test_other_clear_errors(monkeypatch):
    # a trainable base weight (full fine-tuning of a linear) cannot be served from compressed inputs
    model = lora_model(tiny_model("llama"), targets=("q_proj",))
    apply_hyclora(model, BASELINE)
    _layers(model)[0].self_attn.k_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="k_proj has a trainable base weight"):
        step_grads(model, _batch())
    # attention dropout is not implemented
    with pytest.raises(ValueError, match="attention_dropout"):
        apply_hyclora(lora_model(tiny_model("llama", attention_dropout=0.1)), BASELINE)
    # unsupported activation
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        apply_hyclora(lora_model(tiny_model("llama", hidden_act="gelu")), BASELINE)
    # transformers 4.x layout
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.41.0")
    with pytest.raises(RuntimeError, match=r"transformers 4.41.0 is not supported.*transformers 5.17.0-5.25.0"):
        apply_hyclora(lora_model(tiny_model("llama")), BASELINE)
    # 4-bit bitsandbytes base layers need CUDA (see test_models_bnb for the CUDA test)
    from hyclora.models.peft_utils import resolve_linear

    fake = type("Linear4bit", (torch.nn.Module,), {"__module__": "bitsandbytes.nn.modules"})()
    fake.weight = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    fake.bias = None
    with pytest.raises(ValueError, match="supported on CUDA only"):
        resolve_linear(fake, "q_proj", "layers.0.self_attn.q_proj")


def test_empty_parameter_is_refused_clearly():
    # what a ZeRO-3 partitioned parameter looks like outside its module's forward
    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, BASELINE)
    _layers(model)[1].mlp.up_proj.lora_A["default"].weight.data = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"model\.layers\.1 got an empty parameter .*ZeRO-3"):
        step_grads(model, _batch())


def test_prefilled_kv_cache_is_refused():
    from transformers import DynamicCache

    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, BASELINE)
    model.train()
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5
    with pytest.raises(ValueError, match="pre-filled cache"):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    # an empty cache (what a training forward with use_cache=True creates) is fine
    out = model(input_ids=ids, labels=ids, use_cache=True)
    out.loss.backward()


def test_what_the_spec_does_not_describe_is_refused_by_name():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    # an activation key the adapter does not read (Gemma's), even beside a supported hidden_act
    with pytest.raises(ValueError, match=r"hidden_activation='gelu_pytorch_tanh'.*reads hidden_act"):
        apply_hyclora(lora_model(tiny_model("llama", hidden_activation="gelu_pytorch_tanh")), BASELINE)
    # another norm class (it may compute otherwise from the same weight, e.g. Gemma's 1 + w)
    model = lora_model(tiny_model("llama"))
    other = type("OtherRMSNorm", (LlamaRMSNorm,), {})
    _layers(model)[1].post_attention_layernorm = other(64)
    with pytest.raises(ValueError, match=r"layers\.1\.post_attention_layernorm is a .*OtherRMSNorm.*LlamaRMSNorm"):
        apply_hyclora(model, BASELINE)
    # a submodule with parameters the blocks would not run (q/k norms of Qwen3-like layers)
    model = lora_model(tiny_model("mistral"))
    _layers(model)[0].self_attn.q_norm = LlamaRMSNorm(16)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_norm \(LlamaRMSNorm\) holds parameters"):
        apply_hyclora(model, BASELINE)
    assert not is_patched(model)  # refused before anything was patched


def test_architecture_spec_refuses_what_the_blocks_do_not_implement():
    from dataclasses import replace

    from hyclora.models.llama import LLAMA_SPEC

    # Gemma's (1 + w) is implemented for RMS norms (tests/models/test_gemma.py); another variant,
    # or (1 + w) on LayerNorms, is refused
    with pytest.raises(NotImplementedError, match="norm_variant='x'"):
        replace(LLAMA_SPEC, norm_variant="x")
    with pytest.raises(NotImplementedError, match="norm_variant='1\\+w'.*layer norms"):
        replace(LLAMA_SPEC, norm_kind="layer", norm_variant="1+w")
    with pytest.raises(ValueError, match="post-norms"):
        replace(LLAMA_SPEC, post_norms=("post_attention_layernorm",))
    with pytest.raises(ValueError, match="double bits"):
        replace(LLAMA_SPEC, double_bits=("rstd1",))
    # q/k norms are implemented (Qwen3: tests/models/test_qwen3.py); a variant the attention block
    # does not implement is refused
    with pytest.raises(NotImplementedError, match="q_norm.*qk_norm_variant='x'"):
        replace(LLAMA_SPEC, qk_norms=("self_attn.q_norm", "self_attn.k_norm"), qk_norm_variant="x")
    # fused projections are implemented (Phi-3: tests/models/test_phi3.py); one no linear names is refused
    with pytest.raises(ValueError, match="qkv_proj"):
        replace(LLAMA_SPEC, fused_projections=("self_attn.qkv_proj",))


def test_graph_capture_flag_rebuilds_the_policy():
    from hyclora.models import kernels_for_graph_capture

    model = lora_model(tiny_model("llama"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter_full_fuse", lora_kernels_min_tokens=4096))
    layers = list(_layers(model))
    step_grads(model, _batch())
    assert all(m._hyclora_patch.setup[1][2].lora_kernels_min_tokens == 4096 for m in layers)
    with kernels_for_graph_capture(layers):
        assert all(m._hyclora_patch.under_graph_capture for m in layers)
        step_grads(model, _batch())
        assert all(m._hyclora_patch.setup[1][2].lora_kernels_min_tokens == 0 for m in layers)
    assert not any(m._hyclora_patch.under_graph_capture for m in layers)
    step_grads(model, _batch())
    assert all(m._hyclora_patch.setup[1][2].lora_kernels_min_tokens == 4096 for m in layers)
