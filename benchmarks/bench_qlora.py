"""The paper's headline setting end to end: QLoRA (NF4 base) vs hyclora, peak memory with weights.

A random-weight Llama (Llama-2-7B shape by default; normal, std = initializer_range, as HF's
init), every decoder linear a bitsandbytes ``Linear4bit`` (NF4, double quantisation, bf16
compute); embeddings, norms and lm_head bf16. PEFT LoRA r=16 alpha=16 (no dropout) on the seven
linears; no ``prepare_model_for_kbit_training`` (it would cast embeddings/lm_head to fp32 and
change the static memory). The model's standard LM loss (``labels=input_ids``), forward + backward
per step, no optimizer, LoRA grads dropped between steps (the protocol of ../shared/gpu/README.md,
"The paper's setting").

The model is built ONCE (on the meta device, then each linear quantised from its own random bf16
tensor on the GPU, so at most one linear's bf16 weights exist beside the 4-bit model: the
harness's builder) and every variant reuses it: attention switched with
``set_attn_implementation``, gradient checkpointing with ``hyclora.compat.checkpointing_enable/
disable`` (HF activation checkpointing), hyclora with ``apply_hyclora/revert_hyclora``.

Per variant: static GiB (allocated before the step: weights, LoRA, rotary caches), peak GiB
(``max_memory_allocated`` over the timed steps, weights included), peak during warm-up (hyclora's
calibration steps), tokens/s = median of --steps steps after the warm-up. hyclora variants warm
up max(--warmup, iteration_threshold + 1) steps so that the timed steps run with frozen
statistics. An OOM is caught and reported. No variant starts after --time_budget seconds (model
build included).

    python3 benchmarks/bench_qlora.py                       # GPU: bs 4 x 1024, all variants
    python3 benchmarks/bench_qlora.py --bs 4 --seq 512      # another shape
    python3 benchmarks/bench_qlora.py --smoke               # CPU: tiny Llama, no bnb (code path only)

Writes qlora.md and qlora.csv under --out and prints the table.
"""

from __future__ import annotations

import sys
import time

import torch

import harness

GIB = harness.GIB


# -- variants -------------------------------------------------------------------------------------
def variants(args, quant: bool = True):
    """(label, attention, hyclora config or None, gradient checkpointing), most wanted first."""
    peft_name = "PEFT QLoRA" if quant else "PEFT LoRA"
    cce = " + chunked CE"
    out = []
    for attn in args.attn:
        out.append((peft_name, attn, None, False, False))
        if args.chunked_ce:
            out.append((peft_name + cce, attn, None, False, True))
        if attn == "sdpa" and not args.no_gc:
            out.append((f"{peft_name} + grad ckpt", attn, None, True, False))
        for layer_type, bits in args.hyclora:
            hcfg = harness.hyclora_config(args, layer_type=layer_type, q_bit=bits)
            for chunked in ((False, True) if args.chunked_ce == "both" else (bool(args.chunked_ce),)):
                out.append((f"hyclora {layer_type} {bits}-bit" + (cce if chunked else ""), attn, hcfg, False, chunked))
    for attn in args.attn:  # the baseline again: drift, and that toggling left the model clean
        out.append((f"{peft_name} (again)", attn, None, False, False))
    return out


def _loss(model, ids, chunked_loss=None):
    """The standard LM loss, or the same loss through ``chunked_loss`` (hyclora's
    ``CausalLMChunkedLoss`` around ``model``: the LM head's logits never exist for the whole batch
    at once; 4 x 1024 x 32000 fp32 is 0.5 GiB, plus its gradient)."""
    if chunked_loss is not None:
        return chunked_loss(ids)
    return model(input_ids=ids, labels=ids).loss


def _set_attention(model, attn: str):
    base = model.get_base_model()
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(attn)
    else:  # pragma: no cover - older transformers
        base.config._attn_implementation = attn
    if base.config._attn_implementation != attn:
        raise RuntimeError(f"could not switch attention to {attn} (got {base.config._attn_implementation})")


def run_variant(model, variant, ids, args, device: str):
    from hyclora.integrations.longseq import CausalLMChunkedLoss

    label, attn, hcfg, ckpt, chunked = variant
    chunked_loss = CausalLMChunkedLoss(model) if chunked else None  # built once, outside the timed steps
    res = {"variant": label, "attention": attn, "status": "ok", "static_gib": float("nan"),
           "peak_gib": float("nan"), "warmup_peak_gib": float("nan"), "tok_s": float("nan"),
           "warmup_steps": 0, "loss": float("nan")}
    oom = None
    _set_attention(model, attn)

    def step():
        loss = _loss(model, ids, chunked_loss)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        with harness.variant(model, hcfg, ckpt):
            warmup = max(args.warmup, hcfg.iteration_threshold + 1) if hcfg is not None else args.warmup
            res["warmup_steps"] = warmup
            m = harness.measure(step, device, steps=args.steps, warmup=warmup, tokens=ids.numel())
            if device == "cuda":
                res.update(static_gib=m["start"] / GIB, warmup_peak_gib=m["warmup_peak"] / GIB, peak_gib=m["peak"] / GIB)
            # the last timed step's loss: a NaN would make the memory number meaningless
            res.update(tok_s=m["tok_s"], loss=float(m["last"]) if m["last"] is not None else float("nan"))
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:160]
    except Exception as exc:  # one GPU call is precious: report the variant, run the others
        import traceback

        traceback.print_exc()
        res["status"] = "error"
        res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    if oom is not None:  # outside the except block, so the traceback's frames are freed
        res["status"] = "OOM"
        res["peak_gib"] = harness.max_allocated(device) / GIB if device == "cuda" else float("nan")
        res["error"] = oom
    harness.clear(device)
    harness.reset_peak(device)
    return res


# -- report ---------------------------------------------------------------------------------------
def _fmt(x, digits=2):
    return harness.fmt(x, f".{digits}f")


COLUMNS = ["variant", "attention", "status", "static_gib", "peak_gib", "warmup_peak_gib", "tok_s",
           "warmup_steps", "loss"]


def render(args, env, quant, rows, build_s, skipped) -> str:
    shape = harness.shape_of(args)
    lines = [
        f"# bench_qlora: {env['device']}, {env['date']}",
        "",
        f"{harness.env_line(env)}.",
        "",
        f"Llama hidden {shape.hidden}, FFN {shape.ffn}, {shape.layers} layers, {shape.heads} heads, vocab {shape.vocab}, "
        f"random weights; decoder linears {'NF4 + double quant (bnb Linear4bit), bf16 compute' if quant else args.dtype + ' (NOT quantised)'}; "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha or args.lora_r} on {len(args.lora_target_modules)} linears; "
        f"bs {args.bs} x {args.seq}; standard LM loss; forward + backward, no optimizer. static = allocated before the step; "
        f"peak = max allocated over {args.steps} timed steps (weights included); warm-up peak = over the warm-up "
        f"steps (hyclora: max({args.warmup}, iteration_threshold + 1 = {args.iteration_threshold + 1}) steps, "
        f"calibration included); tok/s = median of {args.steps} steps. Model built once in {build_s:.0f} s.",
        "",
        "x less memory / tok/s ratio: against the first PEFT row with the same attention.",
        "",
        "| variant | attention | status | static GiB | peak GiB | warm-up peak GiB | tok/s | x less memory "
        "| tok/s ratio | warm-up steps | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {}
    for r in rows:  # the first baseline of each attention is the reference
        if r["variant"].startswith("PEFT") and "ckpt" not in r["variant"] and r["status"] == "ok":
            ref.setdefault(r["attention"], r)
    nan = float("nan")
    for r in rows:
        b = ref.get(r["attention"])
        less = b["peak_gib"] / r["peak_gib"] if b and r["status"] == "ok" and r["peak_gib"] > 0 else nan
        speed = r["tok_s"] / b["tok_s"] if b and r["status"] == "ok" else nan
        lines.append(f"| {r['variant']} | {r['attention']} | {r['status']} | {_fmt(r['static_gib'])} | "
                     f"{_fmt(r['peak_gib'])} | {_fmt(r['warmup_peak_gib'])} | {_fmt(r['tok_s'], 0)} | "
                     f"{_fmt(less)} | {_fmt(speed)} | {r['warmup_steps']} | {_fmt(r['loss'], 3)} |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += [""] + [f"- {r['variant']} ({r['attention']}): {r['error']}" for r in errors]
    if skipped:
        lines += ["", f"Not run (--time_budget {args.time_budget:.0f} s reached): "
                  + ", ".join(f"{v[0]} ({v[1]})" for v in skipped)]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = harness.parser(__doc__.split("\n")[0], "model", "batch", "steps", "lora", "smoke", seq=1024, steps=5,
                       warmup=2, dtype="bf16")
    p.add_argument("--attn", action=harness.Items, choices=("eager", "sdpa"), default=["eager", "sdpa"],
                   help="attention implementations, each with every variant")
    p.add_argument("--hyclora", action=harness.Items, item=harness.layer_bits, nargs="*",
                   default=[("intra_inter_full_fuse", 2), ("intra_inter_full_fuse", 4), ("intra_inter", 2)],
                   help="LAYER_TYPE:BITS ... (default: intra_inter_full_fuse:2 intra_inter_full_fuse:4 intra_inter:2)")
    p.add_argument("--chunked_ce", nargs="?", const="hyclora", default=None, choices=["hyclora", "both"],
                   help="hyclora rows compute the LM loss with hyclora's chunked cross-entropy (and one "
                        "'PEFT + chunked CE' row per attention, for reference); 'both': each hyclora row "
                        "with and without it")
    p.add_argument("--no_gc", action="store_true", help="skip the PEFT + gradient checkpointing (sdpa) variant")
    p.add_argument("--iteration_threshold", type=int, default=5, help="hyclora's calibration forwards")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (hyclora: at least iteration_threshold + 1)")
    p.add_argument("--time_budget", type=float, default=420.0, help="no variant starts after this many seconds")
    p.add_argument("--quant", choices=["auto", "nf4", "none"], default="auto",
                   help="auto: NF4 on CUDA (bitsandbytes required), none on the CPU")
    # smoke: widths multiples of 64 (bnb's CPU backend mis-quantises rows of other lengths; the 7B
    # widths are multiples of 64)
    return harness.parse(p, argv, hidden=128, ffn=384, heads=4, vocab=256, bs=1, seq=32, lora_r=4, steps=1,
                         warmup=1, iteration_threshold=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.device_of(args)
    quant = args.quant == "nf4" or (args.quant == "auto" and device == "cuda")
    if quant:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("bitsandbytes is not importable: install the wheel (pip install --target /tmp/site "
                             ".whl/bitsandbytes-*.whl; PYTHONPATH=/tmp/site) or pass --quant none")
        if harness.dtype_of(args, device) != torch.bfloat16:
            raise SystemExit("--quant nf4 uses bf16 compute; pass --dtype bf16")
    env = harness.environment(device)
    t_start = time.perf_counter()
    args.attn, attns = args.attn[0], args.attn  # the model is built with the first
    model, _ = harness.build_model(args, device, harness.dtype_of(args, device), nf4=quant, use_cache=False)
    args.attn = attns
    harness.sync(device)
    build_s = time.perf_counter() - t_start
    print(f"model built in {build_s:.1f} s"
          + (f", {harness.allocated(device) / GIB:.2f} GiB allocated" if device == "cuda" else ""), flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, harness.shape_of(args).vocab, (args.bs, args.seq), generator=gen).to(device)

    rows, todo = [], variants(args, quant)
    skipped = []
    for i, v in enumerate(todo):
        if time.perf_counter() - t_start > args.time_budget:
            skipped = todo[i:]
            break
        r = run_variant(model, v, ids, args, device)
        rows.append(r)
        print(f"{r['variant']:<36} {r['attention']:<6} {r['status']:<4} static {_fmt(r['static_gib'])} "
              f"peak {_fmt(r['peak_gib'])} GiB, {_fmt(r['tok_s'], 0)} tok/s, loss {_fmt(r['loss'], 3)}", flush=True)

    text = render(args, env, quant, rows, build_s, skipped)
    out = harness.out_dir(args)
    harness.write_text(out / "qlora.md", text)
    meta = {"gpu": env["device"], "bs": args.bs, "seq": args.seq, "layers": harness.shape_of(args).layers,
            "quant": "nf4" if quant else args.dtype, "torch": env["torch"], "bitsandbytes": env["bitsandbytes"],
            "commit": env["commit"], "date": env["date"]}
    harness.write_csv(out / "qlora.csv", [{**{c: r[c] for c in COLUMNS}, **meta} for r in rows], COLUMNS + list(meta),
                      env=env)
    print(text)
    return 0  # OOM and budget skips are results, reported in the table


if __name__ == "__main__":
    sys.exit(main())
