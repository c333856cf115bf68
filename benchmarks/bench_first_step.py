"""The first steps of a run: Triton compilation and autotuning (issue 23).

Each scenario is a fresh process (its own in-process memos) that builds the model (random Llama,
PEFT LoRA; hyclora with the hyclora arguments, default ``intra_inter_full_fuse``, 2-bit) and times
--steps forward + backward steps, each on its own padded length (uniform in [--seq / 2, --seq],
rounded up to --pad_multiple, seeded: the same lengths in every scenario), synchronised per step:

* ``peft``: PEFT LoRA alone, the reference;
* ``cold``: hyclora, empty tuning cache (``HYCLORA_CACHE_DIR``) and empty Triton cache
  (``TRITON_CACHE_DIR``): a first run on a new machine, every config of every kernel compiled and
  timed;
* ``warm_tuning``: the tuning cache ``cold`` filled, an empty Triton cache: the chosen configs
  compiled, nothing timed (what the tuning cache alone saves);
* ``warm``: both caches ``cold`` filled: a second run on the same machine (target: step 1 <= 5 s);
* ``fixed``: ``HYCLORA_QUANT_AUTOTUNE=0`` (fixed tiles), an empty Triton cache: compilation alone.

The table: step 1 (s), steps 2..N (sum and slowest), how many "tuning ..." lines the scenario
printed (one per kernel variant and size bucket tuned). Both caches live under --cache_root (a new
temporary folder unless given). Writes ``first_step.csv`` (one row per scenario) and
``first_step.json`` (every step's time and length) under --out.

    python benchmarks/bench_first_step.py                      # GPU, Llama-2-7B shape, 20 steps
    python benchmarks/bench_first_step.py --q_bit 4 --layers 8
    python benchmarks/bench_first_step.py --smoke              # CPU: checks the script (no Triton)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import harness

SCENARIOS = ("peft", "cold", "warm_tuning", "warm", "fixed")
FIELDS = ["scenario", "step1_s", "later_sum_s", "later_max_s", "tunings", "steps", "lengths", "note"]


def parse(argv=None):
    p = harness.parser(__doc__.split("\n\n")[0], "model", "batch", "lora", "hyclora", "smoke",
                       layer_type="intra_inter_full_fuse", q_bit=2)
    p.add_argument("--steps", type=int, default=20, help="steps per scenario, each on a new padded length")
    p.add_argument("--pad_multiple", type=int, default=8, help="padded lengths are multiples of this")
    p.add_argument("--scenarios", action=harness.Items, choices=SCENARIOS, default=list(SCENARIOS),
                   help="comma-separated, run in this order (warm* read what cold wrote)")
    p.add_argument("--cache_root", default=None,
                   help="where the scenarios' caches go (default: a new temporary folder)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # the scenario a child process runs
    return harness.parse(p, argv, bs=1, seq=32, steps=3, scenarios=["peft", "cold", "warm"], iteration_threshold=1)


def lengths(args) -> List[int]:
    rng = random.Random(0)
    m = args.pad_multiple
    return [-(-rng.randint(max(1, args.seq // 2), args.seq) // m) * m for _ in range(args.steps)]


def environment_of(scenario: str, root: Path) -> Dict[str, str]:
    env = dict(os.environ)
    tuning, triton = root / "tuning", root / "triton"
    fresh = root / f"triton-{scenario}"  # an empty Triton cache of its own
    env["HYCLORA_CACHE_DIR"] = str(tuning)
    env["TRITON_CACHE_DIR"] = str(triton if scenario in ("cold", "warm") else fresh)
    if scenario == "fixed":
        env["HYCLORA_QUANT_AUTOTUNE"] = "0"
        env["HYCLORA_CACHE_DIR"] = str(root / "tuning-fixed")
    return env


def run_child(args) -> Dict:
    """One scenario in this process: build, then --steps timed steps. Returns the row."""
    tunings = []

    class Count(logging.Handler):
        def emit(self, record):
            tunings.append(record.getMessage())

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    tuning_log = logging.getLogger("hyclora.kernels.tuning")
    tuning_log.setLevel(logging.INFO)
    tuning_log.addHandler(Count())
    tuning_log.addHandler(logging.StreamHandler(sys.stderr))  # the progress lines, as a user sees them
    tuning_log.propagate = False

    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    model, cfg = harness.build_model(args, device, dtype, max_positions=max(256, args.seq))
    hcfg = None if args.child == "peft" else harness.hyclora_config(args)
    gen = torch.Generator().manual_seed(0)
    times = []
    seqs = lengths(args)
    with harness.variant(model, hcfg):
        for seq in seqs:
            ids = torch.randint(0, cfg.vocab_size, (args.bs, seq), generator=gen).to(device)
            harness.sync(device)
            t0 = time.perf_counter()
            harness.lm_step(model, ids)
            harness.sync(device)
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    later = times[1:] or [float("nan")]
    return dict(scenario=args.child, step1_s=times[0], later_sum_s=sum(times[1:]), later_max_s=max(later),
                tunings=len(tunings), steps=len(times), lengths=len(set(seqs)), times=times, seqs=seqs, note="")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return 0
    root = Path(args.cache_root or tempfile.mkdtemp(prefix="hyclora-first-step-"))
    rows = []
    for scenario in args.scenarios:
        print(f"== {scenario} (caches under {root})", flush=True)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", scenario],
                              env=environment_of(scenario, root), stdout=subprocess.PIPE, text=True)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not result:
            print(proc.stdout[-4000:])
            rows.append(dict(scenario=scenario, note=f"FAILED (exit {proc.returncode})"))
            continue
        rows.append(json.loads(result[-1][len("RESULT "):]))
    print()
    print("\n".join(harness.markdown_table(
        ["scenario", "step 1 (s)", f"steps 2..{args.steps} (s)", "slowest later step (s)", "tunings", "note"],
        [(r["scenario"], harness.fmt(r.get("step1_s")), harness.fmt(r.get("later_sum_s")),
          harness.fmt(r.get("later_max_s")), r.get("tunings", ""), r.get("note", "")) for r in rows])))
    out = harness.out_dir(args)
    env = harness.environment(harness.device_of(args))
    harness.write_csv(out / "first_step.csv", rows, FIELDS, env=env)
    harness.write_json(out / "first_step.json", dict(env=env, cache_root=str(root), rows=rows))
    return 0 if all(not r.get("note") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
