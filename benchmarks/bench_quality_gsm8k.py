"""GSM8K quality parity on the CPU: plain LoRA vs hyclora, SmolLM2-135M-Instruct.

Each configuration fine-tunes the same base model on GSM8K train with the same seed, data and
order (HF Trainer via ``examples/gsm8k.py``'s pipeline, ``hyclora.training.run_finetune``), then
scores the token-weighted eval loss on the first N test problems and greedy zero-shot exact match
(strict "The final answer is" / flexible last number, the local ``gsm8k_exact_match`` metric) on
the first M test problems. Only the hyclora setting differs between configurations:

    lora    plain PEFT LoRA (hyclora off)
    ii4     hyclora intra_inter, 4-bit
    ii2     hyclora intra_inter, 2-bit
    intra2  hyclora intra, 2-bit

Each configuration runs in its own child process (fresh memory, and a crash costs one row),
one after another, with one torch thread (--threads): on a small shared CPU more threads wait on
each other. A row is appended to quality_gsm8k.csv under --out as each finishes and the markdown
table quality_gsm8k.md is rewritten; a rerun skips configurations already in the CSV with the
same settings (resume).

    python benchmarks/bench_quality_gsm8k.py                 # the full run (CPU, most of an hour per config)
    python benchmarks/bench_quality_gsm8k.py --smoke         # 3 steps, 4 problems: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness

CONFIGS = {
    "lora": ["--use_hyclora", "false"],
    "ii4": ["--use_hyclora", "true", "--layer_type", "intra_inter", "--q_bit", "4"],
    "ii2": ["--use_hyclora", "true", "--layer_type", "intra_inter", "--q_bit", "2"],
    "intra2": ["--use_hyclora", "true", "--layer_type", "intra", "--q_bit", "2"],
}
# Settings that must match for a CSV row to count as done (resume).
SETTING_KEYS = ["max_steps", "batch", "grad_acc", "max_length", "lr", "lora_r", "lora_alpha", "seed",
                "eval_samples", "generate_samples", "max_new_tokens", "dtype", "attn"]
FIELDS = ["config", "layer_type", "q_bit", *SETTING_KEYS, "threads",
          "train_loss", "last_logged_loss", "eval_loss", "eval_perplexity", "eval_tokens",
          "em_strict", "em_flexible", "n_generated", "train_seconds", "train_tokens",
          "tokens_per_s", "eval_loss_seconds", "generate_seconds", "wall_seconds",
          "commit", "hyclora_file"]


def finetune_argv(args, config: str, output_dir: str, results_file: str) -> list:
    return [
        "--model_name_or_path", harness.smollm2_folder(), "--gguf_file", harness.SMOLLM2_GGUF,
        "--data", str(args.data), "--output_dir", output_dir, "--results_file", results_file,
        "--max_steps", str(args.max_steps),
        "--per_device_train_batch_size", str(args.batch),
        "--gradient_accumulation_steps", str(args.grad_acc),
        "--per_device_eval_batch_size", str(args.eval_batch),
        "--max_length", str(args.max_length), "--learning_rate", str(args.lr),
        "--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha),
        "--seed", str(args.seed), "--data_seed", str(args.seed),
        "--max_eval_samples", str(args.eval_samples),
        "--max_generate_samples", str(args.generate_samples),
        "--max_new_tokens", str(args.max_new_tokens),
        "--torch_dtype", args.dtype, "--attn_implementation", args.attn,
        "--logging_steps", str(max(1, min(10, args.max_steps // 10))),
        # No checkpoints: only the final adapter (written by run_finetune) is kept.
        "--save_strategy", "no", "--dataloader_num_workers", "0", "--use_cpu", "true",
        *CONFIGS[config],
    ]


# -- child: one configuration, in this process --------------------------------------------------
def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import hyclora
    import hyclora.training.run as run_mod
    from hyclora.training import parse_finetune_args, run_finetune

    print(f"hyclora imported from {hyclora.__file__}; commit {args.commit}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    # run_finetune reports the training time but not the evaluation's; time both evaluation
    # calls by wrapping the names run.py looks up when it evaluates.
    timings = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    run_mod.evaluate_perplexity = timed("eval_loss_seconds", run_mod.evaluate_perplexity)
    run_mod.evaluate_gsm8k = timed("generate_seconds", run_mod.evaluate_gsm8k)
    out = Path(args.child_json)
    argv = finetune_argv(args, args.only, str(out.parent / args.only), str(out.with_suffix(".results.json")))
    t0 = time.perf_counter()
    metrics = run_finetune(parse_finetune_args("gsm8k", argv))
    metrics["wall_seconds"] = time.perf_counter() - t0
    metrics.update(timings)
    metrics["hyclora_file"] = hyclora.__file__
    out.write_text(json.dumps(metrics, indent=2, default=str))


# -- parent: every configuration, one after another ----------------------------------------------
def settings(args) -> dict:
    return {k: str(getattr(args, k)) for k in SETTING_KEYS}


def row_from(args, config: str, m: dict, commit: str) -> dict:
    cfg = CONFIGS[config]
    row = {"config": config,
           "layer_type": cfg[cfg.index("--layer_type") + 1] if "--layer_type" in cfg else "-",
           "q_bit": cfg[cfg.index("--q_bit") + 1] if "--q_bit" in cfg else "-",
           **settings(args), "threads": args.threads}
    history = m.get("loss_history") or []
    row.update(
        train_loss=m.get("train_loss"), last_logged_loss=history[-1][1] if history else None,
        eval_loss=m.get("eval_loss"), eval_perplexity=m.get("eval_perplexity"),
        eval_tokens=m.get("eval_tokens"), em_strict=m.get("gsm8k_exact_match_strict"),
        em_flexible=m.get("gsm8k_exact_match_flexible"), n_generated=m.get("gsm8k_n"),
        train_seconds=m.get("train_seconds"), train_tokens=m.get("input_tokens"),
        tokens_per_s=m.get("tokens_per_s"), eval_loss_seconds=m.get("eval_loss_seconds"),
        generate_seconds=m.get("generate_seconds"), wall_seconds=m.get("wall_seconds"),
        commit=commit, hyclora_file=m.get("hyclora_file"),
    )
    return row


def _f(value, fmt):
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "-"


def write_markdown(path: Path, rows: list) -> None:
    base = next((r for r in rows if r["config"] == "lora"), None)
    lines = ["| config | train loss (last logged) | eval loss | vs LoRA | EM strict % | EM flexible % "
             "| train s | tokens/s | generate s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = "-"
        if base is not None and r is not base:
            try:
                rel = f"{100 * (float(r['eval_loss']) / float(base['eval_loss']) - 1):+.2f}%"
            except (TypeError, ValueError, ZeroDivisionError):
                pass
        lines.append(
            f"| {r['config']} | {_f(r['last_logged_loss'], '.4f')} | {_f(r['eval_loss'], '.4f')} | {rel} "
            f"| {_f(100 * float(r['em_strict'] or 'nan'), '.1f')} "
            f"| {_f(100 * float(r['em_flexible'] or 'nan'), '.1f')} "
            f"| {_f(r['train_seconds'], '.0f')} | {_f(r['tokens_per_s'], '.0f')} "
            f"| {_f(r['generate_seconds'], '.0f')} |"
        )
    if rows:
        r = rows[0]
        lines += ["", f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, {r['dtype']}, {r['attn']}), LoRA "
                  f"r={r['lora_r']} alpha={r['lora_alpha']} on all seven linears, {r['max_steps']} steps x "
                  f"batch {r['batch']} x grad-acc {r['grad_acc']}, lr {r['lr']} cosine, warmup 3%, wd 0.1, "
                  f"seed {r['seed']}, max length {r['max_length']}; eval loss over the first "
                  f"{r['eval_samples']} GSM8K test problems (answer tokens), greedy exact match on the "
                  f"first {r['generate_samples']} (max_new_tokens {r['max_new_tokens']}); commit "
                  f"{r['commit']}; CPU, {r['threads']} torch threads."]
    path.write_text("\n".join(lines) + "\n")


def parent(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "quality_gsm8k.csv", out / "quality_gsm8k.md"
    commit = harness.commit()
    harness.write_json(out / "quality_gsm8k.env.json", harness.environment("cpu"))
    harness.smollm2_folder()  # fail before any training when the model is missing
    if not (Path(args.data) / "train.jsonl").is_file():
        raise SystemExit(f"GSM8K not found in {args.data} (expected train.jsonl/test.jsonl)")
    print(f"commit {commit}; results -> {csv_path}", flush=True)
    configs = args.configs
    want = settings(args)
    failed = []
    for config in configs:
        done = [r for r in harness.read_csv(csv_path)
                if r["config"] == config and all(r.get(k) == v for k, v in want.items())]
        if done:
            print(f"[{config}] already in {csv_path}, skipped", flush=True)
            continue
        child_json = work / f"{config}.metrics.json"
        child_json.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", config,
               "--child_json", str(child_json), "--commit", commit] + args.raw_argv
        print(f"[{config}] start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        # One compute thread everywhere (OpenMP, MKL, tokenizers) so the child never competes
        # with itself on the shared cores.
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        rc = subprocess.run(cmd, env=env).returncode
        wall = time.perf_counter() - t0
        if rc != 0 or not child_json.is_file():
            print(f"[{config}] FAILED (exit {rc}) after {wall:.0f} s", flush=True)
            failed.append(config)
            continue
        m = json.loads(child_json.read_text())
        row = row_from(args, config, m, commit)
        row["wall_seconds"] = wall
        harness.append_csv(csv_path, row, FIELDS)
        write_markdown(md_path, [r for r in harness.read_csv(csv_path)
                                 if all(r.get(k) == v for k, v in want.items())])
        print(f"[{config}] done in {wall:.0f} s: train loss {_f(row['train_loss'], '.4f')}, eval loss "
              f"{_f(row['eval_loss'], '.4f')}, EM strict {row['em_strict']}, flexible {row['em_flexible']}, "
              f"{_f(row['tokens_per_s'], '.1f')} train tokens/s, generation {_f(row['generate_seconds'], '.0f')} s",
              flush=True)
    if md_path.is_file():
        print(md_path.read_text(), flush=True)
    if failed:
        raise SystemExit(f"failed: {failed}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = harness.parser(__doc__, "lora", "smoke")
    p.add_argument("--configs", action=harness.Items, choices=tuple(CONFIGS), default=list(CONFIGS))
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad_acc", type=int, default=1)
    # CPU decoding is overhead-bound: 16 rows cost little more per step than 8.
    p.add_argument("--eval_batch", type=int, default=16)
    p.add_argument("--max_length", type=int, default=512)
    # Paper Table 8 / reference script: lr 3e-4, r = alpha = 16, seed 11.
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--eval_samples", type=int, default=200)
    p.add_argument("--generate_samples", type=int, default=200)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(harness.SHARED_DATA / "gsm8k"))
    p.add_argument("--work_dir", default=str(harness.REPO / "out" / "quality_gsm8k"),
                   help="adapters and per-config results JSON (not committed)")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--child_json", help=argparse.SUPPRESS)
    p.add_argument("--commit", default="unknown", help=argparse.SUPPRESS)
    args = harness.parse(p, argv, max_steps=3, eval_samples=4, generate_samples=4, max_new_tokens=16)
    args.lora_alpha = args.lora_alpha or args.lora_r
    if args.max_steps < 1 or args.batch < 1 or args.grad_acc < 1:
        raise SystemExit("--max_steps, --batch and --grad_acc must be >= 1")
    args.raw_argv = argv
    if args.only:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
