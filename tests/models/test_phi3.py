"""Phi-3 / Phi-4-mini (``phi3``, issue 22): fused ``qkv_proj`` / ``gate_up_proj`` run by the shared
decoder blocks as their parts (q/k/v, gate/up: row blocks of the fused weight, bias and LoRA ``B``,
one LoRA ``A`` whose ``drop(x) A^T`` is computed and kept once), partial rotary
(``partial_rotary_factor``, Phi-4-mini's 0.75) and ``longrope`` tables from the model.

Tiny random Phi-3 (hidden 64, 4 heads / 2 KV heads, head_dim 16, d_ff 96, 2 layers) in fp32 on the
CPU, norm weights drawn around 1, PEFT LoRA on the four linears users target (``qkv_proj``,
``o_proj``, ``gate_up_proj``, ``down_proj``) with ``B ~ N(0, 0.05^2)`` so that every path carries
signal. Variants: ``default`` (full rotary), ``partial`` (factor 0.75: 12 of 16 channels rotated),
``longrope`` (partial 0.75, short/long factors, ``original_max_position_embeddings`` 16 < the
sequences, so the long factors are in use), ``bias`` (a biased, trainable ``qkv_proj``: Phi-3 ships
none, but the blocks' bias rows and the fused bias gradient must be right for any fused linear).

Measured (CPU, torch 2.13, transformers 5.17, ``helpers.models.fidelity_batch``), LoRA-gradient cosine (mean, min),
sdpa; eager within 3e-4; ``intra_inter_full_fuse`` equal to ``intra_inter`` to 5 digits; baseline
worst relative gradient error against HF + PEFT 3.9e-7..4.8e-7 over the variants and impls:

=======  ================  ================  ================  ================
variant  intra 8           intra_inter 8     intra 4           intra_inter 4
=======  ================  ================  ================  ================
default  0.99999, 0.99996  0.99999, 0.99996  0.99792, 0.99326  0.99914, 0.99748
partial  0.99999, 0.99996  0.99999, 0.99996  0.99797, 0.99382  0.99911, 0.99731
bias     0.99999, 0.99997  1.0, 0.99998      0.99887, 0.99285  0.9996, 0.99839
=======  ================  ================  ================  ================
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from hyclora.config import HyCLoRAConfig
from hyclora.memory import LayerShape, measure_saved_tensors, theoretical_layer_bytes
from hyclora.models import apply_hyclora, buffered_tensors, get_adapter, is_patched, revert_hyclora

from helpers.kernels import needs_triton
from helpers.models import check_compression_fidelity, check_s2attn_step_equals_peft, fidelity_batch, compare_with_peft, lora_model, needs_quant, step_grads
from helpers.numerics import cosine, worst_rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("peft")

BASELINE = HyCLoRAConfig(layer_type="baseline")
LAYER_TYPES = ("baseline", "intra", "intra_inter", "intra_inter_full_fuse")
COMPRESSING = LAYER_TYPES[1:]
IMPLS = ("sdpa", "eager")
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ROT = 12  # rotated channels of a 16-wide head at partial_rotary_factor 0.75
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(ROT // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(ROT // 2)]}
VARIANTS = {
    "default": {},
    "partial": dict(partial_rotary_factor=0.75),
    "longrope": dict(rope_parameters=LONGROPE, original_max_position_embeddings=16),
    "bias": {},  # a biased qkv_proj (phi3_model(bias=True))
}


def phi3_config(impl: str = "sdpa", **overrides):
    from transformers import Phi3Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    cfg = Phi3Config(**common)
    cfg._attn_implementation = impl
    return cfg


def phi3_model(impl: str = "sdpa", seed: int = 0, bias: bool = False, **overrides):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(phi3_config(impl, **overrides))
    model.set_attn_implementation(impl)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        if bias:
            for layer in model.model.layers:
                qkv = layer.self_attn.qkv_proj
                biased = torch.nn.Linear(qkv.in_features, qkv.out_features, bias=True)
                biased.weight.copy_(qkv.weight)
                biased.bias.copy_(torch.randn(qkv.out_features, generator=gen) * 0.2)
                layer.self_attn.qkv_proj = biased
    assert model.config.model_type == "phi3"
    return model


def variant_model(variant: str, impl: str = "sdpa", seed: int = 0, **overrides):
    return phi3_model(impl, seed, bias=variant == "bias", **{**VARIANTS[variant], **overrides})


def phi3_lora(model, **kw):
    return lora_model(model, targets=TARGETS, **kw)


def _layers(model):
    return model.base_model.model.model.layers


def _batch(seed: int = 3, b: int = 3, s: int = 21, padded: bool = True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, s), generator=gen)
    if not padded:
        return {"input_ids": ids, "labels": ids}
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# -- baseline: gradients equal HF + PEFT's ------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_baseline_matches_peft(variant, impl):
    # 21 tokens > original_max_position_embeddings (16): longrope runs its long factors
    model = phi3_lora(variant_model(variant, impl), train_norms=True, train_embeddings=True)
    if variant == "bias":
        for layer in _layers(model):
            layer.self_attn.qkv_proj.base_layer.bias.requires_grad_(True)  # the fused bias gradient too
    ref = copy.deepcopy(model)
    batch = _batch()
    loss_ref, g_ref = step_grads(ref, batch)
    apply_hyclora(model, BASELINE)
    loss, g = step_grads(model, batch)
    assert all(buffered_tensors(model).values()), "the compressed path was not taken"
    assert abs(float(loss) - float(loss_ref)) <= 1e-6 * max(1.0, abs(float(loss_ref)))
    for part in ("qkv_proj.lora_A", "qkv_proj.lora_B", "gate_up_proj.lora_A", "gate_up_proj.lora_B", "layernorm",
                 "embed_tokens") + (("qkv_proj.base_layer.bias",) if variant == "bias" else ()):
        assert any(part in n for n in g_ref), part
    err = worst_rel_err(g, g_ref)
    assert err <= 1e-5, f"{variant} {impl}: worst relative gradient error {err:.3g}"  # measured <= 4.8e-7


def test_variants_are_what_they_claim():
    """Not vacuous: the partial tables are narrower than a head, longrope's long factors are in use
    at the test length, and both change the gradients the baseline test matches."""
    head_dim = 16
    for variant in ("partial", "longrope"):
        rotary = variant_model(variant).model.rotary_emb
        cos, _ = rotary(torch.zeros(1, 21, 64), torch.arange(21)[None])
        assert cos.shape[-1] == ROT < head_dim, variant
    longrope = variant_model("longrope").model.rotary_emb
    long_cos, _ = longrope(torch.zeros(1, 21, 64), torch.arange(21)[None])
    short_cos, _ = longrope(torch.zeros(1, 8, 64), torch.arange(8)[None])
    assert not torch.allclose(long_cos[0, :8], short_cos[0], atol=1e-3), "longrope used one set of factors"
    batch = _batch()
    grads = {}
    for variant in ("default", "partial", "longrope"):
        model = phi3_lora(variant_model(variant))
        apply_hyclora(model, BASELINE)
        grads[variant] = step_grads(model, batch)[1]
    assert worst_rel_err(grads["partial"], grads["default"]) > 1e-2
    assert worst_rel_err(grads["longrope"], grads["partial"]) > 1e-2


@pytest.mark.parametrize("targets", [("qkv_proj", "gate_up_proj"), ("o_proj", "down_proj")])
def test_baseline_lora_on_some_linears(targets):
    # fused linears with LoRA next to plain ones without, and the reverse (parts without an adapter)
    model = lora_model(phi3_model("sdpa"), targets=targets)
    compare_with_peft(model, _batch(), 1e-5)


# -- the fused-linear dropout rule: one mask per fused linear, as PEFT draws it -----------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_dropout_on_fused_linears_equals_peft(impl):
    """PEFT drops the fused linear's input once (one mask for q, k and v; one for gate and up). The
    parts share the first part's ``drop(x) A^T`` and generator state, so on the CPU a seeded step
    draws PEFT's masks in PEFT's order: gradients equal to rounding. A mask per part would not."""
    model = phi3_lora(phi3_model(impl), dropout=0.3)
    ref = copy.deepcopy(model)
    batch = _batch()
    torch.manual_seed(7)
    _, g_ref = step_grads(ref, batch)
    apply_hyclora(model, BASELINE)
    torch.manual_seed(7)
    _, g = step_grads(model, batch)
    assert worst_rel_err(g, g_ref) <= 1e-5
    torch.manual_seed(8)  # not vacuous: other masks give other gradients
    assert worst_rel_err(step_grads(model, batch)[1], g_ref) > 1e-2
    # every compressing layer type redraws the same masks in its backward
    for layer_type in COMPRESSING:
        revert_hyclora(model)
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=8))
        torch.manual_seed(7)
        _, g8 = step_grads(model, batch)
        assert min(cosine(g8[n], g_ref[n]) for n in g_ref) >= 0.999, layer_type


@needs_quant
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_xa_kept_once_per_fused_linear(layer_type):
    """What a layer keeps: the names of a Llama layer (q/k/v, gate/up kept per part, at their own
    widths), but one ``drop(x) A^T`` per fused linear: the parts after the first describe none."""
    model = phi3_lora(phi3_model("sdpa"), r=8, dropout=0.1)
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=4))
    step_grads(model, _batch())
    kept = buffered_tensors(model)
    for layer in kept.values():
        names = {e["name"] for block in layer.values() for e in block}
        assert {"xa_q", "xa_o", "xa_gate", "xa_down", "rng_q", "rng_gate"} <= names, names
        assert not names & {"xa_k", "xa_v", "xa_up", "rng_k", "rng_v", "rng_up"}, names
        assert {"q", "k", "v"} <= names


# -- the compressed layer types -----------------------------------------------------------------------


@needs_quant
@pytest.mark.parametrize("layer_type", COMPRESSING)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["default", "partial", "bias"])
def test_compression_fidelity(variant, impl, layer_type):
    model = phi3_lora(variant_model(variant, impl))
    check_compression_fidelity(model, fidelity_batch(), layer_type, 2 * len(TARGETS) * 2, f"{variant} {impl}")

@needs_quant
@needs_triton
def test_triton_kernels_equal_torch():
    """The Triton kernels (interpreted on the CPU) on the fused parts' row views and the partial
    rotary split: the torch references' gradients."""
    model = phi3_lora(variant_model("partial"))
    batch = _batch()
    grads = {}
    for backend in ("torch", "triton"):
        apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=4, kernel_backend=backend,
                                           lora_kernels_min_tokens=0))
        grads[backend] = step_grads(model, batch)[1]
        revert_hyclora(model)
    assert worst_rel_err(grads["triton"], grads["torch"]) <= 1e-3


@needs_quant
def test_gradient_checkpointing_non_reentrant():
    model = phi3_lora(phi3_model("sdpa"), train_norms=True)
    batch = _batch()
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4, iteration_threshold=1))
    step_grads(model, batch)  # calibrate
    _, g_plain = step_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, g_ckpt = step_grads(model, batch)
    assert worst_rel_err(g_ckpt, g_plain) <= 1e-6


# -- buffered bytes -----------------------------------------------------------------------------------


def _layer_bytes(model, batch):
    layers = list(_layers(model))
    loss, report = measure_saved_tensors(model, lambda: model(**batch).loss, layers=layers)
    loss.backward()
    return [report.per_region[i] for i in range(len(layers))]


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_buffered_bytes_below_peft(impl, layer_type):
    model = phi3_lora(phi3_model(impl))
    model.train()
    batch = _batch()
    peft = _layer_bytes(model, batch)
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=4))
    ours = _layer_bytes(model, batch)
    print(impl, layer_type, ours, peft)
    for i, (a, b) in enumerate(zip(ours, peft)):
        assert a < b, f"{impl} {layer_type}: layer {i} keeps {a} bytes, PEFT {b}"


@pytest.mark.parametrize("impl", IMPLS)
def test_buffered_bytes_equal_theory(impl):
    # the theory of a Llama layer of the same widths with one X A per PEFT target (four, not seven)
    for layer_type, bits in (("baseline", 8), ("intra", 4), ("intra_inter", 2), ("intra_inter_full_fuse", 4)):
        model = phi3_lora(phi3_model(impl, num_hidden_layers=3), r=8)
        model.train()
        ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits, layernorm_outlier_ratio=0.05))
        measured = _layer_bytes(model, {"input_ids": ids, "labels": ids})
        shape = LayerShape.from_config(model.config, lora_rank=8)
        assert shape.lora_targets == TARGETS  # one X A per fused projection
        theory = theoretical_layer_bytes(shape, 2, 48, layer_type, bits, attention=impl, dtype_bytes=4,
                                         layernorm_outlier_ratio=0.05)
        # layer 0 also holds what all layers share (RoPE tables, mask)
        for i in (1, 2):
            assert measured[i] == pytest.approx(theory, rel=0.05), (impl, layer_type, i, measured, theory)


# -- every submodule with parameters handled or refused; what is refused by name -------------------


def _owned(spec, sub: str) -> bool:
    paths = tuple(p for _, p in spec.linears) + spec.norms + spec.qk_norms + spec.post_norms
    return any(sub == p or sub.startswith(p + ".") for p in paths)


def test_every_parameter_of_the_layer_is_handled_or_refused():
    from hyclora.models.phi3 import PHI3_SPEC

    model = phi3_lora(phi3_model(), train_norms=True)
    spec = get_adapter("phi3").spec
    assert spec is PHI3_SPEC
    layer = _layers(model)[0]
    holders = {name.rpartition(".")[0] for name, _ in layer.named_parameters()}
    assert not [sub for sub in holders if not _owned(spec, sub)]
    for path in spec.layout_paths:  # every path exists; linears and norms hold parameters
        module = layer.get_submodule(path)
        if path != spec.attention and path not in dict(spec.dropouts).values():
            assert any(True for _ in module.parameters()), path
    apply_hyclora(copy.deepcopy(model), BASELINE)  # the layer as built is accepted

    cases = (
        (lambda m: m.self_attn.register_parameter("sinks", torch.nn.Parameter(torch.zeros(4))),
         r"layers\.0\.self_attn \(Phi3Attention\) holds parameters"),
        (lambda m: setattr(m.self_attn, "q_norm", torch.nn.LayerNorm(16)), r"layers\.0\.self_attn\.q_norm \("),
        (lambda m: setattr(m.mlp, "extra", torch.nn.Linear(4, 4)), r"layers\.0\.mlp\.extra \("),
        (lambda m: setattr(m, "adapter", torch.nn.Linear(4, 4)), r"layers\.0\.adapter \("),
        (lambda m: m.register_parameter("residual_scale", torch.nn.Parameter(torch.ones(1))),
         r"layers\.0 \(Phi3DecoderLayer\) holds parameters of its own \(residual_scale\)"),
        # a fused linear whose rows are not q/k/v of the config's heads
        (lambda m: setattr(m.self_attn, "qkv_proj", torch.nn.Linear(64, 120, bias=False)),
         r"layers\.0\.self_attn\.qkv_proj has 120 output features.*q_proj 64 \+ k_proj 32 \+ v_proj 32 = 128"),
        (lambda m: setattr(m.mlp, "gate_up_proj", torch.nn.Linear(64, 96, bias=False)),
         r"layers\.0\.mlp\.gate_up_proj has 96 output features.*gate_proj 96 \+ up_proj 96 = 192"),
    )
    for add, pattern in cases:
        bad = copy.deepcopy(model)
        add(_layers(bad)[0])
        with pytest.raises(ValueError, match=pattern):
            apply_hyclora(bad, BASELINE)
        assert not is_patched(bad)


def test_residual_and_attention_dropout_refused_by_name():
    model = phi3_lora(phi3_model(resid_pdrop=0.1))
    apply_hyclora(model, BASELINE)
    with pytest.raises(ValueError, match=r"layers\.0\.resid_attn_dropout is a Dropout\(p=0\.1\).*resid_pdrop = 0\.0"):
        step_grads(model, _batch())
    model.eval()  # eval and no-grad forwards run the original layer: allowed
    with torch.no_grad():
        model(**_batch())
    with pytest.raises(ValueError, match="attention_dropout"):
        apply_hyclora(phi3_lora(phi3_model(attention_dropout=0.1)), BASELINE)


def test_spec_checks_for_fused_projections():
    from hyclora.models.llama import LLAMA_SPEC
    from hyclora.models.phi3 import PHI3_SPEC
    from hyclora.models.roberta import ROBERTA_SPEC

    qkv = "self_attn.qkv_proj"
    assert PHI3_SPEC.fused_parts[0][:3] == ((qkv, 0, 3), (qkv, 1, 3), (qkv, 2, 3)) and PHI3_SPEC.fused_parts[0][3] is None
    with pytest.raises(ValueError, match=r"names \['self_attn.qkv_proj'\] for several linears"):
        replace(PHI3_SPEC, fused_projections=("mlp.gate_up_proj",))
    with pytest.raises(ValueError, match="take the same input"):  # v and o do not share an input
        replace(LLAMA_SPEC, attention_linears=(("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                                               ("v_proj", "self_attn.vo"), ("o_proj", "self_attn.vo")),
                fused_projections=("self_attn.vo",))
    with pytest.raises(NotImplementedError, match="decoder blocks only"):
        replace(ROBERTA_SPEC, attention_linears=(("query", "qkv"), ("key", "qkv"), ("value", "qkv"),
                                                 ("dense", "attention.output.dense")), fused_projections=("qkv",))


def test_blocks_refuse_fused_parts_they_cannot_run():
    """The blocks' own check (an adapter bug, not a user input): parts only among the linears that
    share an input, consecutive, covering the fused rows, with the same parameters."""
    from hyclora.ops.block_common import BlockPlan, check_block_params
    from hyclora.ops.lora import FusedPart, LinearMeta

    w, a, b = torch.zeros(6, 4), torch.zeros(2, 4, requires_grad=True), torch.zeros(6, 2, requires_grad=True)
    other = torch.zeros(4, 4)

    def check(parts, shared_input, lin=None):
        metas = tuple(LinearMeta(f"l{i}", True, part=p) for i, p in enumerate(parts))
        lin = lin or [t for p in parts for t in ((w, None, a, b) if p else (other, None, a, b))]
        check_block_params(BlockPlan("layer", 1e-5, metas), lin, torch.ones(4), shared_input)

    good = (FusedPart("qkv", 0, 2, 0, 4), FusedPart("qkv", 1, 2, 4, 6))
    check(good + (None,), 2)  # accepted
    for parts, shared, why in (
            (good + (None,), 1, "the second part takes another input"),
            ((None,) + good, 2, "the parts end past the shared-input linears"),
            ((good[0], None), 2, "a part is missing"),
            ((good[0], FusedPart("qkv", 1, 2, 4, 5), None), 2, "the rows do not cover the weight"),
            ((good[0], FusedPart("qkv", 1, 2, 3, 6), None), 2, "the rows overlap"),
    ):
        with pytest.raises(RuntimeError, match=r"layer\.l\d is part .* of a fused linear"):
            check(parts, shared)
            pytest.fail(why)
    with pytest.raises(RuntimeError, match="fused linear"):  # the parts hold other tensors
        check(good + (None,), 2, [w, None, a, b, w, None, a.detach().clone(), b, other, None, a, b])


# -- partial rotary on its own ------------------------------------------------------------------------


@pytest.mark.parametrize("rot", [16, 12, 8])
def test_partial_rope_equals_transformers(rot):
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    from hyclora.kernels.rope import apply_rope, rope_backward

    gen = torch.Generator().manual_seed(rot)
    q = torch.randn(2, 4, 7, 16, generator=gen, requires_grad=True)
    cos, sin = torch.randn(2, 7, rot, generator=gen), torch.randn(2, 7, rot, generator=gen)
    ref, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.equal(apply_rope(q.detach(), cos, sin), ref)  # the same ops, bit for bit
    dy = torch.randn(ref.shape, generator=gen)
    (dq,) = torch.autograd.grad(ref, q, dy)
    assert torch.allclose(rope_backward(dy, cos, sin), dq, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="RoPE tables of width 18"):
        apply_rope(q.detach(), torch.ones(2, 7, 18), torch.ones(2, 7, 18))


# -- S²-Attn, CUDA-graph dispatch -----------------------------------------------------------------------


def test_s2attn_step_equals_peft():
    check_s2attn_step_equals_peft(phi3_lora(variant_model("partial", "sdpa"), train_norms=True), _batch(s=32))


@needs_quant
def test_cuda_graph_dispatch_cpu_emulation():
    """The CUDA-graph dispatcher (CPU emulation of the capture): graphed steps equal the eager ones
    (the fused parameters are the graphs' inputs; the parts' row views are made inside)."""
    from hyclora.cuda_graphs import DecoderLayerGraphs

    from helpers.graph_emulation import emulated_grapher

    eager = phi3_lora(variant_model("partial", "sdpa"))
    apply_hyclora(eager, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=4, iteration_threshold=2,
                                       recalibrate_every=0))
    graphed = copy.deepcopy(eager)
    graphs = DecoderLayerGraphs(graphed, _grapher=emulated_grapher)
    for step in range(4):
        batch = _batch(seed=step, b=2, s=12, padded=False)
        grads = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert worst_rel_err(grads[1], grads[0]) <= 1e-6, step
    counts = graphs.counts
    assert counts["capture"] == 1 and counts["replay"] == 3 * 2  # step 0 calibrates; capture at 1
    graphs.remove()
