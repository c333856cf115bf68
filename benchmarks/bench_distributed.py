"""DeepSpeed ZeRO-2/3 on 1, 2, 4 (8) GPUs: plain PEFT LoRA vs hyclora, peak memory per GPU,
tokens/s per GPU and weak-scaling efficiency.

A random-weight Llama (Llama-2-7B shape by default, bf16), PEFT LoRA r=16 alpha=16 on all seven
linears, sdpa attention, torch AdamW, one training
step = forward + backward + optimizer step through a plain ``deepspeed.initialize`` engine with
``ds_configs/zero{2,3}.json`` ("auto" filled by hyclora.integrations.deepspeed.fill_auto). Every
GPU processes its own micro-batch (weak scaling: the work per GPU is constant), so

    weak-scaling efficiency(N) = tokens/s per GPU at N GPUs / tokens/s per GPU at 1 GPU.

Each (GPUs, ZeRO stage, method, checkpointing) point is its own ``torchrun`` launch, started by
this script (``--launch``); the workers write one JSON line each, this script gathers them into
a table and a CSV. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (after
the warm-up, which also covers hyclora's calibration), reported as the largest over the ranks,
and as "above static" (minus what was allocated before the first step: weights, LoRA, optimizer).

    # on the GPU machine (deepspeed travels as a wheel, see ../shared/gpu/README.md):
    python benchmarks/bench_distributed.py --launch 1,2 --zero 2,3 --methods lora,hyclora
    python benchmarks/bench_distributed.py --launch 1,2,4 --zero 3 --methods lora,hyclora --ckpt none,deepspeed
    # largest micro-batch that fits at --seq (doubling search, one launch per probe):
    python benchmarks/bench_distributed.py --launch 2 --zero 3 --methods lora,hyclora --find_max
    # CPU check of the whole pipeline (tiny model, gloo):
    python benchmarks/bench_distributed.py --smoke

Methods: ``lora`` (PEFT LoRA), ``hyclora`` (the hyclora arguments, default intra_inter 4-bit).
``--ckpt``: ``none``, ``torch`` (HF-style non-reentrant checkpointing of every ``--every_k``-th
layer) or ``deepspeed`` (deepspeed.checkpointing from the config's activation_checkpointing
block). ``--bs`` is the micro-batch per GPU. Writes ``dist.csv`` and ``dist.md`` under
``--out``/bench_distributed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness

FIELDS = [
    "gpus", "zero", "method", "ckpt", "every_k", "mbs", "seq", "status", "peak_gib_max",
    "peak_above_static_gib_max", "static_gib_max", "tok_s_per_gpu", "step_s_median",
    "weak_scaling_eff", "loss_first", "loss_last", "device",
]


# ------------------------------------------------------------------------------------------------
# worker (one rank)
# ------------------------------------------------------------------------------------------------
def worker(spec: dict) -> None:
    import torch

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        # gloo does the communication; skip DeepSpeed's JIT-compiled shared-memory op.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        torch.set_num_threads(1)
    import deepspeed
    from transformers import LlamaForCausalLM

    from hyclora.integrations.deepspeed import fill_auto, prepare_zero3

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg_model = harness.llama_config(harness.Shape(**spec["shape"]), spec["attn"], max(4096, spec["seq"]))
    ds_name = f"zero{spec['zero']}" + ("_actckpt" if spec["ckpt"] == "deepspeed" else "")
    ds_cfg = fill_auto(ds_name, micro_batch_size=spec["mbs"], gradient_accumulation_steps=1, world_size=world,
                       hidden_size=cfg_model.hidden_size, bf16=cuda)

    torch.manual_seed(0)
    if spec["zero"] == 3:
        # Partitioned while it is built: a 7B model never exists whole on one GPU.
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg, dtype=dtype):
            model = LlamaForCausalLM(cfg_model)
    else:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg_model)
        finally:
            torch.set_default_dtype(default_dtype)
    model = harness.add_lora(model, spec["lora_r"], spec["lora_alpha"], spec["lora_target_modules"], b_std=None)
    if spec["method"] == "hyclora":
        from hyclora import HyCLoRAConfig
        from hyclora.models import apply_hyclora

        apply_hyclora(model, HyCLoRAConfig.from_dict(spec["hyclora"]))
    if spec["zero"] == 3:
        prepare_zero3(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    if spec["ckpt"] != "none":
        from hyclora.integrations.checkpointing import enable_activation_checkpointing

        kwargs = {"ds_config": ds_cfg} if spec["ckpt"] == "deepspeed" else {}
        enable_activation_checkpointing(engine.module, backend=spec["ckpt"], every_k=spec["every_k"], **kwargs)
    engine.train()

    gen = torch.Generator().manual_seed(1000 + rank)  # each GPU its own data: weak scaling
    shape = (spec["mbs"], spec["seq"])

    batches = iter([torch.randint(0, cfg_model.vocab_size, shape, generator=gen).to(device)
                    for _ in range(spec["warmup"] + spec["steps"])])
    losses = []

    def step():
        x = next(batches)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())

    result = {k: spec[k] for k in ("zero", "method", "ckpt", "every_k", "mbs", "seq")}
    result.update(gpus=world, device=torch.cuda.get_device_name(device) if cuda else "cpu")
    try:
        m = harness.measure(step, device, steps=spec["steps"], warmup=spec["warmup"], tokens=spec["mbs"] * spec["seq"])
        result.update(status="ok", step_s=m["step_s"], tok_s=m["tok_s"], peak=m["peak"], static=m["start"],
                      loss_first=float(losses[0]), loss_last=float(losses[-1]))
    except torch.cuda.OutOfMemoryError:
        result.update(status="OOM")
    rows = [None] * world
    torch.distributed.all_gather_object(rows, result)
    if rank == 0:
        with open(spec["result_file"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_merge(rows)) + "\n")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _merge(rows):
    """One row per launch from the per-rank results."""
    first = dict(rows[0])
    gib = 1024 ** 3
    out = {k: first[k] for k in ("gpus", "zero", "method", "ckpt", "every_k", "mbs", "seq", "device")}
    if any(r["status"] != "ok" for r in rows):
        out["status"] = "OOM"
        return out
    cuda = first["device"] != "cpu"  # no device memory to report on the CPU smoke run
    out.update(
        status="ok",
        peak_gib_max=round(max(r["peak"] for r in rows) / gib, 3) if cuda else None,
        peak_above_static_gib_max=round(max(r["peak"] - r["static"] for r in rows) / gib, 3) if cuda else None,
        static_gib_max=round(max(r["static"] for r in rows) / gib, 3) if cuda else None,
        tok_s_per_gpu=round(statistics.mean(r["tok_s"] for r in rows), 1),
        step_s_median=round(statistics.median(r["step_s"] for r in rows), 4),
        loss_first=round(first["loss_first"], 4),
        loss_last=round(first["loss_last"], 4),
    )
    return out


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(spec: dict, gpus: int, timeout: float) -> dict:
    """One torchrun launch of ``gpus`` ranks; returns its merged row (status 'failed' on error)."""
    spec = dict(spec)
    result_file = Path(spec["out"]) / "rows.jsonl"
    spec["result_file"] = str(result_file)
    before = result_file.read_text().count("\n") if result_file.exists() else 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
           "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    log = Path(spec["out"]) / "logs" / f"g{gpus}_z{spec['zero']}_{spec['method']}_{spec['ckpt']}_b{spec['mbs']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        with open(log, "w") as handle:
            code = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=str(harness.REPO)).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    lines = result_file.read_text().splitlines() if result_file.exists() else []
    base = {k: spec[k] for k in ("zero", "method", "ckpt", "every_k", "mbs", "seq")}
    if len(lines) > before:
        row = json.loads(lines[-1])
    else:
        tail = log.read_text()[-800:] if log.exists() else ""
        oom = "out of memory" in tail.lower()
        row = dict(base, gpus=gpus, status="OOM" if oom else f"failed ({code})")
        print(f"[bench_distributed] launch failed ({code}), log {log}:\n{tail}", file=sys.stderr, flush=True)
    row["launch_s"] = round(time.time() - started, 1)
    print(f"[bench_distributed] {json.dumps(row)}", flush=True)
    return row


def _weak_scaling(rows):
    base = {}
    for r in rows:
        if r.get("status") == "ok" and r["gpus"] == 1:
            base[(r["zero"], r["method"], r["ckpt"], r["mbs"], r["seq"])] = r["tok_s_per_gpu"]
    for r in rows:
        key = (r["zero"], r["method"], r["ckpt"], r["mbs"], r["seq"])
        if r.get("status") == "ok" and key in base:
            r["weak_scaling_eff"] = round(r["tok_s_per_gpu"] / base[key], 3)
    return rows


def write_tables(rows, out: Path) -> str:
    rows = _weak_scaling(rows)
    harness.write_csv(out / "dist.csv", rows, FIELDS)
    cols = ["gpus", "zero", "method", "ckpt", "mbs", "seq", "status", "peak_gib_max", "peak_above_static_gib_max",
            "tok_s_per_gpu", "weak_scaling_eff", "loss_last"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    device = next((r.get("device") for r in rows if r.get("device")), "?")
    text = f"device: {device}\n\n" + "\n".join(lines) + "\n"
    (out / "dist.md").write_text(text)
    return text


def main(argv=None) -> None:
    p = harness.parser(__doc__, "shape", "batch", "steps", "lora", "hyclora", "smoke", steps=4, warmup=6, q_bit=4)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    p.add_argument("--launch", action=harness.Items, item=int, default=[1, 2], help="GPU counts (processes per launch)")
    p.add_argument("--zero", action=harness.Items, item=int, choices=(1, 2, 3), default=[2, 3], help="ZeRO stages")
    p.add_argument("--methods", action=harness.Items, choices=("lora", "hyclora"), default=["lora", "hyclora"])
    p.add_argument("--ckpt", action=harness.Items, choices=("none", "torch", "deepspeed"), default=["none"],
                   help="activation checkpointing")
    p.add_argument("--every_k", type=int, default=1, help="checkpoint every k-th layer (hybrid policy)")
    p.add_argument("--find_max", action="store_true",
                   help="per point, double --bs from 1 until OOM (one launch per probe)")
    p.add_argument("--max_minutes", type=float, default=9.0, help="start no new launch after this many minutes")
    p.add_argument("--timeout", type=float, default=420, help="seconds per launch")
    args = harness.parse(p, argv, hidden=64, ffn=128, heads=4, vocab=256, launch=[1, 2], bs=2, seq=64, steps=2,
                         warmup=2)
    if args.worker:
        worker(json.loads(args.worker))
        return

    out = harness.out_dir(args) / "bench_distributed"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").unlink(missing_ok=True)
    base = dict(shape=dataclasses.asdict(harness.shape_of(args)), attn=args.attn,
                hyclora=harness.hyclora_config(args).to_dict(), lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                lora_target_modules=args.lora_target_modules, every_k=args.every_k, seq=args.seq, steps=args.steps,
                warmup=args.warmup, out=str(out))
    deadline = time.time() + 60 * args.max_minutes
    rows = []
    for zero in args.zero:
        for ckpt in args.ckpt:
            for method in args.methods:
                for gpus in args.launch:
                    if time.time() > deadline:
                        print(f"[bench_distributed] --max_minutes reached; skipped gpus={gpus} zero={zero} "
                              f"{method} ckpt={ckpt} and later points", flush=True)
                        break
                    spec = dict(base, zero=zero, method=method, ckpt=ckpt, mbs=args.bs)
                    if not args.find_max:
                        rows.append(launch(spec, gpus, args.timeout))
                        continue
                    mbs, best = 1, None
                    while time.time() < deadline:
                        row = launch(dict(spec, mbs=mbs, steps=2, warmup=1), gpus, args.timeout)
                        if row.get("status") != "ok":
                            break
                        best, mbs = row, mbs * 2
                    rows.append(dict(best or row, status=(best and f"max mbs {best['mbs']}") or row.get("status")))
    print(write_tables(rows, out), flush=True)


if __name__ == "__main__":
    main()
