"""`make demo`: what hyclora does, on a model built here (no downloads, no shared data).

Builds a small Llama from a config (random weights, seed 0), wraps it in PEFT LoRA on all seven
linears, and for PEFT LoRA and every hyclora layer_type / q_bit runs one real training step,
measuring with saved-tensor hooks the bytes autograd buffers per decoder layer, and comparing
each LoRA gradient with the exact (uncompressed) one. Then (unless ``--quick``) it fine-tunes
the model on generated arithmetic word problems, once with plain LoRA and once with hyclora
intra_inter 4-bit, through the examples' pipeline (``hyclora.training.run_finetune``).

    python -m hyclora.demo [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import time

import torch

from . import HyCLoRAConfig
from .memory import LayerShape, format_bytes, measure_saved_tensors, theoretical_layer_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora_llama(hidden=256, layers=4, heads=8, kv_heads=4, ffn=688, vocab=1024, attn="sdpa", seed=0,
                     rank=16, b_std=0.02, dtype=torch.float32, device="cpu", max_positions=2048):
    """A random Llama built from a config (no downloads) with PEFT LoRA r=``rank`` (alpha = r) on
    all seven linears, lora_B drawn from N(0, b_std) as after some training (so lora_A gets
    gradients too), in train mode. Returns ``(model, config)``; shared by the demo and the
    host/profile benchmarks."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_positions)
    cfg._attn_implementation = attn
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=b_std)
    model.train()
    return model, cfg


def build_tiny_llama(hidden=256, layers=4, heads=8, kv_heads=4, ffn=688, vocab=1024, attn="sdpa", seed=0):
    """The demo's model: :func:`build_lora_llama` with its defaults."""
    return build_lora_llama(hidden, layers, heads, kv_heads, ffn, vocab, attn, seed)


def compression_report(batch=4, seq=256, attn="sdpa"):
    from .models import apply_hyclora, revert_hyclora

    model, cfg = build_tiny_llama(attn=attn)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    shape = LayerShape.from_config(cfg, lora_rank=16, lora_targets=TARGETS)
    tokens = ids.numel()

    def step():
        model.zero_grad(set_to_none=True)
        loss, report = measure_saved_tensors(model, lambda: model(input_ids=ids, labels=ids).loss)
        t0 = time.perf_counter()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), report, grads, time.perf_counter() - t0

    loss0, peft_report, exact, _ = step()
    rows = [("PEFT LoRA (autograd)", "-", peft_report.mean_layer_bytes, None, 1.0, 1.0, loss0)]
    variants = [("baseline", 16)] + [(lt, b) for lt in ("intra", "intra_inter") for b in (8, 4, 2)]
    for layer_type, bits in variants:
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=min(bits, 8)))
        loss, report, grads, _ = step()
        revert_hyclora(model)
        cos = torch.stack([torch.nn.functional.cosine_similarity(exact[n].flatten(), g.flatten(), dim=0)
                           for n, g in grads.items() if "lora_" in n])
        theory = theoretical_layer_bytes(shape, batch, seq, layer_type, min(bits, 8), attention=attn,
                                         dtype_bytes=4)
        rows.append((f"hyclora {layer_type}", bits if layer_type != "baseline" else "-",
                     report.mean_layer_bytes, theory, cos.mean().item(), cos.min().item(), loss))

    base = rows[0][2]
    print(f"\nBuffered activations of one training step, tiny Llama (hidden {cfg.hidden_size}, "
          f"FFN {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, GQA {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}), fp32, batch {batch} x {seq} tokens, {attn} attention, LoRA r=16 on 7 linears.")
    print("Measured by saved-tensor hooks (deduplicated storages, parameters excluded); gradient cosine")
    print("is per LoRA tensor against PEFT's exact gradients (random weights flatter compression).\n")
    header = f"{'variant':24s} {'bits':>4s} {'per layer':>11s} {'theory':>11s} {'x less':>7s} {'grad cos mean':>13s} {'min':>7s} {'loss':>8s}"
    print(header)
    print("-" * len(header))
    for name, bits, measured, theory, cmean, cmin, loss in rows:
        theory_s = format_bytes(theory) if theory is not None else "-"
        print(f"{name:24s} {str(bits):>4s} {format_bytes(measured):>11s} {theory_s:>11s} "
              f"{base / measured:7.2f} {cmean:13.5f} {cmin:7.4f} {loss:8.4f}")
    return rows


DEMO_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, attn_implementation="sdpa")


class _StepBytes:
    """Trainer callback: counts the buffered-activation bytes of one training step (step 3)."""

    def __new__(cls, step: int = 3):
        from transformers import TrainerCallback

        from .memory import count_saved_tensors

        class StepBytes(TrainerCallback):
            def __init__(self):
                self.report = None
                self._ctx = None

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if state.global_step == step and self._ctx is None:
                    self._ctx = count_saved_tensors(model)
                    self.report = self._ctx.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if self._ctx is not None:
                    self._ctx.__exit__(None, None, None)
                    self._ctx = None

        return StepBytes()


def demo_finetune(steps: int = 400, out_dir: str = "runs/demo"):
    """Fine-tune a tiny random Llama on generated arithmetic word problems, plain LoRA vs
    hyclora intra_inter 4-bit, same seed and data; print a comparison table."""
    from .training import build_tiny_llama, parse_finetune_args, run_finetune
    from .training.model import load_tokenizer

    runs = [("PEFT LoRA", dict(use_hyclora=False)),
            ("hyclora intra_inter 4-bit", dict(use_hyclora=True, layer_type="intra_inter", q_bit=4))]
    results = []
    for name, hy in runs:
        print(f"\n=== fine-tuning: {name} ===", flush=True)
        args = parse_finetune_args(
            "gsm8k", model_name_or_path="tiny-random-llama", data="synthetic", max_train_samples=2000,
            max_eval_samples=64, max_generate_samples=48, max_new_tokens=40, max_length=160,
            max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=1,
            learning_rate=3e-3, warmup_steps=max(steps // 20, 1), lr_scheduler_type="cosine", weight_decay=0.0,
            logging_steps=25, save_strategy="no", eval_strategy="no", report_to=[], seed=0,
            output_dir=f"{out_dir}/{'hyclora' if hy['use_hyclora'] else 'lora'}", **hy,
        )
        tokenizer = load_tokenizer(args.model)
        torch.manual_seed(0)  # the same random base for both runs
        base = build_tiny_llama(tokenizer, **DEMO_MODEL)
        counter = _StepBytes()
        metrics = run_finetune(args, model=base, tokenizer=tokenizer, extra_callbacks=[counter])
        results.append((name, metrics, counter.report))

    print(f"\nFine-tuning a small random Llama ({DEMO_MODEL['num_hidden_layers']} layers, hidden "
          f"{DEMO_MODEL['hidden_size']}) with LoRA r=16 on generated arithmetic")
    print(f"word problems, {steps} steps of 8 sequences, same seed and data. Exact match is strict/flexible")
    print("(lm-eval rules) on 48 held-out problems; a random 4-layer base learns little arithmetic, so the")
    print("point is the parity of the two rows, not the accuracy.\n")
    header = (f"{'run':28s} {'buffered/step':>14s} {'tok/s':>8s} {'final train loss':>17s} "
              f"{'eval loss':>10s} {'EM strict':>10s} {'EM flexible':>12s}")
    print(header)
    print("-" * len(header))
    for name, m, report in results:
        hist = m.get("loss_history") or [(0, m.get("train_loss", float("nan")))]
        print(f"{name:28s} {format_bytes(report.total) if report else '-':>14s} "
              f"{m.get('tokens_per_s', float('nan')):8.0f} {hist[-1][1]:17.4f} "
              f"{m.get('eval_loss', float('nan')):10.4f} "
              f"{100 * m.get('gsm8k_exact_match_strict', float('nan')):9.1f}% "
              f"{100 * m.get('gsm8k_exact_match_flexible', float('nan')):11.1f}%")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="hyclora demo")
    parser.add_argument("--quick", action="store_true", help="compression report only")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps per run")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    compression_report()
    if args.quick:
        return
    demo_finetune(steps=args.steps)


if __name__ == "__main__":
    main()
