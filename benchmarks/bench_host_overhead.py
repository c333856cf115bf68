"""Host (Python) time of a hyclora training step, against PEFT LoRA in the same process.

On a GPU a full-size hyclora step is host-bound: the Python bodies of the block autograd
Functions (``hyclora/ops/blocks.py``) and the model adapter run longer than the kernels they
launch. This benchmark measures that Python on the CPU with a tiny Llama (hidden 64, seq 32 by
default), where every kernel is a few microseconds, so the wall time of a step is almost all
host time: the Python of the blocks, PEFT's / transformers' modules and the dispatcher.

For every variant (PEFT LoRA r=8 on all seven linears; hyclora ``intra_inter`` and
``intra_inter_full_fuse`` at 2 and 4 bits; others with --layer_types / --bits) one model of
--layers decoder layers and one of 2 x --layers are built (same seed). After --warmup steps
(> iteration_threshold = 5; recalibrate_every = 0: the calibration statistics are frozen, as in
the steady state of a long run) the variants are timed in interleaved rounds (less drift between
them); the table gives

* ms/step: median ms of one forward + backward (no optimizer) of the --layers model, by default
  CPU time of this process (``time.process_time``: with one torch thread it is the host time of
  the step and hardly moves when other processes share the cores; ``--clock wall`` for wall time);
* ms/layer: (median step of the 2L model - median step of the L model) / L, i.e. the cost of one
  decoder layer with the embedding, the head and the loss taken out;
* the same relative to PEFT LoRA.

    python benchmarks/bench_host_overhead.py                         # CPU, about a minute
    python benchmarks/bench_host_overhead.py --cprofile intra_inter_full_fuse:2   # + top functions
    python benchmarks/bench_host_overhead.py --digest                # + a hash of the gradients

``--cprofile VARIANT`` runs --profile_steps steps of that variant (L model) under cProfile and
prints the top functions by tottime and by cumtime. ``--digest`` prints a SHA-1 of every
gradient of one step per variant (to check that a host-side change left gradients bit-identical).
"""

from __future__ import annotations

import cProfile
import gc
import hashlib
import io
import pstats
import statistics
import time

import torch

import harness

from hyclora import apply_hyclora


def build_model(args, layers: int):
    return harness.build_model(args, "cpu", harness.dtype_of(args, "cpu"), b_std=0.02, layers=layers,
                               max_positions=max(256, args.seq))[0]


def variant_list(args):
    hyclora = [(f"{lt}:{bits}", hcfg) for lt, bits, hcfg in harness.sweep(args)]
    return [("peft", None)] + hyclora


def step(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


def grad_digest(model, ids) -> str:
    model.zero_grad(set_to_none=True)
    step(model, ids)
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        if p.grad is not None:
            h.update(name.encode())
            h.update(p.grad.detach().float().contiguous().numpy().tobytes())
    model.zero_grad(set_to_none=True)
    return h.hexdigest()[:16]


def parse(argv=None):
    p = harness.parser(__doc__.split("\n\n")[0], "model", "batch", "lora", "sweep", hidden=64, ffn=128, heads=4,
                       vocab=128, bs=1, seq=32, lora_r=8, dtype="fp32",
                       layer_types=["intra_inter", "intra_inter_full_fuse"], bits=[2, 4],
                       iteration_threshold=5, recalibrate_every=0)
    p.add_argument("--layers", type=int, default=2, help="L; a 2L model gives the per-layer time")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="host time: the CPU only")
    p.add_argument("--warmup", type=int, default=8, help="> iteration_threshold (5): frozen statistics")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: less noise)")
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                   help="cpu: time.process_time (robust to other load); wall: time.perf_counter")
    p.add_argument("--cprofile", default=None, metavar="VARIANT",
                   help="e.g. intra_inter_full_fuse:2 or peft: profile that variant's steps")
    p.add_argument("--profile_steps", type=int, default=50)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--digest", action="store_true", help="print a hash of each variant's gradients")
    return harness.parse(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    variants = variant_list(args)
    depths = (args.layers, 2 * args.layers)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, harness.shape_of(args).vocab, (args.bs, args.seq), generator=gen)

    models = {}
    for name, hcfg in variants:
        for depth in depths:
            model = build_model(args, depth)
            if hcfg is not None:
                apply_hyclora(model, hcfg)
            for _ in range(args.warmup):
                step(model, ids)
                model.zero_grad(set_to_none=True)
            models[name, depth] = model

    timer = harness.Timer("cpu", clock=time.process_time if args.clock == "cpu" else time.perf_counter)
    times = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            gc.collect()
            times[key] += timer.times(lambda: step(model, ids), args.steps,
                                      between=lambda: model.zero_grad(set_to_none=True))

    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    L = args.layers
    print(f"# bench_host_overhead: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    shape = harness.shape_of(args)
    print(f"Llama hidden {shape.hidden}, FFN {shape.ffn}, {shape.heads} heads, {args.attn}, {args.dtype}, "
          f"bs {args.bs} x {args.seq}, LoRA r={args.lora_r} on {len(args.lora_target_modules)} linears; median {args.clock} time of "
          f"{args.rounds} x {args.steps} steps after {args.warmup} warm-up steps\n")
    print(f"| variant | ms/step ({L} layers) | ms/step ({2 * L} layers) | ms/layer | layer vs PEFT |")
    print("|---|---|---|---|---|")
    per_layer = {name: (med[name, 2 * L] - med[name, L]) / L for name, _ in variants}
    for name, _ in variants:
        rel = per_layer[name] / per_layer["peft"]
        print(f"| {name} | {med[name, L]:.2f} | {med[name, 2 * L]:.2f} | {per_layer[name]:.3f} | {rel:.2f}x |")

    if args.digest:
        print()
        for name, _ in variants:
            print(f"grad digest {name}: {grad_digest(models[name, L], ids)}")

    if args.cprofile:
        model = models.get((args.cprofile, L))
        if model is None:
            raise SystemExit(f"--cprofile {args.cprofile!r}: not one of {[n for n, _ in variants]}")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.profile_steps):
            step(model, ids)
            model.zero_grad(set_to_none=True)
        prof.disable()
        for key in ("tottime", "cumtime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
            print(f"\n## cProfile {args.cprofile}, {args.profile_steps} steps, {L} layers, by {key}\n")
            print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
