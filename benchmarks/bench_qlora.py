"""The paper's headline setting end to end (issue 4): QLoRA (NF4 base) vs hyclora, peak memory with weights.

Llama-2-7B shape (hidden 4096, FFN 11008, 32 layers, 32 heads, vocab 32000), random weights
(normal, std = initializer_range, as HF's init), every decoder linear a bitsandbytes ``Linear4bit``
(NF4, double quantisation, bf16 compute); embeddings, norms and lm_head bf16. PEFT LoRA r=16
alpha=16 (no dropout) on the seven linears; no ``prepare_model_for_kbit_training`` (it would cast
embeddings/lm_head to fp32 and change the static memory the anchors were taken with). The model's
standard LM loss (``labels=input_ids``), forward + backward per step, no optimizer, LoRA grads
dropped between steps: the protocol of ../shared/gpu/README.md, "The paper's setting".

The model is built ONCE (on the meta device, then each linear quantised from its own random bf16
tensor on the GPU, so at most one linear's bf16 weights exist beside the 4-bit model) and every
variant reuses it: attention switched with ``set_attn_implementation``, gradient checkpointing
with ``hyclora.compat.checkpointing_enable/disable`` (HF activation checkpointing), hyclora with ``apply_hyclora/revert_hyclora``.

Per variant: static GiB (allocated before the step: weights, LoRA, rotary caches), peak GiB
(``max_memory_allocated`` over the timed steps, weights included), peak during warm-up (hyclora's
calibration steps), tokens/s = median of --steps steps after the warm-up. hyclora variants warm
up max(--warmup, iteration_threshold + 1) steps (default threshold 5, so >= 6) so that the
timed steps run with frozen statistics. An OOM is caught and reported. No variant starts after
--time_budget seconds (model build included).

    # H200 (the lead's command): wheels into /tmp/site, then
    python3 benchmarks/bench_qlora.py                       # bs 4 x 1024, all variants
    python3 benchmarks/bench_qlora.py --bs 4 --seq 512      # another anchor row
    python3 benchmarks/bench_qlora.py --smoke               # CPU: tiny Llama, no bnb (code path only)

Writes $OUT/qlora.md and $OUT/qlora.csv (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyclora import HyCLoRAConfig  # noqa: E402
from hyclora.compat import checkpointing_disable, checkpointing_enable  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


# -- model ----------------------------------------------------------------------------------------
def make_linear4bit(in_features: int, out_features: int, bias: bool, device, std: float,
                    compute_dtype=torch.bfloat16, generator=None):
    """A bitsandbytes NF4 ``Linear4bit`` (double quant) holding a random N(0, std) weight.

    The bf16 weight lives only until it is quantised (``Params4bit.to(device)`` quantises a
    not-yet-quantised parameter), so building a 7B model never holds more than one linear's
    bf16 weight beside the 4-bit ones.
    """
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    w = torch.empty(out_features, in_features, dtype=compute_dtype, device=device)
    w.normal_(0.0, std, generator=generator)
    param = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                              module=layer)
    del w
    layer.weight = param.to(device)  # quantises here; sets layer.quant_state too
    if bias:
        layer.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                  requires_grad=False)
    if not layer.weight.bnb_quantized or layer.weight.dtype != torch.uint8:
        raise RuntimeError(f"bitsandbytes did not quantise the {out_features}x{in_features} weight "
                           f"(dtype {layer.weight.dtype}); check the bitsandbytes install")
    return layer


def build_model(args, device: str, quantize: bool):
    """LlamaForCausalLM of the requested shape, random weights, decoder linears NF4 if ``quantize``.

    Built on the meta device, then materialised piece by piece on ``device``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    heads = args.heads
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=args.vocab,
                      max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False)
    cfg._attn_implementation = args.attn[0]
    std = cfg.initializer_range
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    cfg.use_cache = False  # training: no KV cache (and no warning under gradient checkpointing)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if quantize:
                    new = make_linear4bit(child.in_features, child.out_features, child.bias is not None,
                                          device, std, compute_dtype=dtype, generator=gen)
                else:
                    new = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=device, dtype=dtype)
                    with torch.no_grad():
                        new.weight.normal_(0.0, std, generator=gen)
                        if new.bias is not None:
                            new.bias.zero_()
                setattr(parent, name, new)

    # everything else still on meta: embeddings, lm_head (normal), RMSNorm weights (ones)
    done = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if id(p) not in done:  # tied parameters stay tied
                t = torch.empty(p.shape, dtype=dtype, device=device)
                with torch.no_grad():
                    if "norm" in type(module).__name__.lower():
                        t.fill_(1.0)
                    else:
                        t.normal_(0.0, std, generator=gen)
                done[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
            setattr(module, name, done[id(p)])
    rotary_cls = type(model.model.rotary_emb)
    with torch.device(device):  # inv_freq buffers are computed in __init__
        model.model.rotary_emb = rotary_cls(config=cfg)
    if quantize:
        # what from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True)) sets; PEFT
        # reads it to wrap Linear4bit bases in its QLoRA layer (peft.tuners.lora.bnb.Linear4bit),
        # the layer QLoRA users get, instead of the generic lora.Linear
        model.is_loaded_in_4bit = True
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"build_model left tensors on the meta device: {left[:5]}")
    return model


def add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)  # lora_A's init draws from the global generator: same adapters every run
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as after some training, so every gradient path carries signal
            with torch.no_grad():
                p.normal_(0.0, 0.01)
    model.train()
    return model


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
            hcfg = HyCLoRAConfig(layer_type=layer_type, q_bit=bits, iteration_threshold=args.iteration_threshold)
            for chunked in ((False, True) if args.chunked_ce == "both" else (bool(args.chunked_ce),)):
                out.append((f"hyclora {layer_type} {bits}-bit" + (cce if chunked else ""), attn, hcfg, False, chunked))
    for attn in args.attn:  # the baseline again: drift, and that toggling left the model clean
        out.append((f"{peft_name} (again)", attn, None, False, False))
    return out


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _loss(model, ids, chunked_loss=None):
    """The standard LM loss, or the same loss through ``chunked_loss`` (hyclora's
    ``CausalLMChunkedLoss`` around ``model``: the LM head's logits never exist for the whole batch
    at once; 4 x 1024 x 32000 fp32 is 0.5 GiB, plus its gradient)."""
    if chunked_loss is not None:
        return chunked_loss(ids)
    return model(input_ids=ids, labels=ids).loss


def _step(model, ids, chunked_loss=None):
    _loss(model, ids, chunked_loss).backward()
    model.zero_grad(set_to_none=True)


def _set_attention(model, attn: str):
    base = model.get_base_model()
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(attn)
    else:  # pragma: no cover - older transformers
        base.config._attn_implementation = attn
    if base.config._attn_implementation != attn:
        raise RuntimeError(f"could not switch attention to {attn} (got {base.config._attn_implementation})")


def run_variant(model, variant, ids, args, device: str):
    from hyclora import apply_hyclora, revert_hyclora

    from hyclora.integrations.longseq import CausalLMChunkedLoss

    label, attn, hcfg, ckpt, chunked = variant
    chunked_loss = CausalLMChunkedLoss(model) if chunked else None  # built once, outside the timed steps
    base = model.get_base_model()
    res = {"variant": label, "attention": attn, "status": "ok", "static_gib": float("nan"),
           "peak_gib": float("nan"), "warmup_peak_gib": float("nan"), "tok_s": float("nan"),
           "warmup_steps": 0, "loss": float("nan")}
    oom = None
    _set_attention(model, attn)
    try:
        if ckpt:
            checkpointing_enable(base, use_reentrant=False)
        if hcfg is not None:
            apply_hyclora(model, hcfg)
        warmup = max(args.warmup, hcfg.iteration_threshold + 1) if hcfg is not None else args.warmup
        res["warmup_steps"] = warmup
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            res["static_gib"] = torch.cuda.memory_allocated() / GIB
        for _ in range(warmup):
            _step(model, ids, chunked_loss)
        sync(device)
        if device == "cuda":
            res["warmup_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            if i == args.steps - 1:  # keep one loss: a NaN would make the memory number meaningless
                loss = _loss(model, ids, chunked_loss)
                loss.backward()
                model.zero_grad(set_to_none=True)
                res["loss"] = float(loss.detach())
                del loss
            else:
                _step(model, ids, chunked_loss)
            sync(device)
            times.append(time.perf_counter() - t0)
        if device == "cuda":
            res["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        res["tok_s"] = ids.numel() / statistics.median(times)
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:160]
    except Exception as exc:  # one GPU call is precious: report the variant, run the others
        import traceback

        traceback.print_exc()
        res["status"] = "error"
        res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        if hcfg is not None:
            revert_hyclora(model)
        if ckpt:
            checkpointing_disable(base)
            # enable() also hooked the embeddings to output requires_grad; drop it so that the
            # later variants run exactly as the ones before
            base.disable_input_require_grads()
        model.zero_grad(set_to_none=True)
    if oom is not None:  # outside the except block, so the traceback's frames are freed
        res["status"] = "OOM"
        res["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan")
        res["error"] = oom
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


# -- report ---------------------------------------------------------------------------------------
def _commit() -> str:
    if os.environ.get("HYCLORA_COMMIT"):
        return os.environ["HYCLORA_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _bnb_version() -> str:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except ImportError:
        return "not installed"


def _fmt(x, digits=2):
    return "-" if x != x else f"{x:.{digits}f}"  # NaN -> "-"


COLUMNS = ["variant", "attention", "status", "static_gib", "peak_gib", "warmup_peak_gib", "tok_s",
           "warmup_steps", "loss"]


def render(args, device, quant, rows, build_s, skipped) -> str:
    import peft
    import transformers

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [
        f"# bench_qlora: {gpu}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"torch {torch.__version__}, bitsandbytes {_bnb_version()}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, commit {_commit()}.",
        "",
        f"Llama hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
        f"random weights; decoder linears {'NF4 + double quant (bnb Linear4bit), bf16 compute' if quant else args.dtype + ' (NOT quantised)'}; "
        f"LoRA r={args.rank} alpha={args.rank} on {len(TARGETS)} linears; bs {args.bs} x {args.seq}; "
        "standard LM loss; forward + backward, no optimizer. static = allocated before the step; "
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


def write_csv(path: Path, rows, meta):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + list(meta))
        for r in rows:
            w.writerow([r[c] for c in COLUMNS] + list(meta.values()))


# -- main -----------------------------------------------------------------------------------------
def _hyclora_variant(text: str):
    try:
        layer_type, bits = text.rsplit(":", 1)
        bits = int(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hyclora takes LAYER_TYPE:BITS, e.g. intra_inter_full_fuse:2; got {text!r}")
    try:
        HyCLoRAConfig(layer_type=layer_type, q_bit=bits)  # same checks (and messages) as the library
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))  # argparse hides a ValueError's message
    return layer_type, bits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--attn", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"])
    p.add_argument("--hyclora", nargs="*", type=_hyclora_variant,
                   default=[("intra_inter_full_fuse", 2), ("intra_inter_full_fuse", 4), ("intra_inter", 2)],
                   help="LAYER_TYPE:BITS ... (default: intra_inter_full_fuse:2 intra_inter_full_fuse:4 intra_inter:2)")
    p.add_argument("--chunked_ce", nargs="?", const="hyclora", default=None, choices=["hyclora", "both"],
                   help="hyclora rows compute the LM loss with hyclora's chunked cross-entropy (and one "
                        "'PEFT + chunked CE' row per attention, for reference); 'both': each hyclora row "
                        "with and without it")
    p.add_argument("--no_gc", action="store_true", help="skip the PEFT + gradient checkpointing (sdpa) variant")
    p.add_argument("--iteration_threshold", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (hyclora: at least iteration_threshold + 1)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--time_budget", type=float, default=420.0, help="no variant starts after this many seconds")
    p.add_argument("--quant", choices=["auto", "nf4", "none"], default="auto",
                   help="auto: NF4 on CUDA (bitsandbytes required), none on CPU")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--smoke", action="store_true",
                   help="tiny Llama, few steps; on a machine without CUDA, no bnb quantisation (code path only)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args(argv)
    if args.smoke:
        # widths multiples of 64: bnb 0.50.2's CPU backend mis-quantises rows whose length is not
        # (error 0.23-0.25 vs 0.09); the 7B widths (4096, 11008) are multiples of 64
        args.layers, args.hidden, args.ffn, args.heads, args.vocab = 2, 128, 384, 4, 256
        args.bs, args.seq, args.rank, args.steps = 1, 32, 4, 1
        args.warmup, args.iteration_threshold = 1, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    quant = args.quant == "nf4" or (args.quant == "auto" and device == "cuda")
    if quant:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("bitsandbytes is not importable: install the wheel (pip install --target /tmp/site "
                             ".whl/bitsandbytes-*.whl; PYTHONPATH=/tmp/site) or pass --quant none")
        if args.dtype != "bf16":
            raise SystemExit("--quant nf4 uses bf16 compute; pass --dtype bf16")
    t_start = time.perf_counter()
    model = add_lora(build_model(args, device, quant), args.rank)
    sync(device)
    build_s = time.perf_counter() - t_start
    print(f"model built in {build_s:.1f} s"
          + (f", {torch.cuda.memory_allocated() / GIB:.2f} GiB allocated" if device == "cuda" else ""), flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.bs, args.seq), generator=gen).to(device)

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

    text = render(args, device, quant, rows, build_s, skipped)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qlora.md").write_text(text)
    meta = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "bs": args.bs, "seq": args.seq,
            "layers": args.layers, "quant": "nf4" if quant else args.dtype, "torch": torch.__version__,
            "bitsandbytes": _bnb_version(), "commit": _commit(), "date": time.strftime("%Y-%m-%d")}
    write_csv(out / "qlora.csv", rows, meta)
    print(text)
    return 0  # OOM and budget skips are results, reported in the table


if __name__ == "__main__":
    sys.exit(main())
