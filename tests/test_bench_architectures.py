"""The benchmarks' --arch models and the LM-loss benchmark (CPU smoke runs; numbers come from the GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.repo import REPO, load_script

harness = load_script("harness", REPO / "benchmarks" / "harness.py")


@pytest.mark.parametrize("arch", sorted(harness.ARCHS))
def test_arch_configs_are_the_published_shapes(arch):
    cfg = harness.arch_config(arch)
    fields = harness.ARCHS[arch].fields
    assert cfg.model_type == harness.ARCHS[arch].model_type
    assert all(getattr(cfg, k) == v for k, v in fields.items())
    tiny = harness.arch_config(arch, tiny=True)
    assert (tiny.hidden_size, tiny.num_hidden_layers) == (harness.TINY.hidden, harness.TINY.layers)


@pytest.mark.parametrize("arch", ["qwen2.5-7b", "qwen3-8b", "gemma3-4b"])
def test_build_model_takes_the_arch_and_its_targets(arch):
    args = harness.parse(harness.parser(None, "model", "shapes", "lora", "smoke"), ["--smoke", "--arch", arch])
    model, cfg = harness.build_model(args)
    assert type(model.get_base_model()).__name__.lower().startswith(harness.ARCHS[arch].model_type.split("_")[0])
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(harness.ARCHS[arch].targets)


def test_lm_loss_smoke_chunked_equals_hf(tmp_path):
    bench = load_script("bench_lm_loss", REPO / "benchmarks" / "bench_lm_loss.py")
    rows = bench.main(["--smoke", "--out", str(tmp_path)])
    assert {r["variant"] for r in rows} == {"HF (full logits, fp32 upcast)", "hyclora chunked"}
    for vocab in (512, 2048):
        hf, chunked = (r for r in rows if r["vocab"] == vocab)
        assert math.isclose(hf["loss"], chunked["loss"], rel_tol=1e-5)
        assert chunked["grad_rel_diff_vs_hf"] < 1e-5
    assert (tmp_path / "lm_loss.csv").exists()


def test_whole_run_smoke(tmp_path):
    bench = load_script("bench_whole_run", REPO / "benchmarks" / "bench_whole_run.py")
    rows = bench.main(["--smoke", "--variants", "peft", "eager", "graphed", "--out", str(tmp_path)])
    by = {r["variant"]: r for r in rows}
    assert by["peft"]["steps"] == by["eager"]["steps"] == 6 and by["eager"]["run_tok_s"] > 0
    assert "skipped" in by["graphed"]["note"]  # no CUDA here
    assert math.isfinite(by["eager"]["loss"]) and (tmp_path / "whole_run.csv").exists()
