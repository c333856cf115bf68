"""The decoder architectures that are Llama with another name, each verified on a tiny random
config on the CPU (fp32), under sdpa and eager:

* ``llama3``: Llama 3.x, ``rope_parameters`` of type ``"llama3"`` and GQA with 8 KV heads (16
  heads). The RoPE tables come from the model (``LlamaRotaryEmbedding``) and reach the layers as
  ``position_embeddings``, so the scaling needs nothing of hyclora: proven by the baseline gradients
  equal to HF's while the scaled tables differ from default RoPE's on the test's positions.
* ``mistral_nemo``: Mistral-Nemo, ``model_type`` ``"mistral"`` with ``head_dim`` (32) other than
  ``hidden_size / num_attention_heads`` (16), no sliding window.
* ``ministral``: Ministral (``model_type`` ``"ministral"``), alternating ``layer_types``
  (sliding window 5, then full attention) and ``head_dim`` 24 (transformers 5.17's Ministral needs
  ``head_dim`` set: its attention reads ``config.head_dim`` as is).
* ``qwen2``: Qwen2 / Qwen2.5 as shipped (biases on q/k/v, no sliding window); ``qwen2_swa``: with
  ``use_sliding_window`` (window 5) from layer ``max_window_layers = 1`` on. HF initialises the
  biases to zero; they are drawn here, N(0, 0.2^2), about the size of ``x W`` at these widths.

Per architecture: (a) ``baseline`` gradients equal HF + PEFT's to fp32 rounding (1e-5, padded
batch, trainable norms and embeddings, as tests/models/test_models_baseline.py); (b) compression
fidelity: the LoRA-gradient cosines against the exact gradients, 8 bits min >= 0.999 for
``intra``, ``intra_inter``, ``intra_inter_full_fuse``, 4 bits mean >= 0.98 for ``intra_inter``
(and full_fuse, same numerics); (c) buffered bytes of every layer below PEFT's for every layer type,
and equal to :func:`hyclora.memory.theoretical_layer_bytes`; (d) every submodule of the layer
that holds parameters is a path of the spec or refused by name; plus a step under S²-Attn equal to
PEFT + S²-Attn, and the CUDA-graph dispatcher (CPU emulation) equal to the eager steps.

Measured (CPU, torch 2.13, ``helpers.models.fidelity_batch``; sdpa, eager within 3e-4; ``intra_inter_full_fuse``
equal to ``intra_inter`` to 5 digits), LoRA-gradient cosine (mean, min):

============  ================  ================  ================  ================
arch          intra 8           intra_inter 8     intra 4           intra_inter 4
============  ================  ================  ================  ================
llama3        0.99998, 0.99994  0.99998, 0.99994  0.99667, 0.99043  0.99808, 0.99513
mistral_nemo  0.99998, 0.99993  0.99998, 0.99995  0.99713, 0.99388  0.99852, 0.99604
ministral     0.99998, 0.99995  0.99998, 0.99995  0.99719, 0.99348  0.99873, 0.99615
qwen2         0.99998, 0.99984  0.99998, 0.99992  0.99500, 0.96809  0.99738, 0.98863
qwen2_swa     0.99997, 0.99987  0.99998, 0.99988  0.99427, 0.96858  0.99694, 0.98424
============  ================  ================  ================  ================

The q/k/v biases: q and k biases are harmless (per-channel ranges absorb a per-channel offset:
k bias std 5 leaves the cosines as without), but V is kept in per-row groups that span channels
with different offsets, so a v bias well above ``|x W_v|`` costs fidelity: bias std 0.5 (about 3x
``|x W_v|``) gives ``intra`` 8 bits min 0.9955 and ``intra_inter`` 4 bits mean 0.976, below the
bounds (std 0.2, used here, passes them).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from hyclora.config import HyCLoRAConfig
from hyclora.memory import LayerShape, measure_saved_tensors, theoretical_layer_bytes
from hyclora.models import apply_hyclora, buffered_tensors, get_adapter, is_patched, revert_hyclora

from helpers.kernels import needs_triton
from helpers.models import check_compression_fidelity, check_s2attn_step_equals_peft, fidelity_batch, lora_model, needs_quant, quant_available, step_grads
from helpers.numerics import worst_rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASELINE = HyCLoRAConfig(layer_type="baseline")
LAYER_TYPES = ("baseline", "intra", "intra_inter", "intra_inter_full_fuse")
COMPRESSING = LAYER_TYPES[1:]
IMPLS = ("sdpa", "eager")
BIAS_STD = 0.2

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0,
               # short, so that the scaling changes the frequencies the test's positions (< 64) see
               "original_max_position_embeddings": 16}

# name -> (transformers config class, causal-LM class, config overrides, draw the linear biases)
ARCHS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(hidden_size=128, intermediate_size=192, num_attention_heads=16, num_key_value_heads=8,
                    rope_parameters=LLAMA3_ROPE), False),
    "mistral_nemo": ("MistralConfig", "MistralForCausalLM", dict(head_dim=32, sliding_window=None), False),
    "ministral": ("MinistralConfig", "MinistralForCausalLM",
                  dict(head_dim=24, sliding_window=5, layer_types=["sliding_attention", "full_attention"]), False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(), True),
    "qwen2_swa": ("Qwen2Config", "Qwen2ForCausalLM",
                  dict(use_sliding_window=True, sliding_window=5, max_window_layers=1), True),
}
MODEL_TYPES = {"llama3": "llama", "mistral_nemo": "mistral", "ministral": "ministral", "qwen2": "qwen2",
               "qwen2_swa": "qwen2"}
SLIDING = ("ministral", "qwen2_swa")  # per-layer attention types


def arch_config(arch: str, impl: str = "sdpa", **overrides):
    import transformers

    config_cls, _, arch_overrides, _ = ARCHS[arch]
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    common.update(arch_overrides)
    common.update(overrides)
    if "layer_types" in common and len(common["layer_types"]) != common["num_hidden_layers"]:
        pattern = common["layer_types"]
        common["layer_types"] = [pattern[i % len(pattern)] for i in range(common["num_hidden_layers"])]
    cfg = getattr(transformers, config_cls)(**common)
    cfg._attn_implementation = impl
    return cfg


def arch_model(arch: str, impl: str = "sdpa", seed: int = 0, **overrides):
    import transformers

    _, model_cls, _, biases = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(arch_config(arch, impl, **overrides))
    model.set_attn_implementation(impl)
    if biases:
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * BIAS_STD)
    assert model.config.model_type == MODEL_TYPES[arch]
    return model


def _batch(seed: int = 3, b: int = 3, s: int = 13, padded: bool = True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, s), generator=gen)
    if not padded:
        return {"input_ids": ids, "labels": ids}
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _layers(model):
    return model.base_model.model.model.layers


# -- (a) baseline gradients equal HF + PEFT's --------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_baseline_matches_peft(arch, impl):
    model = lora_model(arch_model(arch, impl), train_norms=True, train_embeddings=True)
    ref = copy.deepcopy(model)
    batch = _batch()
    loss_ref, g_ref = step_grads(ref, batch)
    apply_hyclora(model, BASELINE)
    loss, g = step_grads(model, batch)
    assert all(buffered_tensors(model).values()), "the compressed path was not taken"
    assert abs(float(loss) - float(loss_ref)) <= 1e-5 * max(1.0, abs(float(loss_ref)))
    err = worst_rel_err(g, g_ref)
    assert err <= 1e-5, f"{arch} {impl}: worst relative gradient error {err:.3g}"
    assert any("lora_A" in n for n in g) and any("layernorm" in n for n in g) and any("embed_tokens" in n for n in g)
    if ARCHS[arch][3]:  # the biases took part (and are not trained: PEFT freezes them)
        assert all(_layers(model)[0].self_attn.q_proj.base_layer.bias.abs() > 0)


def test_llama3_rope_tables_come_from_the_model():
    """The llama3-scaled tables are the model's own; hyclora's gradients follow them (equal to HF's
    in test_baseline_matches_peft), and they are not default RoPE's on these positions."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaled = arch_model("llama3", "sdpa")
    rotary = scaled.model.rotary_emb
    assert rotary.rope_type == "llama3" and scaled.config.num_key_value_heads == 8
    default_cfg = arch_config("llama3", "sdpa", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    default = LlamaRotaryEmbedding(default_cfg)
    pos = torch.arange(13)[None]
    x = torch.zeros(1, 13, 128)
    cos_s, _ = rotary(x, pos)
    cos_d, _ = default(x, pos)
    assert not torch.allclose(cos_s, cos_d, atol=1e-3), "llama3 scaling does not change the tables: vacuous test"
    # and the scaling changes the gradients hyclora computes (they follow the tables it is given)
    model = lora_model(scaled)
    plain = copy.deepcopy(model)
    plain.base_model.model.model.rotary_emb = default
    batch = _batch()
    apply_hyclora(model, BASELINE)
    apply_hyclora(plain, BASELINE)
    _, g_scaled = step_grads(model, batch)
    _, g_default = step_grads(plain, batch)
    assert worst_rel_err(g_default, g_scaled) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", SLIDING)
def test_each_layer_gets_the_mask_of_its_type(arch, impl):
    """Sliding-window support rests on transformers handing every layer the mask of its own type
    (``causal_mask_mapping[config.layer_types[i]]``): check that the layers do get different masks,
    that the window shows in them, and that the window changes the gradients hyclora matches."""
    model = lora_model(arch_model(arch, impl))
    types = model.config.layer_types
    assert set(types) == {"sliding_attention", "full_attention"}
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, kw.get("attention_mask")),
                                             with_kwargs=True) for i, layer in enumerate(_layers(model))]
    batch = _batch(padded=False)
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    s = batch["input_ids"].shape[1]
    window = model.config.sliding_window
    for i, kind in enumerate(types):
        mask = seen[i]
        if kind == "full_attention" and impl == "sdpa":
            assert mask is None  # causal, no padding: sdpa's is_causal
            continue
        allowed = mask if mask.dtype == torch.bool else mask == 0
        allowed = allowed[0, 0]
        # query s-1 sees key 0 only under full attention
        assert bool(allowed[s - 1, 0]) == (kind == "full_attention")
        assert bool(allowed[s - 1, s - window]) and bool(allowed[s - 1, s - 1 - window]) == (kind == "full_attention")
    # hyclora follows the window: equal to PEFT with it, and the same weights with every layer
    # full attention give other gradients
    _, g_ref = step_grads(model, _batch())
    full = copy.deepcopy(model)
    full.config.layer_types = ["full_attention"] * len(types)
    for m in (model, full):
        apply_hyclora(m, BASELINE)
    _, g_window = step_grads(model, _batch())
    _, g_full = step_grads(full, _batch())
    assert worst_rel_err(g_window, g_ref) <= 1e-5
    assert worst_rel_err(g_full, g_window) > 1e-2


# -- (b) compression fidelity --------------------------------------------------------------------------

@needs_quant
@pytest.mark.parametrize("layer_type", COMPRESSING)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_compression_fidelity(arch, impl, layer_type):
    model = lora_model(arch_model(arch, impl), b_std=0.05)
    check_compression_fidelity(model, fidelity_batch(), layer_type, 2 * 7 * 2, f"{arch} {impl}")

@needs_quant
@needs_triton
@pytest.mark.parametrize("arch", list(ARCHS))
def test_triton_kernels_equal_torch(arch):
    """On the CPU ``kernel_backend="auto"`` runs the torch references; the Triton kernels (RoPE
    rebuild with the odd head_dims, fused RMSNorm, SwiGLU, codec, LoRA tiles) run here through the
    interpreter and must give the references' gradients."""
    model = lora_model(arch_model(arch, "sdpa"), b_std=0.05)
    batch = _batch()
    grads = {}
    for backend in ("torch", "triton"):
        apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=4, kernel_backend=backend,
                                           lora_kernels_min_tokens=0))
        grads[backend] = step_grads(model, batch)[1]
        revert_hyclora(model)
    # measured: worst relative error 5e-7..3e-6, llama3 1.5e-4 (a code rounded the other way)
    assert worst_rel_err(grads["triton"], grads["torch"]) <= 1e-3


# -- (c) buffered bytes -----------------------------------------------------------------------------------


def _layer_bytes(model, batch):
    layers = list(_layers(model))
    loss, report = measure_saved_tensors(model, lambda: model(**batch).loss, layers=layers)
    loss.backward()
    return [report.per_region[i] for i in range(len(layers))]


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_buffered_bytes_below_peft(arch, impl, layer_type):
    if layer_type != "baseline" and not quant_available():
        pytest.skip("hyclora.quant has not landed yet")
    model = lora_model(arch_model(arch, impl))
    model.train()
    batch = _batch()
    peft = _layer_bytes(model, batch)
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=4))
    ours = _layer_bytes(model, batch)
    assert all(buffered_tensors(model).values())
    for i, (a, b) in enumerate(zip(ours, peft)):
        assert a < b, f"{arch} {impl} {layer_type}: layer {i} keeps {a} bytes, PEFT {b}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_buffered_bytes_equal_theory(arch, impl):
    # three layers: a layer's region also holds the masks / RoPE tables it is the first to use, so
    # compare the layers whose attention type an earlier layer had
    cfg_overrides = dict(num_hidden_layers=3)
    if arch == "ministral":
        cfg_overrides["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    for layer_type, bits in (("baseline", 8), ("intra", 4), ("intra_inter", 2), ("intra_inter_full_fuse", 4)):
        model = lora_model(arch_model(arch, impl, **cfg_overrides), r=8)
        model.train()
        ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits, layernorm_outlier_ratio=0.05))
        measured = _layer_bytes(model, {"input_ids": ids, "labels": ids})
        cfg = model.config
        theory = theoretical_layer_bytes(LayerShape.from_config(cfg, lora_rank=8), 2, 48, layer_type, bits,
                                         attention=impl, dtype_bytes=4, layernorm_outlier_ratio=0.05)
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * 3)
        compared = [i for i in range(3) if types[i] in types[:i]]
        assert compared
        for i in compared:
            assert measured[i] == pytest.approx(theory, rel=0.05), (arch, impl, layer_type, i, measured, theory)


# -- (d) every submodule with parameters is handled or refused -----------------------------------------


def _owned(spec, sub: str) -> bool:
    paths = tuple(p for _, p in spec.linears) + spec.norms
    paths += tuple(getattr(spec, "qk_norms", ())) + tuple(getattr(spec, "post_norms", ()))
    return any(sub == p or sub.startswith(p + ".") for p in paths)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_parameter_of_the_layer_is_handled_or_refused(arch):
    model = lora_model(arch_model(arch), train_norms=True)
    adapter = get_adapter(model.config.model_type)
    spec = adapter.spec
    layer = _layers(model)[0]
    holders = {name.rpartition(".")[0] for name, _ in layer.named_parameters()}
    unhandled = sorted(sub for sub in holders if not _owned(spec, sub))
    for sub in unhandled:  # (none for these architectures) each must be refused by name
        where = rf"layers\.0\.{re.escape(sub)} " if sub else r"layers\.0 \(\w+\) holds parameters of its own"
        with pytest.raises(ValueError, match=where):
            apply_hyclora(copy.deepcopy(model), BASELINE)
    # every module path the spec reads exists in the layer, and every linear and norm has parameters
    for path in spec.layout_paths:
        module = layer.get_submodule(path)
        if path != spec.attention:
            assert any(True for _ in module.parameters()), path
    if not unhandled:
        apply_hyclora(copy.deepcopy(model), BASELINE)  # the layer as built is accepted

    # an extra submodule (or parameter) with parameters, anywhere in the layer, is refused by name
    cases = (
        (lambda m: m.self_attn.register_parameter("sinks", torch.nn.Parameter(torch.zeros(4))),
         r"layers\.0\.self_attn \(\w+Attention\) holds parameters"),
        (lambda m: setattr(m.self_attn, "q_norm", torch.nn.LayerNorm(16)), r"layers\.0\.self_attn\.q_norm \("),
        (lambda m: setattr(m.mlp, "extra", torch.nn.Linear(4, 4)), r"layers\.0\.mlp\.extra \("),
        (lambda m: setattr(m, "adapter", torch.nn.Linear(4, 4)), r"layers\.0\.adapter \("),
        (lambda m: m.register_parameter("residual_scale", torch.nn.Parameter(torch.ones(1))),
         r"layers\.0 \(\w+DecoderLayer\) holds parameters of its own \(residual_scale\)"),
    )
    for add, pattern in cases:
        bad = copy.deepcopy(model)
        add(_layers(bad)[0])
        with pytest.raises(ValueError, match=pattern):
            apply_hyclora(bad, BASELINE)
        assert not is_patched(bad)


# -- S²-Attn, CUDA-graph dispatch --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_s2attn_step_equals_peft(arch):
    check_s2attn_step_equals_peft(lora_model(arch_model(arch, "sdpa"), train_norms=True), _batch(s=30))


@needs_quant
@pytest.mark.parametrize("arch,window", [(a, None) for a in ARCHS if a not in SLIDING]
                         + [(a, w) for a in SLIDING for w in (5, 64)])
def test_cuda_graph_dispatch_cpu_emulation(arch, window):
    """The CUDA-graph dispatcher (hyclora.cuda_graphs, CPU emulation of the capture) on each model
    type: graphed steps equal the eager ones. A layer handed a mask tensor runs eager (graphs are
    captured for mask-free calls), so a sliding window shorter than the sequence keeps those layers
    eager, and captures (which start at the first layer) need a first layer without one; a window
    the sequence fits in gives no mask (sdpa's is_causal) and every layer is graphed."""
    from hyclora.cuda_graphs import DecoderLayerGraphs

    from helpers.graph_emulation import emulated_grapher

    eager = lora_model(arch_model(arch, "sdpa", **({"sliding_window": window} if window else {})))
    apply_hyclora(eager, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=4, iteration_threshold=2,
                                       recalibrate_every=0))
    graphed = copy.deepcopy(eager)
    graphs = DecoderLayerGraphs(graphed, _grapher=emulated_grapher)
    s = 12
    for step in range(4):
        batch = _batch(seed=step, b=2, s=s, padded=False)
        grads = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert worst_rel_err(grads[1], grads[0]) <= 1e-6, step
    types = list(getattr(graphed.config, "layer_types", None) or ["full_attention"] * 2)
    windowed = [t == "sliding_attention" and (graphed.config.sliding_window or s) < s for t in types]
    counts = graphs.counts
    # step 0 calibrates (the quick calibration: the next step refines it inside the graphs); capture at
    # step 1 (at the first layer), replays from there
    assert counts["eager: attention_mask"] == 4 * sum(windowed)
    if windowed[0]:
        assert counts["capture"] == 0 and counts["replay"] == 0
    else:
        assert counts["capture"] == 1 and counts["replay"] == 3 * (len(types) - sum(windowed))
    graphs.remove()
