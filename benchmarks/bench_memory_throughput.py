"""Peak memory and tokens/s of one LoRA training step: PEFT LoRA vs hyclora, same process.

Llama-2-7B-shaped model (hidden 4096, FFN 11008, 32 layers, 32 heads, vocab 32000) with random
bf16 weights, PEFT LoRA r=16 alpha=16 on all seven linears. One step = forward + backward (no
optimizer), like the anchors in ../shared/gpu/README.md. For every variant: peak CUDA memory
above the static memory (weights + LoRA), buffered activation bytes per decoder layer counted by
saved-tensor hooks, and the median tokens/s of --steps steps after a warm-up (which also covers
hyclora's calibration steps, so the timed steps run with frozen statistics).

    python benchmarks/bench_memory_throughput.py                 # GPU, all variants
    python benchmarks/bench_memory_throughput.py --smoke         # CPU, tiny model, checks the script

Prints a markdown table and writes CSV (and a PNG when matplotlib is there) under $OUT or ./out.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_csv  # noqa: E402

from hyclora import HyCLoRAConfig  # noqa: E402
from hyclora.compat import checkpointing_disable, checkpointing_enable  # noqa: E402
from hyclora.memory import measure_saved_tensors  # noqa: E402


def build_model(args, device, dtype, attn):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.smoke:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                          max_position_embeddings=4096)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as after some training, so every gradient path is exercised
            torch.nn.init.normal_(p, std=0.01)
    model.train()
    return model, cfg


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(model, variant, batch, device, steps, warmup):
    from hyclora import apply_hyclora, revert_hyclora

    name, hcfg, checkpointing = variant
    if hcfg is not None:
        apply_hyclora(model, hcfg)
    if checkpointing:
        checkpointing_enable(model, use_reentrant=False)
        model.enable_input_require_grads()
    ids = batch
    tokens = ids.numel()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    result = {"variant": name}
    try:
        for _ in range(warmup):
            step()
        sync(device)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated() if device == "cuda" else 0
        times = []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - static) if device == "cuda" else float("nan")
        loss, report = measure_saved_tensors(model, lambda: model(input_ids=ids, labels=ids).loss)
        loss.backward()
        model.zero_grad(set_to_none=True)
        result.update(
            peak_gib=peak / 2**30,
            tok_s=tokens / statistics.median(times),
            buffered_layer_mib=report.mean_layer_bytes / 2**20,
            buffered_total_gib=report.total / 2**30,
        )
    except torch.cuda.OutOfMemoryError:
        result.update(peak_gib=float("inf"), tok_s=0.0, buffered_layer_mib=float("nan"),
                      buffered_total_gib=float("nan"))
    except Exception as exc:  # report and go on: one broken variant must not lose the others
        print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
        result.update(peak_gib=float("nan"), tok_s=0.0, buffered_layer_mib=float("nan"),
                      buffered_total_gib=float("nan"))
    finally:
        if checkpointing:
            checkpointing_disable(model)
        if hcfg is not None:
            revert_hyclora(model)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def variants(bits_list, layer_types):
    out = [("PEFT LoRA", None, False), ("PEFT LoRA + GC", None, True)]
    for lt in layer_types:
        if lt == "baseline":
            out.append(("hyclora baseline", HyCLoRAConfig(layer_type="baseline"), False))
            continue
        for bits in bits_list:
            out.append((f"hyclora {lt} {bits}-bit", HyCLoRAConfig(layer_type=lt, q_bit=bits), False))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--shapes", default="4x512,1x4096", help="comma-separated BSxSEQ")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--eager_shapes", default="4x512", help="shapes also run with eager attention")
    parser.add_argument("--bits", default="2,4,8")
    parser.add_argument("--layer_types", default="baseline,intra,intra_inter")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds over the variants; tok/s = median over rounds (min/max in the CSV)")
    parser.add_argument("--warmup", type=int, default=6, help=">= iteration_threshold + 1")
    args = parser.parse_args()

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if args.smoke:
        args.shapes, args.eager_shapes, args.steps, args.warmup = "2x64", "2x64", 1, 1
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    bits = [int(b) for b in args.bits.split(",")]
    layer_types = args.layer_types.split(",")
    runs = [(args.attn, s) for s in args.shapes.split(",")]
    runs += [("eager", s) for s in args.eager_shapes.split(",") if s and args.attn != "eager"]

    rows = []
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for attn, shape in runs:
        bs, seq = (int(v) for v in shape.split("x"))
        model, cfg = build_model(args, device, dtype, attn)
        ids = torch.randint(0, cfg.vocab_size, (bs, seq), device=device)
        # --rounds > 1: the variants run in interleaved rounds (A B C A B C ...), so that drift of
        # the host or the GPU over the run hits every variant alike; tok/s = median over rounds
        per_variant = {}
        for rnd in range(args.rounds):
            for variant in variants(bits, layer_types):
                r = run_variant(model, variant, ids, device, args.steps, args.warmup)
                per_variant.setdefault(r["variant"], []).append(r)
                print(f"{attn:5s} {shape:8s} {r['variant']:28s} peak {r['peak_gib']:7.2f} GiB  "
                      f"{r['tok_s']:8.0f} tok/s  buffered/layer {r['buffered_layer_mib']:8.2f} MiB"
                      + (f"  (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""), flush=True)
        for name, results in per_variant.items():
            r = dict(results[0])
            speeds = [x["tok_s"] for x in results]
            r.update(tok_s=statistics.median(speeds), tok_s_min=min(speeds), tok_s_max=max(speeds),
                     peak_gib=max(x["peak_gib"] for x in results), rounds=len(results),
                     attn=attn, shape=shape, gpu=gpu)
            rows.append(r)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    print("\n| attn | bs x seq | variant | peak GiB above weights | x less than PEFT | tok/s | tok/s min-max over rounds "
          "| x PEFT speed | buffered MiB/layer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["attn"] == r["attn"] and b["shape"] == r["shape"] and b["variant"] == "PEFT LoRA")
        less = base["peak_gib"] / r["peak_gib"] if r["peak_gib"] and r["peak_gib"] == r["peak_gib"] else float("nan")
        speed = r["tok_s"] / base["tok_s"] if base["tok_s"] else float("nan")
        print(f"| {r['attn']} | {r['shape']} | {r['variant']} | {r['peak_gib']:.2f} | {less:.2f} | "
              f"{r['tok_s']:.0f} | {r['tok_s_min']:.0f}-{r['tok_s_max']:.0f} | {speed:.2f} | "
              f"{r['buffered_layer_mib']:.2f} |")
    write_csv(out_dir / "memory_throughput.csv", rows)


if __name__ == "__main__":
    main()
