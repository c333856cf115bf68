"""Long-context LoRA fine-tuning on one GPU: tokens/s, peak memory and the longest context that fits.

A random-weight Llama (Llama-2-7B shape by default, bf16 on a GPU), batch 1, LongLoRA's recipe:
LoRA r=16 (alpha 16) on the seven linears plus trainable input embeddings and norms (PEFT
``modules_to_save``). LoRA, embeddings and norms stay in the model's dtype (no fp32 masters, no
optimizer: one step is forward + backward). The loss is the LM head's cross-entropy in chunks
(hyclora.ops.chunked_ce through CausalLMChunkedLoss) for every method, so no method pays for
``seq x vocab`` logits.

Methods (``--methods``):

* ``peft_gc``: PEFT LoRA + HF gradient checkpointing (non-reentrant), full causal attention (sdpa).
* ``peft_s2_gc``: the same with S²-Attn: LongLoRA itself, for reference.
* ``hyclora_s2``: hyclora (the hyclora arguments: ``--layer_type``, default ``intra_inter``,
  ``--q_bit``, default 2, ``iteration_threshold`` 1) + S²-Attn, no checkpointing.
* ``hyclora_s2_graphed``: hyclora + S²-Attn with CUDA graphs of the decoder layers
  (``hyclora.cuda_graphs``; CUDA only; the first warm-up step calibrates, the second captures,
  so use ``--warmup 2`` or more): the host-bound shorter contexts without checkpointing.
* ``hyclora_s2_gc``: hyclora + S²-Attn + gradient checkpointing. ``--gc_boundary_bits 8`` (or 4) keeps
  the checkpointed layer inputs quantised (per-channel ranges + 1% exact outlier channels), like
  hyclora keeps ``x_in``, instead of exactly: at 7B/32k the exact bf16 boundaries alone are
  32 x 32k x 4096 x 2 B = 8 GiB (hyclora.integrations.checkpointing.compressed_checkpoint).
* ``liger_gc``: Liger kernels (RoPE, SwiGLU, RMSNorm) + gradient checkpointing, only when
  ``liger_kernel`` imports (else a row says why it was skipped). Liger patches transformers'
  Llama functions process-wide, so it always runs last.

For each method: every context of ``--contexts`` (8k, 16k, 32k), then (``--search``) the longest
context that fits: doubling from the largest fitting context, then bisection in steps of
``--search_step`` (4k) between the last fit and the first OOM, up to ``--max_context``. A point
runs ``--warmup`` + ``--steps`` steps; peak memory is ``max_memory_allocated`` over the timed
steps minus what is allocated before them (weights, LoRA, trainable copies). OOM is caught and
reported as OOM. hyclora's statistics calibrate in the single warm-up step (one step of 8k+ tokens
is plenty), so the timed steps run frozen, as in steady training. A search probe runs one step
(warm-up included): "fits" means one training step completes.

The whole run stops starting new points after ``--time_budget`` seconds (points not run are listed
as skipped), so it fits one device call:

    python benchmarks/bench_longseq.py --time_budget 400             # GPU
    python benchmarks/bench_longseq.py --smoke                       # CPU, tiny model, checks the script
    python benchmarks/bench_longseq.py --smoke --hidden 256 --ffn 688 --layers 4 --vocab 2048 \\
        --contexts 1024 --search false --live_peak                   # CPU scale model, live-tensor peak

Writes ``longseq.md`` (tables) and ``longseq.csv`` / ``longseq_search.csv`` under --out.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# Fewer OOMs from fragmentation when contexts of very different lengths share one process.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

import harness  # noqa: E402

METHODS = ("peft_gc", "peft_s2_gc", "hyclora_s2", "hyclora_s2_graphed", "hyclora_s2_gc", "liger_gc")


# -- search (pure: unit-tested with a fake probe) -------------------------------------------------
def search_longest(
    fits: Callable[[int], Optional[bool]],
    start: int,
    step: int,
    max_context: int,
    known_fit: int = 0,
    known_oom: Optional[int] = None,
) -> Tuple[int, Optional[int], List[Tuple[int, str]], bool]:
    """Longest multiple of ``step`` for which ``fits(ctx)`` is True.

    Doubles from ``start`` until a probe fails (or ``max_context``), then bisects in multiples of
    ``step`` between the last fit and the first failure. ``fits`` returns None when the time
    budget is spent: the search stops there. ``known_fit`` / ``known_oom`` are results already
    measured (e.g. at the fixed contexts). Returns ``(longest_fit, first_oom, probes, complete)``:
    ``longest_fit`` 0 if nothing fitted, ``first_oom`` None if ``max_context`` fitted,
    ``complete`` False when the budget ended the search before it converged.
    """
    if step < 1 or start < step or max_context < step:
        raise ValueError(f"search needs 1 <= step <= start and step <= max_context; got {step}, {start}, {max_context}")
    probes: List[Tuple[int, str]] = []
    lo, hi = known_fit, known_oom

    def probe(ctx: int) -> Optional[bool]:
        ok = fits(ctx)
        probes.append((ctx, "budget" if ok is None else "fit" if ok else "oom"))
        return ok

    cap = (max_context // step) * step
    ctx = min((max(start, lo * 2 if lo else start) // step) * step, cap)
    while hi is None and lo < cap:
        ok = probe(ctx)
        if ok is None:
            return lo, hi, probes, False
        if ok:
            lo = ctx
            ctx = min(ctx * 2, cap)
        else:
            hi = ctx
    while hi is not None and hi - lo > step:
        mid = lo + ((hi - lo) // (2 * step)) * step
        mid = max(mid, lo + step)
        ok = probe(mid)
        if ok is None:
            return lo, hi, probes, False
        if ok:
            lo = mid
        else:
            hi = mid
    return lo, hi, probes, True


# -- model and methods ------------------------------------------------------------------------------
def build_model(args, device, dtype):
    """The harness model with LongLoRA's LoRA (``modules_to_save``: embeddings and norms), adapters
    in the model's dtype."""
    from hyclora.integrations.longseq import longlora_lora_config

    return harness.build_model(
        args, device, dtype, use_cache=False,
        lora_config=lambda model: longlora_lora_config(r=args.lora_r, lora_alpha=args.lora_alpha or args.lora_r,
                                                       target_modules=args.lora_target_modules, model=model),
        peft_kwargs=dict(autocast_adapter_dtype=False))


class Method:
    """Switch a method's features on a shared model, and off again."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.hyclora = name.startswith("hyclora")
        self.s2 = "_s2" in name
        self.gc = name.endswith("_gc")
        self.graphed = name.endswith("_graphed")
        self.graphs = None
        self.liger = name.startswith("liger")

    def available(self) -> Optional[str]:
        """None if it can run here, else the reason it cannot."""
        if self.graphed and not torch.cuda.is_available():
            return "CUDA graphs need a CUDA device"
        if self.liger:
            try:
                import liger_kernel.transformers  # noqa: F401
            except Exception as exc:  # ImportError, or a CUDA/Triton check failing at import
                return f"liger_kernel does not import ({type(exc).__name__}: {exc})"
        return None

    def on(self, model):
        from hyclora import apply_hyclora
        from hyclora.compat import checkpointing_enable
        from hyclora.integrations.longseq import enable_s2attn

        inner = model.get_base_model()
        if self.liger:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False, model=inner)
        if self.gc:
            checkpointing_enable(inner, use_reentrant=False)
        bits = self.args.gc_boundary_bits
        if self.gc and self.hyclora and bits:
            from hyclora.integrations.checkpointing import enable_activation_checkpointing

            # hyclora's GC keeps the layer inputs like hyclora keeps x_in: quantised (+ exact outlier channels)
            enable_activation_checkpointing(model, backend="torch", boundary_bits=bits)
        if self.hyclora:
            apply_hyclora(model, harness.hyclora_config(self.args))
        if self.s2:
            enable_s2attn(model, group_ratio=self.args.group_ratio)
        if self.graphed:
            from hyclora.cuda_graphs import graph_decoder_layers

            self.graphs = graph_decoder_layers(model)

    def off(self, model):
        from hyclora import revert_hyclora
        from hyclora.compat import checkpointing_disable
        from hyclora.integrations.longseq import disable_s2attn, s2attn_enabled

        inner = model.get_base_model()
        if self.graphs is not None:
            print(f"{self.name}: {self.graphs.summary()}", flush=True)
            self.graphs.remove()
            self.graphs = None
        if self.s2 and s2attn_enabled(model):
            disable_s2attn(model)
        if self.hyclora:
            revert_hyclora(model)
        if self.gc:
            checkpointing_disable(inner)


def point_seconds(row: Dict, wall: float, steps_per_point: int) -> float:
    """What a point costs, for estimating the next: its timed step times the steps of a point, not
    its wall time, when it has one (the first point's warm-up includes Triton compilation and
    autotuning, minutes, which would make every later point look over budget)."""
    step_s = row.get("step_s", float("nan"))
    return step_s * steps_per_point if step_s == step_s else wall


def estimated_seconds(last: Optional[Tuple[int, float]], ctx: int, n_steps: int, steps_per_point: int) -> float:
    """Rough cost of ``n_steps`` steps at ``ctx`` from the last point ``(context, seconds)``: time
    grows a bit faster than linearly in the context. 0 without a last point."""
    if last is None:
        return 0.0
    return last[1] * (ctx / last[0]) ** 1.5 * n_steps / max(1, steps_per_point)


def run_point(model, loss_fn, method: Method, ctx: int, device: str, warmup: int, steps: int, vocab: int,
              live_peak: bool = False, report_to: Optional[Path] = None,
              profile_to: Optional[Path] = None, cprofile_to: Optional[Path] = None) -> Dict:
    """One (method, context) point: ``status`` ok / OOM / error, tokens/s and peak GiB above static."""
    row: Dict = {"method": method.name, "context": ctx, "status": "ok", "tokens_per_s": float("nan"),
                 "step_s": float("nan"), "peak_gib_above_static": float("nan"), "static_gib": float("nan")}
    ids = None
    try:
        method.on(model)
        ids = torch.randint(0, vocab, (1, ctx), device=device, generator=torch.Generator(device=device).manual_seed(ctx))
        losses = []

        def step():
            loss = loss_fn(ids)
            loss.backward()
            model.zero_grad(set_to_none=True)
            # detached: the previous step's graph (and any leaf .grad it reaches) must not stay
            # alive through the next step's peak
            losses[:] = [loss.detach()]

        with contextlib.ExitStack() as tracking:
            live = {}

            def before_timing():
                harness.clear(device)
                if live_peak and steps:
                    from hyclora.memory import track_live_tensors

                    # peak of live tensor bytes (hyclora.memory), per decoder layer and phase; on CUDA
                    # this slows the step (a Python dispatch mode) and adds no number: the breakdown is the point
                    live["report"] = tracking.enter_context(track_live_tensors(model, snapshot=report_to is not None))

            m = harness.measure(step, device, steps=steps, warmup=warmup, tokens=ctx, before_timing=before_timing)
        if profile_to is not None and steps:
            harness.write_text(profile_to, harness.torch_profile_table(step, device) + "\n")
        if cprofile_to is not None and steps:
            harness.python_profile(step, cprofile_to, device)
        if live:
            if report_to is not None:
                text = live["report"].report.summary(20)
                harness.write_text(report_to, text + "\n")
                print(text, flush=True)
            if device != "cuda":
                row["peak_gib_above_static"] = live["report"].report.peak_bytes / harness.GIB
        if losses and not torch.isfinite(losses[0]).all():
            raise FloatingPointError(f"non-finite loss {float(losses[0])}")
        if steps:
            row["step_s"], row["tokens_per_s"] = m["step_s"], m["tok_s"]
        if device == "cuda" and steps:
            static = m["timed_start"]
            if method.graphed:
                # the graphs' memory (static outputs, gradient buffers, the pool) stays allocated
                # between steps: it belongs to the method, so the baseline is before the capture
                row["graph_resident_gib"] = (static - m["start"]) / harness.GIB
                static = m["start"]
            row["peak_gib_above_static"] = (m["peak"] - static) / harness.GIB
            row["static_gib"] = static / harness.GIB
    except Exception as exc:  # one failing point must not lose the others
        if harness.is_oom(exc):
            row["status"] = "OOM"
        else:
            row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            print(f"{method.name} @ {ctx}: {row['status']}", flush=True)
            traceback.print_exc()
    finally:
        ids = None  # noqa: F841 (drop the reference before freeing memory)
        model.zero_grad(set_to_none=True)
        method.off(model)
        harness.clear(device)
    return row


# -- main -------------------------------------------------------------------------------------------
def build_parser() -> harness.Parser:
    p = harness.parser(__doc__, "model", "steps", "lora", "hyclora", "smoke", steps=1, warmup=1, q_bit=2,
                       iteration_threshold=1)
    p.add_argument("--methods", action=harness.Items, choices=METHODS, default=list(METHODS),
                   help="comma-separated, from " + ", ".join(METHODS))
    p.add_argument("--contexts", action=harness.Items, item=int, default=[8192, 16384, 32768],
                   help="contexts of the table, comma-separated")
    p.add_argument("--search", type=harness.flag, default=True, help="then search the longest context that fits")
    p.add_argument("--search_step", type=int, default=4096)
    p.add_argument("--max_context", type=int, default=262144)
    p.add_argument("--gc_boundary_bits", type=int, default=0, choices=[0, 2, 4, 8],
                   help="hyclora *_gc methods: keep the checkpointed layer inputs at this many bits "
                        "(+1%% exact outlier channels) instead of exactly; 0 = exact (plain HF checkpointing)")
    p.add_argument("--live_peak", action="store_true",
                   help="track live tensors in the timed steps (hyclora.memory.track_live_tensors) and write "
                        "what is alive at their peak, by layer and phase, to live-peak-<method>-<context>.txt "
                        "under --out; on the CPU that peak is also the table's 'peak above static'")
    p.add_argument("--cprofile", action="store_true",
                   help="after the timed steps, one more step under cProfile (host Python time): cprofile-<method>-<ctx>.txt")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, one more step under torch.profiler: profile-<method>-<ctx>.txt")
    p.add_argument("--ce_chunk", type=int, default=0, help="tokens per chunk of the chunked CE (0: auto)")
    p.add_argument("--group_ratio", type=float, default=0.25, help="S²-Attn group size as a fraction of the context")
    p.add_argument("--time_budget", type=float, default=400.0, help="seconds after which no new point starts")
    return p


def main(argv=None) -> Dict[str, list]:
    args = harness.parse(build_parser(), argv, contexts=[64], search_step=64, max_context=128)
    methods = sorted(args.methods, key=lambda m: m.startswith("liger"))  # Liger patches process-wide: last
    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    out_dir = harness.out_dir(args)
    env = harness.environment(device)
    t_start = time.perf_counter()

    from hyclora.integrations.longseq import CausalLMChunkedLoss

    model, cfg = build_model(args, device, dtype)
    loss_fn = CausalLMChunkedLoss(model, chunk_size=args.ce_chunk or None)
    if device == "cuda":
        harness.clear(device)
        print(f"model built in {time.perf_counter() - t_start:.0f}s; {harness.allocated(device) / harness.GIB:.1f} GiB "
              f"allocated on {env['device']}", flush=True)

    def left() -> float:
        return args.time_budget - (time.perf_counter() - t_start)

    rows: List[Dict] = []
    searches: List[Dict] = []
    notes: List[str] = []
    for name in methods:
        method = Method(name, args)
        why = method.available()
        if why:
            notes.append(f"{name}: skipped, {why}")
            print(notes[-1], flush=True)
            continue
        last: Optional[Tuple[int, float]] = None  # (ctx, seconds) of the last point run, for estimates

        def affordable(ctx: int, n_steps: int) -> bool:
            return left() > 0 and estimated_seconds(last, ctx, n_steps, args.warmup + args.steps) <= left()

        for ctx in args.contexts:
            if not affordable(ctx, args.warmup + args.steps):
                rows.append({"method": name, "context": ctx, "status": "skipped (time budget)"})
                continue
            t0 = time.perf_counter()
            row = run_point(model, loss_fn, method, ctx, device, args.warmup, args.steps, cfg.vocab_size,
                            live_peak=args.live_peak,
                            report_to=out_dir / f"live-peak-{name}-{ctx}.txt" if args.live_peak else None,
                            profile_to=out_dir / f"profile-{name}-{ctx}.txt" if args.profile else None,
                            cprofile_to=out_dir / f"cprofile-{name}-{ctx}.txt" if args.cprofile else None)
            last = (ctx, point_seconds(row, time.perf_counter() - t0, args.warmup + args.steps))
            rows.append(row)
            print(f"{name:14s} {ctx:7d}  {row['status']:4s}  {row['tokens_per_s']:9.0f} tok/s  "
                  f"peak {row['peak_gib_above_static']:8.4f} GiB above static", flush=True)
        if not args.search:
            continue
        ran = [r for r in rows if r["method"] == name and r["status"] in ("ok", "OOM")]
        known_fit = max([r["context"] for r in ran if r["status"] == "ok"], default=0)
        ooms = [r["context"] for r in ran if r["status"] == "OOM"]
        known_oom = min(ooms) if ooms else None
        if known_oom is not None and known_oom <= known_fit:
            known_oom = None  # an OOM below a fit (fragmentation): search from the fit upwards

        def fits(ctx: int) -> Optional[bool]:
            nonlocal last
            if not affordable(ctx, 1):
                return None
            t0 = time.perf_counter()
            r = run_point(model, loss_fn, method, ctx, device, 1, 0, cfg.vocab_size)
            last = (ctx, (time.perf_counter() - t0) * max(1, args.warmup + args.steps))
            print(f"{name:14s} search {ctx:7d}: {r['status']}", flush=True)
            if r["status"] not in ("ok", "OOM"):
                raise RuntimeError(r["status"])
            return r["status"] == "ok"

        start = max(args.search_step, known_fit * 2 if known_fit else min(args.contexts))
        try:
            longest, first_oom, probes, complete = search_longest(
                fits, start, args.search_step, args.max_context, known_fit, known_oom)
            status = "complete" if complete else "stopped by time budget"
        except RuntimeError as exc:
            longest, first_oom, probes, status = known_fit, known_oom, [], f"error: {exc}"
        searches.append({"method": name, "longest_fit": longest, "first_oom": first_oom, "status": status,
                         "probes": " ".join(f"{c}:{s}" for c, s in probes)})
        print(f"{name}: longest context that fits {longest} (first OOM {first_oom}; {status})", flush=True)

    write_outputs(out_dir, rows, searches, notes, args, env, time.perf_counter() - t_start)
    return {"rows": rows, "searches": searches, "notes": notes}


def write_outputs(out_dir: Path, rows, searches, notes, args, env, seconds: float) -> None:
    fields = ["method", "context", "status", "tokens_per_s", "step_s", "peak_gib_above_static", "static_gib",
              "graph_resident_gib"]
    harness.write_csv(out_dir / "longseq.csv", rows, fields, env=env)
    harness.write_csv(out_dir / "longseq_search.csv", searches, ["method", "longest_fit", "first_oom", "status", "probes"])
    hcfg = harness.hyclora_config(args)
    shape = harness.shape_of(args)
    lines = [
        f"# Long-context LoRA step (Llama hidden {shape.hidden}, {shape.layers} layers, random weights, bs 1, "
        f"LoRA r={args.lora_r} on {len(args.lora_target_modules)} linears + embeddings/norms; {seconds:.0f} s)",
        "",
        harness.env_line(env),
        "",
        f"hyclora: {hcfg.layer_type} {hcfg.q_bit}-bit (kernel backend {hcfg.kernel_backend}), GC boundaries "
        f"{str(args.gc_boundary_bits) + '-bit' if args.gc_boundary_bits else 'exact'}; S²-Attn group ratio "
        f"{args.group_ratio}; chunked CE for every method; {args.warmup} warm-up + {args.steps} timed step(s) per "
        "point. Peak = max allocated during the timed steps minus what was allocated before them (weights, LoRA, "
        "trainable copies; for *_graphed, before the capture: the graphs' resident memory counts)"
        + ("; CPU: peak of live tensor bytes (hyclora.memory.track_live_tensors)." if args.live_peak else "."),
        "",
    ]
    lines += harness.markdown_table(
        ["method", "context", "status", "tokens/s", "step s", "peak GiB above static"],
        [(r["method"], r["context"], r["status"], harness.fmt(r.get("tokens_per_s"), ".0f"),
          harness.fmt(r.get("step_s"), ".2f"), harness.fmt(r.get("peak_gib_above_static"), ".4f")) for r in rows])
    if searches:
        lines += ["", f"Longest context that fits (one step; doubling, then bisection in steps of {args.search_step}, "
                  f"up to {args.max_context}):", ""]
        lines += harness.markdown_table(
            ["method", "longest fit", "first OOM", "search", "probes"],
            [(s["method"], s["longest_fit"], s["first_oom"] or "-", s["status"], s["probes"]) for s in searches])
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    harness.write_text(out_dir / "longseq.md", text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
