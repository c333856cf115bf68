"""benchmarks/bench_qlora.py on the CPU: the code path of every variant (the numbers come from the H200).

Without bitsandbytes (the venv) the smoke run keeps plain bf16 linears; with it importable
(PYTHONPATH=<a --target install of .whl/bitsandbytes-*.whl>) the NF4 conversion is checked too.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch


@pytest.fixture
def bench(benchmarks_on_path):
    pytest.importorskip("peft")
    import bench_qlora

    return bench_qlora


def _rows(out: Path):
    with open(out / "qlora.csv") as f:
        return list(csv.DictReader(f))


def test_smoke_all_variants_cpu(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("HYCLORA_COMMIT", "test-commit")
    assert bench.main(["--smoke", "--device", "cpu", "--quant", "none", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    got = [(r["variant"], r["attention"]) for r in rows]
    hy = ["hyclora intra_inter_full_fuse 2-bit", "hyclora intra_inter_full_fuse 4-bit", "hyclora intra_inter 2-bit"]
    want = ([("PEFT LoRA", "eager")] + [(h, "eager") for h in hy]
            + [("PEFT LoRA", "sdpa"), ("PEFT LoRA + grad ckpt", "sdpa")] + [(h, "sdpa") for h in hy]
            + [("PEFT LoRA (again)", "eager"), ("PEFT LoRA (again)", "sdpa")])
    assert got == want
    assert all(r["status"] == "ok" for r in rows), rows
    assert all(float(r["tok_s"]) > 0 for r in rows)
    # hyclora warms up past its calibration (smoke: iteration_threshold 1 -> 2 steps), PEFT 1 step
    assert [int(r["warmup_steps"]) for r in rows if r["variant"].startswith("hyclora")] == [2] * 6
    # the forward is exact in every variant (compression only touches what the backward keeps), so
    # the losses agree to bf16 rounding; measured spread 0.001 (eager vs sdpa)
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert max(losses) - min(losses) < 5e-3, losses
    assert {r["commit"] for r in rows} == {"test-commit"} and {r["quant"] for r in rows} == {"bf16"}
    text = (tmp_path / "qlora.md").read_text()
    assert "NOT quantised" in text and "commit test-commit" in text
    assert "| hyclora intra_inter_full_fuse 2-bit | sdpa | ok |" in text


def test_time_budget_skips_and_reports(bench, tmp_path):
    assert bench.main(["--smoke", "--device", "cpu", "--attn", "sdpa", "--hyclora", "--time_budget", "0",
                       "--out", str(tmp_path)]) == 0
    assert _rows(tmp_path) == []
    assert "Not run (--time_budget 0 s reached): PEFT LoRA (sdpa)" in (tmp_path / "qlora.md").read_text()


def test_bad_hyclora_variant_names_the_fix(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--hyclora", "intra_inter_full_fuse:3"])
    assert "q_bit=3 is invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--hyclora", "intra_inter_full_fuse"])
    assert "LAYER_TYPE:BITS" in capsys.readouterr().err


def test_quant_nf4_without_bitsandbytes_says_how_to_install(bench, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(SystemExit, match="pip install --target"):
        bench.main(["--smoke", "--device", "cpu", "--quant", "nf4"])


def test_make_linear4bit_is_nf4_of_the_random_weight(bench):
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    for out_f, in_f in [(64, 128), (384, 128), (128, 384)]:
        layer = bench.harness.make_linear4bit(in_f, out_f, False, "cpu", 0.02, generator=torch.Generator().manual_seed(3))
        w = torch.empty(out_f, in_f, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(3))
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
        qs = layer.weight.quant_state
        assert qs.quant_type == "nf4" and qs.nested and layer.quant_state is qs and layer.compute_dtype == torch.bfloat16
        deq = F.dequantize_4bit(layer.weight.data, qs).float()
        rel = ((deq - w.float()).norm() / w.float().norm()).item()
        assert 0.0 < rel < 0.1, rel  # NF4 on Gaussian weights: measured 0.092
        x = torch.randn(3, in_f, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), x.float() @ deq.t(), rtol=3e-2, atol=3e-3)


def test_build_model_nf4_cpu(bench):
    bnb = pytest.importorskip("bitsandbytes")
    args = bench.parse_args(["--smoke"])
    shape = bench.harness.shape_of(args)
    model, _ = bench.harness.random_llama(shape, "cpu", torch.bfloat16, nf4=True)
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    four = [m for m in lin if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four) == 7 * shape.layers and len(lin) == len(four) + 1  # + lm_head, kept bf16
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.all(model.model.norm.weight == 1)
    model = bench.harness.add_lora(model, args.lora_r, seed=1)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    # PEFT's QLoRA layer, as after from_pretrained(load_in_4bit=True), not the generic lora.Linear
    assert type(q).__module__ == "peft.tuners.lora.bnb" and isinstance(q.base_layer, bnb.nn.Linear4bit)
    ids = torch.randint(0, shape.vocab, (1, 16))
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - math.log(shape.vocab)) < 0.5  # random init: near uniform prediction
    loss.backward()
    assert q.lora_A["default"].weight.grad is not None and q.base_layer.weight.grad is None
