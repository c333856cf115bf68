"""Convergence: same seed, same data, 30 AdamW steps on the pretrained tiny Llama; the per-step
loss of the compressed layer types stays within a stated tolerance of baseline."""

from __future__ import annotations

import copy

import torch

from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora

from helpers.models import lora_model, needs_quant, tinyllama

pytestmark = needs_quant

STEPS = 30


def _batches():
    # Learnable structure: every row repeats a random 6-token motif, so a model that learns to
    # copy from the context drives the loss far below the unigram entropy. Four batches of
    # 2 x 36 tokens, cycled; one row left-padded.
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        motif = torch.randint(3, 512, (2, 6), generator=gen)
        ids = motif.repeat(1, 6)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _train(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(STEPS):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return torch.tensor(losses)


def test_convergence_intra_inter_4bit_tracks_baseline():
    base = lora_model(tinyllama("llama", "sdpa"), r=8, alpha=16, b_std=0.0)
    runs = {}
    for name, config in (
        ("baseline", HyCLoRAConfig(layer_type="baseline")),
        ("intra_inter4", HyCLoRAConfig(layer_type="intra_inter", q_bit=4)),
    ):
        model = copy.deepcopy(base)
        apply_hyclora(model, config)
        runs[name] = _train(model, _batches())
    ref, got = runs["baseline"], runs["intra_inter4"]
    print("baseline", [round(float(x), 2) for x in ref])
    print("intra_inter4", [round(float(x), 2) for x in got])
    assert ref[-4:].mean() < ref[:4].mean() - 5.0, "baseline did not learn: the test would not test anything"
    # measured over 30 steps (loss 19.6 -> ~5): max per-step relative difference 0.009; mean of
    # the last 4 steps 5.118 against 5.113 (previous layout, K only at 2x bits: 0.014, 5.140).
    rel = (got - ref).abs() / ref
    assert rel.max() <= 0.012
    assert got[-4:].mean() <= ref[-4:].mean() * 1.01
