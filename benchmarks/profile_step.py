"""Where the time of one LoRA training step goes: PEFT LoRA vs hyclora, same process (issue 4).

Llama-2-7B-shaped model by default (hidden 4096, FFN 11008, 32 heads, vocab 32000, random bf16
weights; fewer layers with --layers), PEFT LoRA r=16 alpha=16 on the seven linears, sdpa,
bs 4 x 512. One step = forward + backward (no optimizer), as in bench_memory_throughput.py.
For each variant:

* tokens/s: median of --steps steps after --warmup steps (>= iteration_threshold + 1, so the
  timed steps run with frozen calibration statistics);
* one profiled step (torch.profiler): host (self CPU) time and device (self CUDA) time, the
  top-20 ops by each, host->device syncs (cudaStreamSynchronize / cudaDeviceSynchronize /
  cudaEventSynchronize / DtoH memcpy) and ``aten::_local_scalar_dense`` (= ``.item()`` and
  friends: a sync on CUDA, also counted on the CPU), kernel launches;
* with --count-ops: dispatched aten ops (and kernel launches on CUDA) per decoder layer, from
  the difference between a (--count-layers + 1)- and a --count-layers-layer model.

    python benchmarks/profile_step.py                                    # H200: 7B shape, 32 layers
    python benchmarks/profile_step.py --layers 8 --count-ops             # quicker, + op counts
    python benchmarks/profile_step.py --device cpu --layers 2 --hidden 256 --bs 2 --seq 64  # smoke

Writes a markdown summary to $OUT/profile_step.md (or --out) and prints it.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import python_profile  # noqa: E402
from bench_memory_throughput import sync  # noqa: E402

from hyclora import HyCLoRAConfig  # noqa: E402
from hyclora.demo import build_lora_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP = 30  # ops listed per table
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def build_model(args, layers: int, device: str, dtype):
    """Llama of the requested widths (bench_memory_throughput.build_model has fixed shapes)."""
    heads = args.heads or max(1, args.hidden // 128)
    return build_lora_llama(args.hidden, layers, heads, heads, args.ffn, args.vocab, args.attn, rank=args.rank,
                            b_std=0.01, dtype=dtype, device=device, max_positions=max(4096, args.seq))[0]


def variants(args):
    out = [("PEFT LoRA", None)]
    for bits in args.bits:
        out.append((f"hyclora {args.layer_type} {bits}-bit",
                    HyCLoRAConfig(layer_type=args.layer_type, q_bit=bits, kernel_backend=args.backend)))
    return out


def _step(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def _profile_step(model, ids, device: str):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        _step(model, ids)
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    cpu_us = sum(e.self_cpu_time_total for e in events)
    dev_us = sum(getattr(e, dev_attr, 0) or 0 for e in events) if device == "cuda" else 0.0
    by_name = {e.key: e for e in events}

    def count(names):
        return sum(by_name[n].count for n in names if n in by_name)

    dtoh = sum(e.count for e in events if "Memcpy DtoH" in e.key or "memcpy DtoH" in e.key.lower())
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    top_dev = (sorted(events, key=lambda e: getattr(e, dev_attr, 0) or 0, reverse=True)[:TOP]
               if device == "cuda" else [])
    aten_calls = sum(e.count for e in events if e.key.startswith("aten::"))
    return {
        "wall_ms": wall * 1e3, "cpu_ms": cpu_us / 1e3, "dev_ms": dev_us / 1e3,
        "syncs": count(SYNC_EVENTS), "dtoh": dtoh, "item": count(("aten::_local_scalar_dense",)),
        "launches": count(LAUNCH_EVENTS), "aten_calls": aten_calls,
        "top_cpu": [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in top_cpu],
        "top_dev": [(e.key, e.count, (getattr(e, dev_attr, 0) or 0) / 1e3) for e in top_dev],
    }


def measure(model, hcfg, ids, args, device: str):
    from hyclora import apply_hyclora, revert_hyclora

    if hcfg is not None:
        apply_hyclora(model, hcfg)
    try:
        for _ in range(args.warmup):
            _step(model, ids)
        times = []
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            _step(model, ids)
            sync(device)
            times.append(time.perf_counter() - t0)
        res = {"tok_s": ids.numel() / statistics.median(times)}
        res.update(_profile_step(model, ids, device))
        if args.cprofile:
            tag = "peft" if hcfg is None else f"{hcfg.layer_type}-{hcfg.q_bit}bit"
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            python_profile(lambda: _step(model, ids), out / f"cprofile-{tag}.txt", lambda: sync(device))
        return res
    finally:
        if hcfg is not None:
            revert_hyclora(model)
        model.zero_grad(set_to_none=True)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every aten op that reaches the kernels (after autograd and decompositions)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# aten ops that only make a new view / alias (no kernel on any device)
VIEW_OPS = frozenset({"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice",
                      "select", "alias", "detach", "as_strided", "permute", "reshape", "_reshape_alias",
                      "lift_fresh", "split", "unbind", "view_as", "split_with_sizes", "chunk", "narrow"})


def count_ops(args, device: str, dtype, hcfg):
    """Per-decoder-layer (ops, non-view ops, kernel launches) of one forward+backward step."""
    from torch.profiler import ProfilerActivity, profile

    from hyclora import apply_hyclora

    totals = []
    for layers in (args.count_layers, args.count_layers + 1):
        model = build_model(args, layers, device, dtype)
        if hcfg is not None:
            apply_hyclora(model, hcfg)
        ids = torch.randint(0, args.vocab, (args.bs, args.seq), device=device)
        for _ in range(args.warmup):
            _step(model, ids)
        sync(device)
        with _OpCounter() as counter:
            _step(model, ids)
        launches = 0
        if device == "cuda":
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                _step(model, ids)
                sync(device)
            launches = sum(e.count for e in prof.key_averages() if e.key in LAUNCH_EVENTS)
        totals.append((counter.ops, launches))
        del model
        gc.collect()
    (ops_a, l_a), (ops_b, l_b) = totals
    diff = ops_b.copy()
    diff.subtract(ops_a)
    diff = collections.Counter({k: v for k, v in diff.items() if v})
    real = sum(v for k, v in diff.items() if k not in VIEW_OPS)
    return {"ops": sum(diff.values()), "kernel_ops": real, "launches": l_b - l_a,
            "item": diff.get("_local_scalar_dense", 0),
            "top": [(k, v) for k, v in diff.most_common() if k not in VIEW_OPS][:25]}


def render(args, device: str, rows, counts) -> str:
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"# profile_step: {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", "",
             f"Llama hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, vocab {args.vocab}, "
             f"LoRA r={args.rank} on {len(TARGETS)} linears, {args.attn}, bs {args.bs} x {args.seq}, "
             f"{args.dtype}; tokens/s = median of {args.steps} steps after {args.warmup} warm-up steps; "
             "one profiled step (forward + backward, no optimizer).", "",
             "| variant | tok/s | x PEFT | wall ms (profiled) | host ms (self CPU) | device ms (self CUDA) | "
             "syncs | DtoH copies | `_local_scalar_dense` | kernel launches | aten events (nested included) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    peft = rows[0][1]["tok_s"]
    for name, r in rows:
        lines.append(f"| {name} | {r['tok_s']:.0f} | {r['tok_s'] / peft:.2f} | {r['wall_ms']:.1f} | "
                     f"{r['cpu_ms']:.1f} | {r['dev_ms']:.1f} | {r['syncs']} | {r['dtoh']} | {r['item']} | "
                     f"{r['launches']} | {r['aten_calls']} |")
    lines.append("")
    lines.append("Host time includes time spent blocked in syncs; a step is host-bound when host ms "
                 "exceeds device ms.")
    for name, r in rows:
        lines += ["", f"## {name}: top {TOP} by self CPU", "", "| op | calls | self CPU ms |", "|---|---|---|"]
        lines += [f"| `{k}` | {c} | {t:.2f} |" for k, c, t in r["top_cpu"]]
        if r["top_dev"]:
            lines += ["", f"## {name}: top {TOP} by self CUDA", "", "| op | calls | self CUDA ms |", "|---|---|---|"]
            lines += [f"| `{k[:90]}` | {c} | {t:.2f} |" for k, c, t in r["top_dev"]]
    if counts:
        lines += ["", f"## ops per decoder layer (forward + backward; {args.count_layers + 1} minus "
                      f"{args.count_layers} layers, same widths)", "",
                  "| variant | aten ops | of which kernels (not views) | kernel launches (CUDA) | "
                  "`_local_scalar_dense` |", "|---|---|---|---|---|"]
        for name, c in counts:
            lines.append(f"| {name} | {c['ops']} | {c['kernel_ops']} | {c['launches'] if device == 'cuda' else 'n/a'} | "
                         f"{c['item']} |")
        for name, c in counts:
            lines += ["", f"{name}, most frequent kernel ops per layer: "
                      + ", ".join(f"`{k}` {v}" for k, v in c["top"])]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=None, help="default 11008 at hidden 4096, else 2.6875 x hidden")
    ap.add_argument("--heads", type=int, default=None, help="default hidden / 128")
    ap.add_argument("--vocab", type=int, default=None, help="default 32000 (512 when hidden < 1024)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--layer-type", dest="layer_type", default="intra_inter_full_fuse")
    ap.add_argument("--bits", type=int, nargs="+", default=[2])
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=6, help=">= iteration_threshold + 1 (calibration)")
    ap.add_argument("--count-ops", dest="count_ops", action="store_true",
                    help="also count ops/launches per decoder layer")
    ap.add_argument("--cprofile", action="store_true",
                    help="one more step per variant under cProfile (host Python time): $OUT/cprofile-<variant>.txt")
    ap.add_argument("--count-layers", dest="count_layers", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT") or "out")
    args = ap.parse_args(argv)
    if args.ffn is None:
        args.ffn = 11008 if args.hidden == 4096 else int(round(args.hidden * 2.6875))
    if args.vocab is None:
        args.vocab = 32000 if args.hidden >= 1024 else 512
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; pass --device cpu for the smoke run")
    args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(args, args.layers, device, dtype)
    ids = torch.randint(0, args.vocab, (args.bs, args.seq), device=device)
    rows = []
    for name, hcfg in variants(args):
        r = measure(model, hcfg, ids, args, device)
        rows.append((name, r))
        print(f"{name:40s} {r['tok_s']:9.0f} tok/s  host {r['cpu_ms']:8.1f} ms  device {r['dev_ms']:8.1f} ms  "
              f"syncs {r['syncs']}  item {r['item']}", flush=True)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    counts = []
    if args.count_ops:
        for name, hcfg in variants(args):
            counts.append((name, count_ops(args, device, dtype, hcfg)))
    text = render(args, device, rows, counts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.md").write_text(text)
    print(text)
    print(f"wrote {out / 'profile_step.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
