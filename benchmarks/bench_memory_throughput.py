"""Peak memory and tokens/s of one LoRA training step: PEFT LoRA vs hyclora, same process.

A random-weight Llama (Llama-2-7B shape by default, bf16 on a GPU) with PEFT LoRA r=16 on all
seven linears. One step = forward + backward (no optimizer). Per variant (PEFT LoRA, PEFT LoRA +
gradient checkpointing, hyclora at every --layer_types x --bits): peak memory above what was
allocated before the variant's first step (weights + LoRA), buffered activation bytes per decoder
layer counted by saved-tensor hooks, and the median tokens/s of --steps steps after --warmup steps
(which cover hyclora's calibration, so the timed steps run with frozen statistics). Every shape of
--shapes runs with --attn, those of --eager_shapes also with eager attention.

    python benchmarks/bench_memory_throughput.py                 # GPU, all variants
    python benchmarks/bench_memory_throughput.py --smoke         # CPU, tiny model, checks the script

Prints a markdown table and writes memory_throughput.csv under --out.
"""

from __future__ import annotations

import statistics

import torch

import harness


def variants(args):
    """``(name, hyclora config or None, gradient checkpointing)``: PEFT LoRA, PEFT LoRA + GC, then
    hyclora at every layer type x bits."""
    out = [("PEFT LoRA", None, False), ("PEFT LoRA + GC", None, True)]
    for layer_type, bits, hcfg in harness.sweep(args):
        out.append((f"hyclora {layer_type}" + ("" if layer_type == "baseline" else f" {bits}-bit"), hcfg, False))
    return out


def main(argv=None):
    p = harness.parser(__doc__, "model", "shapes", "steps", "lora", "sweep", "smoke", steps=4, warmup=6,
                       layer_types=["baseline", "intra", "intra_inter"], bits=[2, 4, 8])
    p.add_argument("--eager_shapes", action=harness.Items, item=harness.shape_item, default=[(4, 512)],
                   help="shapes also run with eager attention (when --attn is sdpa)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved rounds over the variants (drift hits every variant alike); tok/s = median "
                        "over rounds, min/max in the CSV")
    args = harness.parse(p, argv, shapes=[(2, 64)], eager_shapes=[(2, 64)], steps=1, warmup=1)
    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    env = harness.environment(device)
    runs = [(args.attn, s) for s in args.shapes]
    runs += [("eager", s) for s in args.eager_shapes if args.attn != "eager"]

    rows = []
    for attn, (bs, seq) in runs:
        shape = f"{bs}x{seq}"
        args.attn = attn
        model, cfg = harness.build_model(args, device, dtype)
        ids = torch.randint(0, cfg.vocab_size, (bs, seq), device=device)
        per_variant = {}
        for rnd in range(args.rounds):
            for name, hcfg, checkpointing in variants(args):
                r = harness.step_row(model, ids, device, name, hcfg, checkpointing, steps=args.steps, warmup=args.warmup)
                per_variant.setdefault(name, []).append(r)
                print(f"{attn:5s} {shape:8s} {name:28s} peak {r['peak_gib']:7.2f} GiB  {r['tok_s']:8.0f} tok/s  "
                      f"buffered/layer {r['buffered_layer_mib']:8.2f} MiB"
                      + (f"  (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""), flush=True)
        for name, results in per_variant.items():
            speeds = [x["tok_s"] for x in results]
            rows.append(dict(results[0], tok_s=statistics.median(speeds), tok_s_min=min(speeds), tok_s_max=max(speeds),
                             peak_gib=max(x["peak_gib"] for x in results), rounds=len(results), attn=attn, shape=shape,
                             gpu=env["device"]))
        del model
        harness.clear(device)

    print(f"\n{harness.env_line(env)}; LoRA r={args.lora_r}, median of {args.steps} steps after {args.warmup}\n")
    table = []
    for r in rows:
        base = next(b for b in rows if b["attn"] == r["attn"] and b["shape"] == r["shape"] and b["variant"] == "PEFT LoRA")
        less = base["peak_gib"] / r["peak_gib"] if r["peak_gib"] and r["peak_gib"] == r["peak_gib"] else harness.NAN
        speed = r["tok_s"] / base["tok_s"] if base["tok_s"] else harness.NAN
        table.append((r["attn"], r["shape"], r["variant"], f"{r['peak_gib']:.2f}", f"{less:.2f}", f"{r['tok_s']:.0f}",
                      f"{r['tok_s_min']:.0f}-{r['tok_s_max']:.0f}", f"{speed:.2f}", f"{r['buffered_layer_mib']:.2f}"))
    print("\n".join(harness.markdown_table(
        ["attn", "bs x seq", "variant", "peak GiB above weights", "x less than PEFT", "tok/s",
         "tok/s min-max over rounds", "x PEFT speed", "buffered MiB/layer"], table)))
    harness.write_csv(harness.out_dir(args) / "memory_throughput.csv", rows, env=env)
    return rows


if __name__ == "__main__":
    main()
