"""benchmarks/bench_glue_parity.py bookkeeping (the GPU run cannot be re-done cheaply, so its table
and its guard against a cut-down staged folder must be right): the report's means, spreads and
deltas against plain LoRA, and the staged-rows check."""

import csv
import statistics

import pytest

from helpers.repo import REPO, load_script

pytestmark = pytest.mark.usefixtures("benchmarks_on_path")  # as `python benchmarks/bench_glue_parity.py` has it


def _bench():
    return load_script("hyclora_bench_glue_parity", REPO / "benchmarks" / "bench_glue_parity.py")


def test_report_means_and_deltas(tmp_path):
    bench = _bench()
    scores = {("rte", "lora"): [60.0, 62.0], ("mrpc", "lora"): [80.0, 84.0],
              ("rte", "ii2"): [59.0, 61.0], ("mrpc", "ii2"): [81.0]}
    path = tmp_path / "g.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=bench.FIELDS)
        writer.writeheader()
        for (task, config), xs in scores.items():
            for seed, x in enumerate(xs):
                writer.writerow({"task": task, "config": config, "seed": seed, "main": x})
    assert bench.done_runs(path) == {(t, c, str(s)) for (t, c), xs in scores.items() for s in range(len(xs))}
    lines = bench.report(path).splitlines()
    lora_avg = statistics.mean([statistics.mean(scores[("rte", "lora")]), statistics.mean(scores[("mrpc", "lora")])])
    ii2_avg = statistics.mean([statistics.mean(scores[("rte", "ii2")]), statistics.mean(scores[("mrpc", "ii2")])])
    lora = next(line for line in lines if line.startswith("| lora |"))
    ii2 = next(line for line in lines if line.startswith("| ii2 |"))
    assert f"{lora_avg:.2f}" in lora and f"{ii2_avg:.2f}" in ii2
    assert f"{ii2_avg - lora_avg:+.2f}" in ii2
    assert f"± {statistics.stdev(scores[('rte', 'lora')]):.1f} (n=2)" in lora and "(n=1)" in ii2


def test_staged_folder_refuses_more_rows_than_it_holds(tmp_path):
    bench = _bench()
    bench.check_staged_rows(tmp_path, None)  # not a staged folder: nothing to check
    (tmp_path / "STAGED").write_text("max_train_rows=500\n")
    bench.check_staged_rows(tmp_path, 500)
    with pytest.raises(SystemExit, match="--max_train_samples 500 or less"):
        bench.check_staged_rows(tmp_path, 501)
    with pytest.raises(SystemExit, match="first 500 training rows"):
        bench.check_staged_rows(tmp_path, None)
