"""A compressed ``eager`` layer that keeps no attention map (``attention_probs`` "recompute", the
default when compressing) runs the fused sdpa kernel instead of materialising the b*h*s*s map.

Checked: the eager path then never calls the map-materialising eager forward (neither in the
forward nor in the backward's recompute), and its gradients equal the sdpa layer's (same
compression, same kernel) to rounding, with padding (Llama) and a sliding window (Mistral).
Baseline and the paper's sparse map still use the eager formulation.
"""

from __future__ import annotations

import pytest
import torch

import hyclora.ops.blocks as blocks
from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora, revert_hyclora

from helpers.models import lora_model, needs_quant, step_grads, tiny_model
from helpers.numerics import worst_rel_err

pytestmark = needs_quant


def _batch(left_pad=False, pad=5):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    if left_pad:  # the first query rows of sequence 1 attend to nothing
        mask[1, :pad] = 0
    elif pad:
        mask[1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _grads(kind, impl, config, left_pad=False):
    model = lora_model(tiny_model(kind, impl), r=4)
    apply_hyclora(model, config)
    # Mistral's sliding window (5) would leave right-padded rows with no key at all
    pad = 5 if kind == "llama" else 2
    try:
        return step_grads(model, _batch(left_pad, pad))[1]
    finally:
        revert_hyclora(model)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("layer_type", ["intra_inter", "intra_inter_full_fuse"])
def test_compressed_eager_runs_sdpa_kernel(kind, layer_type, monkeypatch):
    config = HyCLoRAConfig(layer_type=layer_type, q_bit=4, iteration_threshold=0)
    sdpa = _grads(kind, "sdpa", config)

    def no_map(*args, **kwargs):
        raise AssertionError("the eager map was materialised although nothing keeps it")

    monkeypatch.setattr(blocks, "eager_attention_forward", no_map)
    eager = _grads(kind, "eager", config)
    assert worst_rel_err(eager, sdpa) < 1e-4


def test_eager_keeps_its_map_when_asked(monkeypatch):
    # the paper's sparse map (and the dense map of baseline) still come from the eager forward
    calls = []
    original = blocks.eager_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(blocks, "eager_attention_forward", counting)
    config = HyCLoRAConfig(layer_type="intra_inter", q_bit=4, iteration_threshold=0)
    config.attention_probs = "sparse"
    _grads("llama", "eager", config)
    assert len(calls) == 2  # one per decoder layer
    calls.clear()
    _grads("llama", "eager", HyCLoRAConfig(layer_type="baseline"))
    assert len(calls) == 2
