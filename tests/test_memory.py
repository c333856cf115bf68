"""hyclora.memory: measured buffered bytes (saved-tensor hooks) against the theoretical count."""

import pytest
import torch

from hyclora import HyCLoRAConfig
from hyclora.memory import (
    LayerShape,
    count_saved_tensors,
    measure_saved_tensors,
    theoretical_bytes_per_token,
    theoretical_layer_bytes,
)

pytest.importorskip("peft")


def _model(attn):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    cfg._attn_implementation = attn
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    return model, cfg


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "layer_type,bits,probs",
    [("baseline", 8, "auto"), ("intra", 4, "auto"), ("intra_inter", 2, "auto"), ("intra_inter", 8, "auto"),
     ("intra_inter", 4, "sparse")],
)
def test_measured_bytes_equal_theory(attn, layer_type, bits, probs):
    from hyclora import apply_hyclora, revert_hyclora

    if probs == "sparse" and attn == "sdpa":
        pytest.skip("the sdpa path keeps no attention map")
    model, cfg = _model(attn)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits, layernorm_outlier_ratio=0.05,
                                       attention_probs=probs))
    loss, report = measure_saved_tensors(model, lambda: model(input_ids=ids, labels=ids).loss)
    loss.backward()
    revert_hyclora(model)
    theory = theoretical_layer_bytes(LayerShape.from_config(cfg, lora_rank=8), 2, 48, layer_type, bits,
                                     attention=attn, probs=probs, dtype_bytes=4, layernorm_outlier_ratio=0.05)
    # Layer 0 also holds the tensors all layers share (RoPE cos/sin, mask): compare the others.
    for layer in (1, 2):
        assert report.per_region[layer] == pytest.approx(theory, rel=0.05), (layer, report.per_region)


def test_compression_ratios_per_token_llama7b_shape():
    shape = LayerShape(hidden=4096, intermediate=11008, num_heads=32, num_kv_heads=32, head_dim=128, lora_rank=16)
    base = theoretical_bytes_per_token(shape, "baseline", dtype_bytes=2, include_small=False)
    two = theoretical_bytes_per_token(shape, "intra_inter", 2, include_small=False)
    # 5d + 2f values per token: x_in, q, k, v, x_mid, gate, up (sdpa keeps no o; the normalised
    # q/k/v and gate/up inputs are rebuilt from x_in / x_mid, never kept).
    assert base == (5 * 4096 + 2 * 11008) * 2
    # The non-linear operators' inputs (x_in, x_mid, q, k, gate) at twice the bits
    # (their double_bits rows in hyclora.ops.tensor_specs); v and up at q_bit.
    assert two == (4 * 4096 + 11008) * 4 / 8 + (4096 + 11008) * 2 / 8
    assert base / two == pytest.approx(4.86, abs=0.01)


def test_counter_ignores_parameters_and_counts_storages_once():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([lin])

    wrap = Wrap()
    with count_saved_tensors(wrap) as report:
        y = lin(x) + lin(x)  # the same input saved twice, the weight never counted
    y.sum().backward()
    assert report.total == x.numel() * x.element_size()


def test_graph_pool_free_bytes_counts_private_pools_only(monkeypatch):
    from hyclora.memory import graph_pool_free_bytes

    segments = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 100, "allocated_size": 10},  # the default pool
        {"device": 0, "segment_pool_id": (0, 1), "total_size": 64, "allocated_size": 16},   # a graph pool
        {"device": 0, "segment_pool_id": (0, 1), "total_size": 32, "allocated_size": 32},
        {"device": 1, "segment_pool_id": (0, 2), "total_size": 50, "allocated_size": 0},    # another GPU
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda include_traces=True: segments)
    assert graph_pool_free_bytes() == 48 and graph_pool_free_bytes("cuda:1") == 50
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)  # a torch without include_traces
    assert graph_pool_free_bytes() == 48
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert graph_pool_free_bytes() == 0
