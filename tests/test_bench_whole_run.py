"""Smoke run of benchmarks/bench_whole_run.py on the CPU (the GPU numbers come from a GPU run): the
children run, report their steps, and write the torch.profiler table of a chosen step."""

from __future__ import annotations

import pytest


def test_whole_run_bench_cpu_smoke(tmp_path, benchmarks_on_path):
    pytest.importorskip("peft")
    import bench_whole_run

    rows = bench_whole_run.main(["--smoke", "--variants", "peft", "eager", "--steps", "3", "--from_step", "1",
                                 "--torch_profile_steps", "1", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["peft", "eager"]
    for r in rows:
        assert not r["note"].startswith("FAILED"), r["note"]
        assert r["steps"] == 3 and len(r["first_steps_s"]) == 3 and r["run_tok_s"] > 0
        assert r["peak_step"] is None  # no CUDA: no allocator peaks
    profile = (tmp_path / "profile_2x32_eager.txt").read_text()
    assert "TORCH PROFILE eager, step 1" in profile and "MLPBlockFn" in profile
    assert (tmp_path / "whole_run.csv").is_file()
