"""Smoke run of benchmarks/bench_first_step.py on the CPU (the GPU numbers come from a GPU run)."""

from __future__ import annotations

import json

import pytest


def test_first_step_bench_cpu_smoke(tmp_path, benchmarks_on_path):
    pytest.importorskip("peft")
    import bench_first_step

    out = tmp_path / "out"
    rc = bench_first_step.main(["--smoke", "--scenarios", "peft,cold,warm_tuning", "--steps", "3",
                                "--cache_root", str(tmp_path / "caches"), "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "first_step.json").read_text())["rows"]
    assert [r["scenario"] for r in rows] == ["peft", "cold", "warm_tuning"]
    for r in rows:
        assert r["note"] == "" and r["steps"] == 3 and all(t > 0 for t in r["times"])
        assert r["seqs"] == rows[0]["seqs"] and all(s % 8 == 0 for s in r["seqs"])  # one seeded set of lengths
    assert (out / "first_step.csv").read_text().splitlines()[0].startswith("scenario,step1_s")
