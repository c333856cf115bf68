"""benchmarks/bench_fidelity.py on a random Llama (no downloads): without compression the LoRA
gradients equal the exact ones to rounding; 8 bits stay close; every row names its worst tensor."""

from __future__ import annotations


import pytest


def test_random_model_rows(tmp_path, monkeypatch, benchmarks_on_path):
    pytest.importorskip("peft")
    monkeypatch.setenv("OUT", str(tmp_path))
    import bench_fidelity

    rows = bench_fidelity.main(["--model", "random", "--hidden", "64", "--ffn", "128", "--layers", "2", "--heads", "4",
                                "--attn", "sdpa",
                                "--examples", "2", "--max_len", "48",
                                "--variants", "baseline:8,intra_inter_full_fuse:8,intra_inter_full_fuse:2"])
    by = {(r["layer_type"], r["bits"]): r for r in rows}
    assert len(rows) == 3 and all(r["tensors"] == 2 * 7 * 2 for r in rows)
    # baseline keeps every activation exact: the hyclora path's own roundings only (bf16 model)
    assert by["baseline", 8]["max_rel_l2"] < 2e-2 and by["baseline", 8]["min_cos"] > 0.9998
    assert by["intra_inter_full_fuse", 8]["mean_cos"] > 0.999
    assert by["intra_inter_full_fuse", 2]["max_rel_l2"] > by["intra_inter_full_fuse", 8]["max_rel_l2"]
    assert all(r["worst_tensor"].startswith("layers.") and "lora_" in r["worst_tensor"] for r in rows)
    assert (tmp_path / "fidelity_random.csv").is_file()
