"""Where the time of one LoRA training step goes: PEFT LoRA vs hyclora, same process.

A random-weight Llama (Llama-2-7B shape by default, bf16 on a GPU; fewer layers with --layers),
PEFT LoRA r=16 on the seven linears, sdpa, bs 4 x 512. One step = forward + backward (no
optimizer). For PEFT LoRA and hyclora at each --q_bit (the hyclora arguments, default
``intra_inter_full_fuse``):

* tokens/s: median of --steps steps after --warmup steps (>= iteration_threshold + 1, so the
  timed steps run with frozen calibration statistics);
* one profiled step (torch.profiler): host (self CPU) time and device (self CUDA) time, the
  top ops by each, host->device syncs (cudaStreamSynchronize / cudaDeviceSynchronize /
  cudaEventSynchronize / DtoH memcpy) and ``aten::_local_scalar_dense`` (= ``.item()`` and
  friends: a sync on CUDA, also counted on the CPU), kernel launches;
* with --count_ops: dispatched aten ops (and kernel launches on CUDA) per decoder layer, from
  the difference between a (--count_layers + 1)- and a --count_layers-layer model;
* with --cprofile: one more step under cProfile (host Python time).

    python benchmarks/profile_step.py                                    # GPU: 7B shape, 32 layers
    python benchmarks/profile_step.py --layers 8 --count_ops             # quicker, + op counts
    python benchmarks/profile_step.py --device cpu --layers 2 --hidden 256 --bs 2 --seq 64  # smoke

Writes a markdown summary to profile_step.md under --out and prints it.
"""

from __future__ import annotations

import collections
import gc
import sys
import time

import torch

import harness

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP = 30  # ops listed per table
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def variants(args):
    return [("PEFT LoRA", None)] + [(f"hyclora {lt} {bits}-bit", hcfg) for lt, bits, hcfg in harness.sweep(args)]


def _step(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def _profile_step(model, ids, device: str):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    harness.sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        _step(model, ids)
        harness.sync(device)
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
    with harness.variant(model, hcfg):
        m = harness.measure(lambda: _step(model, ids), device, steps=args.steps, warmup=args.warmup,
                            tokens=ids.numel())
        res = {"tok_s": m["tok_s"]}
        res.update(_profile_step(model, ids, device))
        if args.cprofile:
            tag = "peft" if hcfg is None else f"{hcfg.layer_type}-{hcfg.q_bit}bit"
            harness.python_profile(lambda: _step(model, ids), harness.out_dir(args) / f"cprofile-{tag}.txt", device)
        return res


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
        model, cfg = harness.build_model(args, device, dtype, layers=layers)
        if hcfg is not None:
            apply_hyclora(model, hcfg)
        ids = torch.randint(0, cfg.vocab_size, (args.bs, args.seq), device=device)
        for _ in range(args.warmup):
            _step(model, ids)
        harness.sync(device)
        with _OpCounter() as counter:
            _step(model, ids)
        launches = 0
        if device == "cuda":
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                _step(model, ids)
                harness.sync(device)
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


def render(args, device: str, env, rows, counts) -> str:
    shape = harness.shape_of(args)
    lines = [f"# profile_step: {harness.env_line(env)}", "",
             f"Llama hidden {shape.hidden}, FFN {shape.ffn}, {shape.layers} layers, vocab {shape.vocab}, "
             f"LoRA r={args.lora_r} on {len(args.lora_target_modules)} linears, {args.attn}, bs {args.bs} x {args.seq}, "
             f"{str(harness.dtype_of(args, device)).replace('torch.', '')}; tokens/s = median of {args.steps} steps "
             f"after {args.warmup} warm-up steps; one profiled step (forward + backward, no optimizer).", "",
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
    p = harness.parser(__doc__, "model", "batch", "steps", "lora", "sweep", steps=5, warmup=6,
                       layer_types=["intra_inter_full_fuse"], bits=[2])
    p.add_argument("--count_ops", action="store_true", help="also count ops/launches per decoder layer")
    p.add_argument("--count_layers", type=int, default=2, help="--count_ops: the smaller model's layers")
    p.add_argument("--cprofile", action="store_true",
                   help="one more step per variant under cProfile (host Python time): cprofile-<variant>.txt under --out")
    return harness.parse(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    env = harness.environment(device)
    model, cfg = harness.build_model(args, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.bs, args.seq), device=device)
    rows = []
    for name, hcfg in variants(args):
        r = measure(model, hcfg, ids, args, device)
        rows.append((name, r))
        print(f"{name:40s} {r['tok_s']:9.0f} tok/s  host {r['cpu_ms']:8.1f} ms  device {r['dev_ms']:8.1f} ms  "
              f"syncs {r['syncs']}  item {r['item']}", flush=True)
    del model
    harness.clear(device)
    counts = []
    if args.count_ops:
        for name, hcfg in variants(args):
            counts.append((name, count_ops(args, device, dtype, hcfg)))
    text = render(args, device, env, rows, counts)
    harness.write_text(harness.out_dir(args) / "profile_step.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
