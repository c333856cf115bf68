"""Smoke run of benchmarks/profile_step.py on the CPU (the GPU numbers come from the H200)."""

from __future__ import annotations

import sys

import pytest


def test_profile_step_cpu_smoke(tmp_path, benchmarks_on_path):
    pytest.importorskip("peft")
    import profile_step

    rc = profile_step.main(["--device", "cpu", "--layers", "2", "--hidden", "256", "--bs", "1", "--seq", "32", "--vocab", "256",
                            "--steps", "1", "--warmup", "1", "--bits", "2", "--out", str(tmp_path)])
    assert rc == 0
    text = (tmp_path / "profile_step.md").read_text()
    assert "| PEFT LoRA | " in text and "| hyclora intra_inter_full_fuse 2-bit | " in text
    assert "top 30 by self CPU" in text
    rows = [line for line in text.splitlines() if line.startswith("| hyclora intra_inter_full_fuse")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[1]) > 0 and int(cells[-1]) > 0  # tokens/s and aten calls were measured
