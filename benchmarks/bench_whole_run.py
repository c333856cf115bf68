"""A whole training run as a user gets it: tokens/s averaged over every step (calibration, capture,
recalibration included) and the peak over the run, beside the steady state.

A random-weight Llama (Llama-2-7B shape by default, bf16), PEFT LoRA r=16 on all seven linears,
sdpa, AdamW on the LoRA parameters (fused on CUDA, the HF Trainer's default), --steps steps of
random tokens per --shapes entry. Each variant runs in its own process (a fresh allocator, so its
peak is its own):

* ``peft``: PEFT LoRA;
* ``graphed``: hyclora with the library defaults (``intra_inter_full_fuse`` 2-bit unless the
  hyclora arguments say otherwise, ``recalibrate_every=50``, ``recalibrate_mode="refresh"``, the
  chunked LM loss) and ``graph_decoder_layers``;
* ``graphed_reset``: the same with ``recalibrate_mode="reset"`` (release, eager calibration,
  re-capture every 50 steps);
* ``graphed_frozen``: the same with ``recalibrate_every=0`` (the steady state, no renewal);
* ``graphed_warm_all``: ``graphed`` warming up every layer before the capture
  (``warm_up_layers="all"``) instead of the first layer of each kind (the default);
* ``graphed_model_loss``: ``graphed`` with the model's own LM loss (``lm_loss="model"``: full
  logits) instead of the default chunked loss;
* ``eager``: hyclora defaults without graphs.

Reported per variant: mean tok/s over all steps ("run mean"), over steps --from_step.. (the
issue's "steps 8-70" style), the median step ("steady state"), the first step's seconds, and the
peak allocated over the whole run above the weights + LoRA + optimizer state at the start; beside
it the same peak with, for each step after a capture, the memory the graphs' pool holds off the
allocated count (their saved activations and scratch: ``hyclora.memory.graph_pool_free_bytes``).

    python benchmarks/bench_whole_run.py --shapes 4x512 --steps 200
    python benchmarks/bench_whole_run.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import harness

VARIANTS = ("peft", "graphed", "graphed_reset", "graphed_frozen", "graphed_warm_all", "graphed_model_loss", "eager")


def _config(args, variant):
    overrides = {}
    if variant == "graphed_reset":
        overrides["recalibrate_mode"] = "reset"
    elif variant == "graphed_frozen":
        overrides["recalibrate_every"] = 0
    elif variant == "graphed_model_loss":
        overrides["lm_loss"] = "model"
    return harness.hyclora_config(args, **overrides)


def run_variant(args, variant, bs, seq):
    from hyclora import apply_hyclora
    from hyclora.memory import graph_pool_free_bytes

    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    model, cfg = harness.build_model(args, device, dtype, b_std=None)
    graphs = None
    if variant != "peft":
        apply_hyclora(model, _config(args, variant))
        if variant.startswith("graphed"):
            if device != "cuda":
                return dict(variant=variant, shape=f"{bs}x{seq}", note="skipped: CUDA graphs need a CUDA device")
            from hyclora.cuda_graphs import graph_decoder_layers

            warm_up = dict(warm_up_layers="all") if variant == "graphed_warm_all" else {}  # else the default
            graphs = graph_decoder_layers(model, sample_shape=(bs, seq), **warm_up)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")  # the HF Trainer's default AdamW
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (bs, seq), device=device, generator=gen) for _ in range(4)]
    # the optimizer state exists from the first step on: allocate it before the baseline
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    harness.clear(device)
    harness.reset_peak(device)
    start = harness.allocated(device)
    times = []
    profiler = None
    if args.profile_steps:  # where the first steps' host time goes (calibration, capture, kernel loading)
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    trace = None
    cuda = device == "cuda"
    peaks = []  # per step: the peak (GiB above start) in its forward, backward and optimizer step
    # per step: what graph pools held off the allocated count during it (their saved activations)
    pool_free, pools, reserved = 0, [], None
    for step in range(args.steps):
        if args.memory_trace_steps and cuda and step == args.memory_trace_from:
            trace = harness.MemoryTrace()
        if profiler is not None and step == args.profile_steps:
            profiler.disable()
            _print_profile(profiler, variant, args.profile_steps)
            profiler = None
        if trace is not None and step == args.memory_trace_steps:
            print(f"MEMORY {variant}, steps {args.memory_trace_from}..{step - 1}\n{trace.report()}", file=sys.stderr,
                  flush=True)
            trace = None
        ids = batches[step % len(batches)]
        timeline = None
        if step in args.torch_profile_steps:  # host and device time of this step by op (cudaGraphInstantiate, ...)
            timeline = torch.profiler.profile(activities=_activities(device))
            timeline.__enter__()
        t0 = time.perf_counter()
        phase = []  # allocator statistics only: no device sync between the phases
        if trace is not None:
            trace.mark(f"step {step} forward")
        loss = model(input_ids=ids, labels=ids).loss
        phase.append(harness.max_allocated(device))
        harness.reset_peak(device)
        if trace is not None:
            trace.mark(f"step {step} backward")
        loss.backward()
        loss = loss.detach()  # a loss still holding its graph would make the next capture fail
        phase.append(harness.max_allocated(device))
        harness.reset_peak(device)
        if trace is not None:
            trace.mark(f"step {step} optimizer")
        opt.step()
        opt.zero_grad(set_to_none=True)
        phase.append(harness.max_allocated(device))
        harness.reset_peak(device)
        harness.sync(device)
        times.append(time.perf_counter() - t0)
        if timeline is not None:
            timeline.__exit__(None, None, None)
            print(f"TORCH PROFILE {variant}, step {step} ({times[-1]:.3f} s unprofiled work included)\n"
                  + timeline.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60),
                  file=sys.stderr, flush=True)
        peaks.append([(b - start) / harness.GIB for b in phase])
        pools.append(pool_free / harness.GIB)
        if cuda and torch.cuda.memory_reserved() != reserved:  # a capture or a release changes the pools
            reserved, pool_free = torch.cuda.memory_reserved(), graph_pool_free_bytes()
    if trace is not None:
        print(f"MEMORY {variant}, steps {args.memory_trace_from}..{args.steps - 1}\n{trace.report()}", file=sys.stderr,
              flush=True)
    tokens = bs * seq
    late = times[args.from_step:] or times
    out = dict(variant=variant, shape=f"{bs}x{seq}", steps=args.steps,
               run_tok_s=tokens * len(times) / sum(times),
               late_tok_s=tokens * len(late) / sum(late),
               steady_tok_s=tokens / statistics.median(times),
               first_step_s=times[0], first_steps_s=[round(t, 3) for t in times[:10]],
               peak_gib=max(max(p) for p in peaks) if cuda else harness.NAN,
               peak_step=max(range(len(peaks)), key=lambda i: max(peaks[i])) if cuda else None,
               peak_with_pool_gib=max(max(p) + f for p, f in zip(peaks, pools)) if cuda else harness.NAN,
               graph_pool_free_gib=round(pools[-1], 3) if cuda else None,
               # forward / backward / optimizer peaks of the first steps and of the median-time step
               step_peaks_gib=[[round(b, 3) for b in p] for p in peaks[:4]] if cuda else None,
               steady_peaks_gib=[round(b, 3) for b in peaks[times.index(statistics.median_low(times))]] if cuda else None,
               loss=float(loss.detach()), note="")
    if graphs is not None:
        out["note"] = graphs.summary()
    return out


def _activities(device):
    cpu = [torch.profiler.ProfilerActivity.CPU]
    return cpu + [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else cpu


def _print_profile(profiler, variant, steps):
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    print(f"PROFILE {variant}, first {steps} steps (stderr)", flush=True)
    print(text.getvalue(), file=sys.stderr, flush=True)


def main(argv=None):
    p = harness.parser(__doc__, "model", "shapes", "lora", "hyclora", "smoke", layer_type="intra_inter_full_fuse",
                       q_bit=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--from_step", type=int, default=8, help="first step of the 'late' mean")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--profile_steps", type=int, default=0,
                   help="cProfile the first N steps of each variant (printed to the child's stderr)")
    p.add_argument("--torch_profile_steps", type=int, nargs="*", default=[],
                   help="torch.profiler tables (ops by host time) of these steps, e.g. 0 1 (the first step and the "
                        "capture), to the child's stderr (with --profile_steps' file)")
    p.add_argument("--memory_trace_steps", type=int, default=0,
                   help="record CUDA allocations up to step N and print the live ones at their peak "
                        "(to the child's stderr, with --profile_steps' file)")
    p.add_argument("--memory_trace_from", type=int, default=0,
                   help="the step the recording starts at (e.g. 3: a steady graphed step, past calibration "
                        "and capture)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # a child process: one variant
    args = harness.parse(p, argv, shapes=[(2, 32)], steps=6, from_step=2)
    if args.variant:  # a child: one variant, one shape; its result as JSON on the last line
        bs, seq = args.shapes[0]
        print("RESULT " + json.dumps(run_variant(args, args.variant, bs, seq)), flush=True)
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    rows = []
    for bs, seq in args.shapes:
        for variant in args.variants:
            child = [sys.executable, os.path.abspath(__file__), *argv, "--shapes", f"{bs}x{seq}", "--variant", variant]
            proc = subprocess.run(child, capture_output=True, text=True)
            if args.profile_steps or args.memory_trace_steps or args.torch_profile_steps:
                (harness.out_dir(args) / f"profile_{bs}x{seq}_{variant}.txt").write_text(proc.stderr)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                row = dict(variant=variant, shape=f"{bs}x{seq}", note=f"FAILED: {proc.stderr[-300:]}")
            else:
                row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            print(f"{row.get('shape')} {variant:15s} run {row.get('run_tok_s', harness.NAN):8.0f} tok/s  "
                  f"steady {row.get('steady_tok_s', harness.NAN):8.0f}  peak {row.get('peak_gib', harness.NAN):6.2f} GiB  "
                  f"first steps s {row.get('first_steps_s')}  peak at step {row.get('peak_step')}, "
                  f"fwd/bwd/opt peaks of steps 1-4 {row.get('step_peaks_gib')}, steady {row.get('steady_peaks_gib')}  "
                  f"{row.get('note', '')}", flush=True)
    env = harness.environment(harness.device_of(args))
    table = []
    for r in rows:
        peft = next((x for x in rows if x.get("shape") == r.get("shape") and x["variant"] == "peft"), {})
        ratio = lambda key: r.get(key, harness.NAN) / peft.get(key, harness.NAN) if peft else harness.NAN  # noqa: E731
        table.append((r.get("shape"), r["variant"], f"{r.get('run_tok_s', harness.NAN):.0f}", f"{ratio('run_tok_s'):.2f}",
                      f"{r.get('late_tok_s', harness.NAN):.0f}", f"{r.get('steady_tok_s', harness.NAN):.0f}",
                      f"{r.get('run_tok_s', harness.NAN) / r.get('steady_tok_s', harness.NAN):.2f}",
                      f"{r.get('first_step_s', harness.NAN):.1f}", f"{r.get('peak_gib', harness.NAN):.2f}",
                      f"{peft.get('peak_gib', harness.NAN) / r.get('peak_gib', harness.NAN):.1f}" if peft else "nan",
                      f"{r.get('peak_with_pool_gib', harness.NAN):.2f}",
                      f"{peft.get('peak_gib', harness.NAN) / r.get('peak_with_pool_gib', harness.NAN):.1f}"
                      if peft else "nan",
                      r.get("note", "")[:160]))
    print(f"\n{harness.env_line(env)}; Llama hidden {harness.shape_of(args).hidden}, LoRA r={args.lora_r}, "
          f"{args.attn}, AdamW, {args.steps} steps per variant, one process each")
    print("\n".join(harness.markdown_table(
        ["bs x seq", "variant", "run mean tok/s", "x PEFT (run)", f"mean from step {args.from_step}",
         "steady (median) tok/s", "run / steady", "first step s", "peak GiB above start", "x less than PEFT",
         "peak with graph pool GiB", "x less (with pool)", "note"], table)))
    harness.write_csv(harness.out_dir(args) / "whole_run.csv", rows, env=env)
    return rows


if __name__ == "__main__":
    main()
