"""benchmarks/bench_longseq.py: the longest-context search on a fake probe, and a CPU smoke run of
the whole script on a tiny model (every method that can run on CPU, markdown + CSV written)."""

import csv
import importlib.util
import sys

import pytest

from helpers.repo import REPO

pytestmark = pytest.mark.usefixtures("benchmarks_on_path")  # as `python benchmarks/bench_longseq.py` has it


def _bench():
    spec = importlib.util.spec_from_file_location("bench_longseq", REPO / "benchmarks" / "bench_longseq.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_longseq", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit", [4096, 20480, 36864, 100000, 300000])
def test_search_finds_the_longest_multiple_of_the_step(limit):
    bench = _bench()
    seen = []

    def fits(ctx):
        seen.append(ctx)
        return ctx <= limit

    longest, first_oom, probes, complete = bench.search_longest(fits, 8192, 4096, 262144)
    want = min(limit // 4096 * 4096, 262144)
    assert complete and longest == want
    assert first_oom == (None if limit >= 262144 else want + 4096)
    assert [c for c, _ in probes] == seen and len(seen) == len(set(seen))  # no context probed twice
    assert len(seen) <= 2 * 7  # doubling then bisection: logarithmic


def test_search_uses_known_points_and_stops_on_budget():
    bench = _bench()
    calls = []

    def fits(ctx):
        calls.append(ctx)
        return ctx <= 45056

    # 32k fitted and 64k failed already: only the bisection runs, inside (32k, 64k).
    longest, first_oom, probes, complete = bench.search_longest(fits, 65536, 4096, 262144, known_fit=32768, known_oom=65536)
    assert complete and (longest, first_oom) == (45056, 49152)
    assert all(32768 < c < 65536 for c in calls)

    budget = iter([True, None])  # the second probe finds the time budget spent
    longest, first_oom, probes, complete = bench.search_longest(lambda c: next(budget), 8192, 4096, 262144)
    assert not complete and longest == 8192 and first_oom is None
    assert probes == [(8192, "fit"), (16384, "budget")]
    with pytest.raises(ValueError, match="step"):
        bench.search_longest(lambda c: True, 1024, 4096, 262144)


def test_smoke_run_writes_tables(tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.setenv("OUT", str(tmp_path))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: on a shared 2-core runner more threads are 50x slower
    try:
        result = bench.main(["--smoke", "--time_budget", "600", "--methods", "liger_gc,peft_gc,hyclora_s2,hyclora_s2_gc"])
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    ran = {r["method"] for r in rows}
    assert {"peft_gc", "hyclora_s2", "hyclora_s2_gc"} <= ran
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0
    # CPU: nothing runs out of memory, so every search reaches the cap.
    assert all(s["longest_fit"] == 128 and s["status"] == "complete" for s in result["searches"])
    if "liger_gc" not in ran:
        assert any(n.startswith("liger_gc: skipped") for n in result["notes"])
    md = (tmp_path / "longseq.md").read_text()
    assert "| hyclora_s2 | 64 | ok |" in md and "| hyclora_s2_gc | 128 | - | complete | 128:fit |" in md
    with open(tmp_path / "longseq.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)



def test_point_cost_comes_from_the_timed_step():
    bench = _bench()
    # a first point of 1 warm-up + 1 timed step that took 200 s of wall time (compilation) but 1.3 s per step
    cost = bench.point_seconds({"step_s": 1.3}, 200.0, 2)
    assert cost == pytest.approx(2.6)
    assert bench.estimated_seconds((8192, cost), 16384, 2, 2) == pytest.approx(2.6 * 2 ** 1.5)
    # an OOM point has no timed step: its wall time is all there is
    assert bench.point_seconds({"step_s": float("nan")}, 42.0, 2) == 42.0
    assert bench.estimated_seconds(None, 65536, 2, 2) == 0.0


def test_graphed_method_replays_after_calibration(tmp_path, monkeypatch, capsys):
    # hyclora_s2_graphed on the CPU: the graph dispatcher with the emulated capture of
    # tests/helpers/graph_emulation.py (on a GPU: real graphs); warm-up 1 calibrates, 2 captures
    bench = _bench()
    monkeypatch.setenv("OUT", str(tmp_path))
    import hyclora.cuda_graphs as cuda_graphs

    from helpers.graph_emulation import chain_grapher

    monkeypatch.setattr(bench.Method, "available", lambda self: None)
    monkeypatch.setattr(cuda_graphs, "graph_decoder_layers",
                        lambda model, **kw: cuda_graphs.DecoderLayerGraphs(model, _grapher=chain_grapher, **kw))
    result = bench.main(["--smoke", "--methods", "hyclora_s2_graphed", "--search", "false",
                         "--warmup", "2", "--steps", "2"])
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["tokens_per_s"] > 0, row
    out = capsys.readouterr().out
    # smoke: 2 layers, 4 steps; the first step calibrates (iteration_threshold 1), the second captures
    assert "hyclora_s2_graphed: CUDA graphs: 6 decoder-layer calls replayed, 1 capture(s)" in out


@pytest.mark.parametrize("flags, field, value", [
    (["--fused_lora_ops", "false"], "fused_lora_ops", False),
    (["--lora_kernels_min_tokens", "0"], "lora_kernels_min_tokens", 0),
    (["--s2_block_kernels", "flash"], "s2_block_kernels", "flash"),
    (["--mlp_chunk_elements", "0"], "mlp_chunk_elements", 0),
])
def test_kernel_options_reach_the_hyclora_methods(flags, field, value, monkeypatch):
    # the kernel switches are HyCLoRAConfig fields: the hyclora methods apply a config carrying them
    from unittest import mock

    import hyclora

    bench = _bench()
    applied = []

    class Applied(Exception):
        pass

    def fake_apply(model, config):
        applied.append(config)
        raise Applied

    monkeypatch.setattr(hyclora, "apply_hyclora", fake_apply)
    args = bench.harness.parse(bench.build_parser(), ["--smoke", "--layer_type", "intra_inter_full_fuse", *flags])
    with pytest.raises(Applied):
        bench.Method("hyclora_s2", args).on(mock.Mock())
    (config,) = applied
    assert getattr(config, field) == value
    assert (config.layer_type, config.q_bit, config.iteration_threshold) == ("intra_inter_full_fuse", 2, 1)
