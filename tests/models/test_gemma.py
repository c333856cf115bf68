"""Gemma 2 (``gemma2``) and Gemma 3 text (``gemma3_text``) through hyclora's decoder blocks.

Tiny random models (2 or 4 layers, sliding and global layers alternating, the sliding window
shorter than the sequences, GQA 4/2 heads, head_dim 16 != hidden / heads, query_pre_attn_scalar
24 != head_dim) with the norm weights drawn N(0, 0.3) so that ``(1 + w)`` matters (transformers
initialises them to 0) and linear weights of std 0.15 so that the attention scores reach a few units
(with the default 0.02 they stay below 0.1, where soft-capping changes nothing), PEFT LoRA on the
seven linears. Gemma 2 runs its attention logit
soft-capping (5.0, small enough to bite) under eager attention.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora, buffered_tensors, revert_hyclora

from helpers.models import compare_with_peft, lora_model, step_grads
from helpers.numerics import cosine, worst_rel_err

pytest.importorskip("peft")

KINDS = ("gemma2", "gemma3")
BASELINE = HyCLoRAConfig(layer_type="baseline")
CAP = 5.0  # attention / final logit soft-capping of the tests (Gemma 2's defaults are 50 / 30)


def tiny_gemma(kind: str, impl: str = "sdpa", dtype=torch.float32, seed: int = 0, layers: int = 2,
               hidden: int = 64, d_ff: int = 96, head_dim: int = 16, vocab: int = 128, window: int = 5, **overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
        rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=window,
        initializer_range=0.15,  # attention scores of a few units: the soft-capping bites
        layer_types=["sliding_attention", "full_attention"] * (layers // 2), final_logit_softcapping=None,
    )
    if kind == "gemma2":
        common["attn_logit_softcapping"] = CAP if impl == "eager" else None
    common.update(overrides)
    torch.manual_seed(seed)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common))
    try:
        model.set_attn_implementation(impl)
    except ValueError as exc:  # transformers >= 5.2x refuses sdpa for Gemma 2 (its soft-capping)
        pytest.skip(f"this transformers release refuses {impl} for {kind}: {str(exc)[:80]}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model.to(dtype)


def _padded_batch(vocab: int = 128, seed: int = 3, shape=(3, 13)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, shape, generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0   # left padding
    mask[2, -3:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _compare(model, batch, tol, config=BASELINE):
    return compare_with_peft(model, batch, tol, config)


# -- exact baseline -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_baseline_fp32_matches_peft(kind, impl):
    # (1 + w) pre/post/final norms (trainable), scaled embeddings (trainable), GELU-tanh, sliding
    # and global layers, left and right padding; Gemma 2 eager with soft-capping; Gemma 3 q/k norms
    model = lora_model(tiny_gemma(kind, impl), train_norms=True, train_embeddings=True)
    _, grads = _compare(model, _padded_batch(), 1e-5)
    names = list(grads)
    for part in ("lora_A", "lora_B", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "model.norm", "embed_tokens"):
        assert any(part in n for n in names), part
    assert any("q_norm" in n for n in names) == (kind == "gemma3")
    saved = buffered_tensors(model)["base_model.model.model.layers.1"]
    assert {"attn_out", "rstd_attn_out"} <= {e["name"] for e in saved["attention"]}
    assert {"mlp_out", "rstd_mlp_out"} <= {e["name"] for e in saved["mlp"]}


def test_baseline_gemma2_final_logit_softcapping_and_defaults():
    # Gemma 2's default caps (50 / 30) and a final-logit cap inside HF's loss (outside the layers)
    model = lora_model(tiny_gemma("gemma2", "eager", attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                       train_norms=True)
    _compare(model, _padded_batch(), 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_baseline_gelu_exact_activation(kind):
    model = lora_model(tiny_gemma(kind, "sdpa", hidden_activation="gelu"), train_norms=True)
    _compare(model, _padded_batch(), 1e-5)


def test_the_tests_have_teeth():
    """What the baseline tests compare depends on the features under test: soft-capping changes the
    model, the two layer types get different masks (the sliding window is shorter than the
    sequence) and Gemma 3 hands them different RoPE tables."""
    batch = _padded_batch()

    def loss(model):
        model.train()
        with torch.no_grad():
            return float(model(**batch).loss)

    assert abs(loss(tiny_gemma("gemma2", "eager")) - loss(tiny_gemma("gemma2", "eager", attn_logit_softcapping=None))) > 1e-4
    for kind in KINDS:
        assert abs(loss(tiny_gemma(kind, "sdpa")) - loss(tiny_gemma(kind, "sdpa", window=64))) > 1e-4
        model = tiny_gemma(kind, "sdpa")
        seen = []
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["attention_mask"], kw["position_embeddings"])),
                                            with_kwargs=True)
        loss(model)
        (m0, p0), (m1, p1) = seen
        assert not torch.equal(m0, m1)
        assert (kind == "gemma3") == (not torch.equal(p0[0], p1[0]))  # local / global RoPE base


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_baseline_bf16(kind, impl):
    # bf16 weights and activations. The (1 + w) norms' forwards are bit-identical to HF's; the
    # backward sums in another order (fp32 weight-gradient reductions, the fp32 softmax backward).
    # Measured worst relative errors against HF bf16 (3 seeds): Gemma 2 1.07e-2..1.26e-2, Gemma 3
    # 9.8e-3..2.06e-2, the worst a k_norm weight gradient of Gemma 3 (eager), where hyclora's
    # gradient is nearer the fp32 one than HF's bf16 gradient is (3.0e-2 vs 3.6e-2 from fp32).
    model = lora_model(tiny_gemma(kind, impl, dtype=torch.bfloat16), train_norms=True)
    _compare(model, _padded_batch(), 2.5e-2)


# -- what is refused -----------------------------------------------------------------------------


def _apply_error(model, match, config=BASELINE):
    with pytest.raises(ValueError, match=match):
        apply_hyclora(model, config)


def test_gemma2_softcapping_refused_under_sdpa():
    model = lora_model(tiny_gemma("gemma2", "sdpa", attn_logit_softcapping=50.0))
    _apply_error(model, "attn_logit_softcapping")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ["relu", "gelu_new", "silu"])
def test_other_activations_refused(kind, act):
    _apply_error(lora_model(tiny_gemma(kind, "sdpa", hidden_activation=act)), "hidden_activation")


def test_gemma3_bidirectional_refused():
    _apply_error(lora_model(tiny_gemma("gemma3", "sdpa", use_bidirectional_attention=True)),
                 "use_bidirectional_attention")


def test_s2attn_refused_with_gemma2_softcapping():
    """Gemma 2 with attention logit soft-capping under S²-Attn is refused by name: by hyclora's
    adapter, by enable_s2attn, and by the attention function itself when the implementation was set
    by hand (the S²-Attn kernels, and sdpa in eval, apply no soft-capping)."""
    from hyclora.integrations.longseq import S2ATTN_NAME, enable_s2attn, register_s2attn

    register_s2attn()
    model = lora_model(tiny_gemma("gemma2", "eager"))
    model.get_base_model().config._attn_implementation = S2ATTN_NAME
    _apply_error(model, r"S²-Attn.*attn_logit_softcapping=5\.0")
    with pytest.raises(ValueError, match="soft-capping.*attn_logit_softcapping = None"):
        enable_s2attn(lora_model(tiny_gemma("gemma2", "eager")))
    model = tiny_gemma("gemma2", "eager")
    model.set_attn_implementation(S2ATTN_NAME)
    for train in (True, False):
        model.train(train)
        with pytest.raises(ValueError, match="soft-capping"):
            model(**_s2_batch())


def test_unknown_submodule_with_parameters_refused():
    model = tiny_gemma("gemma2", "sdpa")
    model.model.layers[0].extra_norm = torch.nn.LayerNorm(64)
    _apply_error(model, "extra_norm")


# -- LongLoRA S²-Attn -----------------------------------------------------------------------------
#
# Sliding layers: inside an S²-Attn group of G tokens a query sees keys at distance < G, so a window
# W >= G hides nothing more; with G > W the window applies inside each group. The reference below
# is independent of hyclora's S²-Attn code: dense softmax attention under S²-Attn's head pattern
# and the mask transformers builds for "sdpa" (sliding window, padding).

S2_REFERENCE = "s2_dense_reference"


def _s2_model(kind: str, window: int = 5, **overrides):
    """Gemma 3 under sdpa; Gemma 2 under eager (newer transformers refuse sdpa for it) without
    soft-capping (S²-Attn refuses it)."""
    if kind == "gemma2":
        return tiny_gemma(kind, "eager", window=window, attn_logit_softcapping=None, **overrides)
    return tiny_gemma(kind, "sdpa", window=window, **overrides)


def _s2_batch(s: int = 30, padded: bool = False):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, s), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -4:] = 0  # right padding
        mask[1, :3] = 0   # left padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "use_cache": False}


def _dense_s2_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from hyclora.ops.s2attn import resolve_group_size, s2_attention_reference_mask

    b, h, s, _ = query.shape
    group = resolve_group_size(s, module.config.s2attn_group_ratio, module.config.s2attn_group_size)
    allowed = s2_attention_reference_mask(s, h, group)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)
    rep = h // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2).contiguous(), None


def _with_reference(model, window: int):
    """A copy of the (S²-Attn-enabled) PEFT ``model`` on the dense reference, with ``window``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(S2_REFERENCE, _dense_s2_reference)
    AttentionMaskInterface.register(S2_REFERENCE, sdpa_mask)
    ref = copy.deepcopy(model)
    inner = ref.get_base_model()
    inner.config.sliding_window = window  # read when the sliding layers' mask is built
    inner.set_attn_implementation(S2_REFERENCE)
    return ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [5, 64])  # G = 8 (ratio 1/4 of 30 tokens): > window, <= window
def test_s2attn_step_equals_peft(kind, window):
    from helpers.models import check_s2attn_step_equals_peft

    check_s2attn_step_equals_peft(lora_model(_s2_model(kind, window), train_norms=True), _s2_batch())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group_size,window", [(8, 5), (4, 5)])
def test_s2attn_applies_the_sliding_window_inside_groups(kind, group_size, window):
    """PEFT + S²-Attn and hyclora (baseline) under S²-Attn equal the dense reference with the layer's
    window (left and right padding too). A group larger than the window: dropping the window changes
    the gradients (so the window is applied inside the groups); a group within the window: the
    window changes nothing."""
    from hyclora.integrations.longseq import enable_s2attn

    batch = _s2_batch(padded=True)
    model = enable_s2attn(lora_model(_s2_model(kind, window), train_norms=True), group_size=group_size)
    _, g_ref = step_grads(_with_reference(model, window), batch)
    _, g_no_window = step_grads(_with_reference(model, 64), batch)
    _, g_peft = step_grads(copy.deepcopy(model), batch)
    apply_hyclora(model, BASELINE)
    _, g_hyc = step_grads(model, batch)
    assert all(buffered_tensors(model).values())
    assert worst_rel_err(g_peft, g_ref) <= 1e-5
    assert worst_rel_err(g_hyc, g_ref) <= 1e-5
    if group_size > window:
        assert worst_rel_err(g_no_window, g_ref) > 1e-2
    else:
        assert worst_rel_err(g_no_window, g_ref) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [False, True])
def test_s2attn_eval_is_full_attention(kind, padded):
    """In eval an S²-Attn model (hyclora applied or not) runs the sliding / full attention of the
    implementation it had before (the window kept: the eval mask is the one "sdpa" builds)."""
    from hyclora.integrations.longseq import enable_s2attn

    batch = {k: v for k, v in _s2_batch(padded=padded).items() if k != "labels"}
    model = lora_model(_s2_model(kind))
    plain = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = plain(**batch).logits
        no_window = copy.deepcopy(plain)  # teeth: the window matters for these logits
        no_window.get_base_model().config.sliding_window = 64
        assert not torch.allclose(no_window(**batch).logits, expected, atol=1e-4)
        enable_s2attn(model)
        train_logits = model.train()(**batch).logits  # S²-Attn: not full attention
        assert not torch.allclose(train_logits, expected, atol=1e-4)
        for hyc in (False, True):
            if hyc:
                apply_hyclora(model, BASELINE)
            got = model.eval()(**batch).logits
            rows = batch["attention_mask"].bool()
            torch.testing.assert_close(got[rows], expected[rows], rtol=1e-5, atol=1e-5)


# -- compression ---------------------------------------------------------------------------------


def _fidelity(kind, impl, runs, seed=0):
    model = lora_model(tiny_gemma(kind, impl, layers=4, hidden=128, d_ff=256, head_dim=32, vocab=256, window=16),
                       r=8, alpha=16, b_std=0.01, seed=seed + 1)
    batch = _padded_batch(256, seed, (4, 64))
    _, ref = step_grads(model, batch)
    out = {}
    for layer_type, bits in runs:
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits))
        _, grads = step_grads(model, batch)
        revert_hyclora(model)
        values = torch.tensor([cosine(grads[n], ref[n]) for n in ref if "lora_" in n])
        assert len(values) == 4 * 7 * 2
        out[(layer_type, bits)] = (float(values.mean()), float(values.min()))
    print(kind, impl, {k: tuple(round(x, 5) for x in v) for k, v in out.items()})
    return out


# measured (mean, min) of the LoRA-gradient cosines (4 layers, 4 x 64 tokens, seed 0; up_proj's
# output at twice q_bit, hyclora.models.gemma.GEMMA_DOUBLE_BITS):
#   Gemma 2 eager (soft-capped): 8 bits intra (0.99989, 0.99972), intra_inter and full_fuse
#     (0.99988, 0.99971); 4 bits intra_inter (0.99721, 0.99195)
#   Gemma 2 sdpa: 8 bits (0.99976, 0.99944) / (0.99976, 0.99943); 4 bits (0.99623, 0.99021)
#   Gemma 3 eager and sdpa: 8 bits (0.99994, 0.99986) / (0.99993, 0.99985); 4 bits (0.99809, 0.99436)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_fidelity(kind, impl):
    runs = [("intra", 8), ("intra_inter", 8), ("intra_inter_full_fuse", 8), ("intra_inter", 4)]
    measured = _fidelity(kind, impl, runs)
    for layer_type in ("intra", "intra_inter", "intra_inter_full_fuse"):
        assert measured[(layer_type, 8)][1] >= 0.999, (layer_type, measured)
    assert measured[("intra_inter", 4)][0] >= 0.98, measured


@pytest.mark.parametrize("kind", KINDS)
def test_full_fuse_triton_kernels_match_torch(kind):
    # the fused kernels (GELU-tanh gated epilogue, (1 + w) RMSNorm with compressed input, rebuilds)
    # under the interpreter against the torch path of the same layer type
    from hyclora.kernels.common import INTERPRET

    if not INTERPRET:  # CPU tensors: the interpreter (on CUDA: test_gpu_gemma)
        pytest.skip("the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    model = lora_model(tiny_gemma(kind, "eager"), train_norms=True)
    batch = _padded_batch()
    grads = {}
    for backend in ("torch", "triton"):
        apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=4, kernel_backend=backend,
                                           iteration_threshold=1))
        step_grads(model, batch)  # calibrates
        grads[backend] = step_grads(model, batch)[1]
        revert_hyclora(model)
    for name, ref in grads["torch"].items():
        assert cosine(grads["triton"][name], ref) >= 0.9999, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_buffered_bytes_below_peft(kind, impl):
    from hyclora.memory import measure_saved_tensors

    model = lora_model(tiny_gemma(kind, impl, layers=4, hidden=128, d_ff=256, head_dim=32, vocab=256, window=16),
                       r=8, alpha=16)
    batch = _padded_batch(256, 0, (4, 64))

    def per_layer():  # layers 1..3 (layer 0 also holds what all layers share)
        loss, report = measure_saved_tensors(model, lambda: model(**batch).loss)
        loss.backward()
        return [report.per_region[i] for i in (1, 2, 3)]

    peft = per_layer()
    measured = {}
    for layer_type, bits in (("baseline", 8), ("intra", 4), ("intra_inter", 4), ("intra_inter_full_fuse", 4)):
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits))
        measured[layer_type] = per_layer()
        revert_hyclora(model)
    print(kind, impl, "PEFT", peft, measured)
    for layer_type, got in measured.items():
        limit = 0.75 if layer_type == "baseline" else 0.25
        assert all(g <= limit * p for g, p in zip(got, peft)), (layer_type, got, peft)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_buffered_bytes_equal_theory(kind, impl):
    """hyclora.memory's theory counts the sandwich-norm tensors (the post-norm inputs and their
    rstd) and Gemma's up kept at twice q_bit: measured bytes per layer equal it (layers 2-3, whose
    attention type an earlier layer had: a layer's region also holds the mask it first uses)."""
    from hyclora.memory import LayerShape, measure_saved_tensors, theoretical_layer_bytes

    if impl == "sdpa" and kind == "gemma2":
        pytest.skip("Gemma 2 runs its soft-capping under eager attention only")
    model = lora_model(tiny_gemma(kind, impl, layers=4, hidden=64, d_ff=96, head_dim=16, vocab=128, window=64), r=8)
    shape = LayerShape.from_config(model.config, lora_rank=8)
    assert shape.features and "up" in shape.double_bits
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    layers = list(model.get_base_model().model.layers)
    for layer_type, bits in (("baseline", 8), ("intra", 4), ("intra_inter", 2), ("intra_inter_full_fuse", 4)):
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits, layernorm_outlier_ratio=0.05))
        loss, report = measure_saved_tensors(model, lambda: model(input_ids=ids, labels=ids).loss, layers=layers)
        loss.backward()
        model.zero_grad(set_to_none=True)
        revert_hyclora(model)
        theory = theoretical_layer_bytes(shape, 2, 48, layer_type, bits, attention=impl, dtype_bytes=4,
                                         layernorm_outlier_ratio=0.05)
        for i in (2, 3):
            assert report.per_region[i] == pytest.approx(theory, rel=0.05), (layer_type, i, report.per_region, theory)


def test_post_norm_inputs_kept_compressed():
    # what the post-norms' backward keeps: the branch output at 2 x q_bit with exact outlier
    # channels (and rows), its rstd in fp32
    model = lora_model(tiny_gemma("gemma2", "sdpa", layers=2, hidden=128, d_ff=256, head_dim=32, vocab=256,
                                  window=16))
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4))
    step_grads(model, _padded_batch(256, 0, (4, 64)))
    saved = buffered_tensors(model)["base_model.model.model.layers.1"]
    entries = {e["name"]: e for part in ("attention", "mlp") for e in saved[part]}
    tokens = 4 * 64
    for name in ("attn_out", "mlp_out"):
        # codes 1 byte/value, fp32 lo/step per channel, a few exact channels/rows: below 1.3 bytes
        # per value (PEFT keeps the fp32 upcast of each post-norm input and more: 4 bytes and up)
        assert tokens * 128 <= entries[name]["nbytes"] <= 1.3 * tokens * 128, entries[name]
        assert entries[f"rstd_{name}"]["nbytes"] == tokens * 4
    stats = set(model.base_model.model.model.layers[0].hyclora_state.stats)
    assert {"attn_out", "mlp_out"} <= stats


def test_llama_layers_own_no_post_norm_statistics():
    from helpers.models import tiny_model

    model = lora_model(tiny_model("llama", "sdpa"))
    apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", q_bit=4))
    stats = set(model.base_model.model.model.layers[0].hyclora_state.stats)
    assert stats and not {"attn_out", "mlp_out"} & stats


# -- the chunked LM loss with final-logit soft-capping --------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_loss_final_softcapping_matches_hf(kind):
    from hyclora.integrations.longseq import CausalLMChunkedLoss

    model = lora_model(tiny_gemma(kind, "sdpa", final_logit_softcapping=CAP), train_norms=True)
    batch = _padded_batch()
    loss_ref, g_ref = step_grads(copy.deepcopy(model), batch)
    wrapped = CausalLMChunkedLoss(model, chunk_size=7)
    model.zero_grad(set_to_none=True)
    loss = wrapped(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert abs(float(loss) - float(loss_ref)) <= 1e-6 * abs(float(loss_ref))
    assert worst_rel_err(grads, g_ref) <= 1e-5


def test_chunked_cross_entropy_softcap_unit():
    import torch.nn.functional as F

    from hyclora.ops.chunked_ce import chunked_cross_entropy

    torch.manual_seed(0)
    h = (torch.randn(37, 16) * 3).requires_grad_(True)
    w = torch.randn(50, 16).requires_grad_(True)
    b = torch.randn(50).requires_grad_(True)
    y = torch.randint(0, 50, (37,))
    y[3] = -100
    ref = F.cross_entropy((torch.tanh(F.linear(h, w, b) / CAP) * CAP).float(), y)
    g_ref = torch.autograd.grad(ref, (h, w, b))
    out = chunked_cross_entropy(h, w, y, bias=b, chunk_size=8, softcap=CAP)
    g = torch.autograd.grad(out, (h, w, b))
    assert abs(float(out) - float(ref)) <= 1e-6
    for a, r in zip(g, g_ref):
        assert float((a - r).norm() / r.norm()) <= 1e-6
    plain = chunked_cross_entropy(h, w, y, bias=b, chunk_size=8)
    assert abs(float(plain) - float(out)) > 1e-3  # the cap bites
    with pytest.raises(ValueError, match="softcap"):
        chunked_cross_entropy(h, w, y, softcap=0.0)


# -- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_gated_gelu_epilogue_equals_autograd(dtype, act):
    import torch.nn.functional as F

    from hyclora.ops.swiglu import silu_mul_backward, silu_mul_forward

    torch.manual_seed(0)
    g = (torch.randn(33, 40) * 2).to(dtype).requires_grad_(True)
    u = torch.randn(33, 40).to(dtype).requires_grad_(True)
    mode = "tanh" if act == "gelu_pytorch_tanh" else "none"
    d = F.gelu(g, approximate=mode) * u
    dd = torch.randn_like(d)
    dg_ref, du_ref = torch.autograd.grad(d, (g, u), dd)
    s, d2 = silu_mul_forward(g.detach(), u.detach(), act)
    assert torch.equal(d2, d.detach())
    for stored in (None, s):
        dg, du = silu_mul_backward(dd, g.detach(), u.detach(), stored, act=act)
        assert torch.equal(dg, dg_ref) and torch.equal(du, du_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_plus_w_norm_equals_gemma_rmsnorm(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from hyclora.kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward, rmsnorm_from_rstd

    torch.manual_seed(0)
    norm = Gemma3RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    x = (torch.randn(37, 48) * 3).to(dtype).requires_grad_(True)
    y = norm(x)
    dy = torch.randn_like(y)
    dx_ref, dw_ref = torch.autograd.grad(y, (x, norm.weight), dy)
    got, rstd = rmsnorm_forward(x.detach(), norm.weight.detach(), 1e-6, "1+w")
    assert torch.equal(got, y.detach())  # bit-identical forward in every dtype
    assert torch.equal(rmsnorm_from_rstd(x.detach(), rstd, norm.weight.detach(), "1+w"), got)
    dx, dw = rmsnorm_backward(dy, x.detach(), rstd, norm.weight.detach(), True, True, "1+w")
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert float((dx.float() - dx_ref.float()).norm() / dx_ref.float().norm()) <= tol
    assert float((dw.float() - dw_ref.float()).norm() / dw_ref.float().norm()) <= tol


# -- CUDA (skipped without a GPU): the Triton kernels on the hardware ------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,impl", [("gemma2", "eager"), ("gemma3", "sdpa"), ("gemma3", "eager")])
def test_gpu_gemma(kind, impl):
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 64), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding (left padding makes HF's own bf16 sdpa gradients NaN on CUDA)
    batch = {k: v.cuda() for k, v in {"input_ids": ids, "attention_mask": mask,
                                       "labels": ids.masked_fill(mask == 0, -100)}.items()}
    results = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2.5e-2)):
        model = lora_model(tiny_gemma(kind, impl, dtype=dtype, layers=4, hidden=256, d_ff=688, head_dim=64,
                                      vocab=256, window=16), train_norms=True).cuda()
        _, exact = step_grads(copy.deepcopy(model), batch)
        apply_hyclora(model, BASELINE)
        err = worst_rel_err(step_grads(model, batch)[1], exact)
        revert_hyclora(model)
        assert err <= tol, (dtype, err)
        results[(str(dtype), "baseline worst rel err")] = err
        if dtype != torch.bfloat16:
            continue
        for layer_type, bits in (("intra_inter", 8), ("intra_inter_full_fuse", 8), ("intra_inter", 4),
                                 ("intra_inter_full_fuse", 4)):  # full_fuse: the Triton kernels
            apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits))
            for _ in range(2):  # calibrating, then frozen statistics
                _, grads = step_grads(model, batch)
            revert_hyclora(model)
            values = [cosine(grads[n], exact[n]) for n in exact if "lora_" in n]
            results[(layer_type, bits)] = (sum(values) / len(values), min(values))
    print(kind, impl, results)
    for bits, floor in ((8, 0.99), (4, 0.95)):
        fused, plain = results[("intra_inter_full_fuse", bits)], results[("intra_inter", bits)]
        assert fused[0] >= floor and abs(fused[0] - plain[0]) <= 5e-3, (bits, fused, plain)


def test_cuda_graphs_keep_each_layer_types_rope_tables():
    """Gemma 3's sliding and global layers read different RoPE tables (rope_local_base_freq vs
    rope_theta). Graphed steps (CPU emulation: static inputs copied into, as a replay does) equal the
    eager ones, because the layers of each table get their own static tables; with one table set
    shared by all layers a backward would read the other type's table."""
    from hyclora.cuda_graphs import DecoderLayerGraphs

    from helpers.graph_emulation import emulated_grapher

    base = tiny_gemma("gemma3", layers=4, window=64, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})
    thetas = {t: p["rope_theta"] for t, p in base.config.rope_parameters.items()}
    assert thetas["full_attention"] != thetas["sliding_attention"], thetas
    eager = lora_model(base)
    apply_hyclora(eager, HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=8, iteration_threshold=2,
                                       recalibrate_every=0))
    graphed = copy.deepcopy(eager)
    graphs = DecoderLayerGraphs(graphed, _grapher=emulated_grapher)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(3, 128, (2, 12), generator=gen)
        grads = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert worst_rel_err(grads[1], grads[0]) <= 1e-6, step
    assert graphs.counts["capture"] == 1 and graphs.counts["replay"] == 3 * 4, dict(graphs.counts)  # capture at step 1
    assert graphs._captured.rope_groups == [0, 1, 0, 1]
    graphs.remove()
