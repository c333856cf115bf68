"""Gradient fidelity of the compressed layer types on a REAL pretrained model.

The pretrained tiny Llama of ../shared/data (260K params, 5 layers, GQA 8/4 heads, head_dim 8,
FFN 172: odd widths on purpose) with PEFT LoRA r=8 on all seven linears, lora_B drawn from
N(0, 0.01) (as after some training, so lora_A gets gradients). Cosine similarity of every LoRA
gradient with the exact (unpatched) one; thresholds are set just under what was measured
(CPU, torch 2.13, fp32, one fixed batch of 4 x 64 tokens with left and right padding).
"""

from __future__ import annotations

import pytest
import torch

from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora, revert_hyclora

from helpers.models import lora_model, needs_quant, step_grads, tinyllama
from helpers.numerics import cosine

pytestmark = needs_quant


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (4, 64), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    mask[3, -7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _cosines(impl, runs, probs="auto", seed=0):
    """{(layer_type, bits): (mean, min)} of the LoRA-gradient cosines against exact gradients."""
    model = lora_model(tinyllama("llama", impl), r=8, alpha=16, b_std=0.01, seed=seed + 1)
    batch = _batch(seed)
    _, ref = step_grads(model, batch)
    out = {}
    for layer_type, bits in runs:
        config = HyCLoRAConfig(layer_type=layer_type, q_bit=bits)
        config.attention_probs = probs  # eager map storage: sparse (paper) / recompute / dense
        apply_hyclora(model, config)
        _, grads = step_grads(model, batch)
        revert_hyclora(model)
        assert grads.keys() == ref.keys() and len(ref) == 5 * 7 * 2
        values = torch.tensor([cosine(grads[n], ref[n]) for n in ref])
        out[(layer_type, bits)] = (float(values.mean()), float(values.min()))
    print(impl, probs, seed, {k: tuple(round(x, 4) for x in v) for k, v in out.items()})
    return out


ALL_RUNS = [(t, b) for t in ("intra", "intra_inter") for b in (8, 4, 2)]

# measured (mean, min) on the two batches (seed 0 / seed 1), with the storage layout of
# hyclora/ops/storage.py (exact outlier rows, groups for V/O/D, the non-linear operators' inputs
# at 2x bits, normalised inputs rebuilt from the norm inputs):
#   intra       8: (1.0, 0.9998)/(1.0, 0.9997)  4: (0.9988, 0.9942)/(0.9986, 0.9903)  2: (0.9547, 0.7996)/(0.9449, 0.7164)
#   intra_inter 8: (1.0, 0.9997)/(1.0, 0.9998)  4: (0.9991, 0.9951)/(0.9989, 0.9916)  2: (0.9669, 0.8206)/(0.9636, 0.7597)
# (previous layout, K only at 2x bits: 4 bits (0.9971, 0.971), 2 bits (0.915, 0.338); plain
# per-channel storage: 4 bits ~(0.991, 0.92), 2 bits ~(0.86, -0.03..0.28))
# asserted (mean >=, min >=):
SDPA_THRESHOLDS = {
    ("intra", 8): (0.9999, 0.9995), ("intra", 4): (0.998, 0.988), ("intra", 2): (0.94, 0.70),
    ("intra_inter", 8): (0.9999, 0.9995), ("intra_inter", 4): (0.9985, 0.99), ("intra_inter", 2): (0.96, 0.75),
}


def _check(measured, thresholds):
    for key, (mean_min, min_min) in thresholds.items():
        mean, low = measured[key]
        assert mean >= mean_min and low >= min_min, f"{key}: mean {mean:.4f} min {low:.4f}"


def test_fidelity_sdpa_recompute():
    runs = [_cosines("sdpa", ALL_RUNS, seed=seed) for seed in (0, 1)]
    for measured in runs:
        _check(measured, SDPA_THRESHOLDS)
        for t in ("intra", "intra_inter"):  # monotone in the bit width
            assert measured[(t, 8)][0] > measured[(t, 4)][0] > measured[(t, 2)][0]
    # The inter-operator tier must not cost accuracy on average (it stores neither SiLU(G) nor
    # the Hadamard product, and rebuilds the LoRA part of q/k/v/gate/up exactly): averaged over
    # bit widths and batches, measured 0.9881 (intra_inter) against 0.9827 (intra).
    avg = lambda t: sum(m[(t, b)][0] for m in runs for b in (8, 4, 2)) / (3 * len(runs))  # noqa: E731
    assert avg("intra_inter") >= avg("intra") + 0.003


def test_fidelity_eager_probability_storage():
    # The paper's eager path keeps the top 5% of each row of the attention map: on this tiny
    # model (diffuse attention over 64 tokens, 4 entries kept per row) that pruning dominates
    # the error, even at 8 bits. Recomputing the map from the rebuilt Q/K (what the sdpa path
    # does) is as accurate as sdpa, and an exact dense map shows the quantisation-only error.
    # measured (mean, min): sparse 8 bits (0.8784, -0.209), 4 bits (0.8786, -0.222);
    # recompute 4 bits intra_inter (0.9991, 0.9944), intra (0.9989, 0.9943); dense 4 bits (0.9991, 0.9946)
    sparse = _cosines("eager", [("intra_inter", 8), ("intra_inter", 4)], "sparse")
    recompute = _cosines("eager", [("intra_inter", 4), ("intra", 4)], "recompute")
    dense = _cosines("eager", [("intra_inter", 4)], "dense")
    _check(sparse, {("intra_inter", 8): (0.87, -0.25), ("intra_inter", 4): (0.87, -0.25)})
    _check(recompute, {("intra_inter", 4): (0.9985, 0.99), ("intra", 4): (0.9985, 0.99)})
    _check(dense, {("intra_inter", 4): (0.9985, 0.99)})
    # recomputing the map is as accurate as keeping it dense (to 1e-3), far above the sparse map
    assert abs(dense[("intra_inter", 4)][0] - recompute[("intra_inter", 4)][0]) < 1e-3
    assert recompute[("intra_inter", 4)][0] > sparse[("intra_inter", 4)][0] + 0.1
