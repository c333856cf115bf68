"""`make demo`: what hyclora does, on a model built here (no downloads, no shared data).

Builds a small Llama from a config (random weights, seed 0), wraps it in PEFT LoRA on all seven
linears, and for PEFT LoRA and every hyclora layer_type / q_bit runs one real training step,
measuring with saved-tensor hooks the bytes autograd buffers per decoder layer, and comparing
each LoRA gradient with the exact (uncompressed) one. Then, when the fine-tuning pieces are
installed, it fine-tunes the model on generated arithmetic word problems, once with plain LoRA
and once with hyclora intra_inter 4-bit (see ``hyclora.train``).

    python -m hyclora.demo [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from . import HyCLoRAConfig
from .memory import LayerShape, format_bytes, measure_saved_tensors, theoretical_bytes_per_token

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tiny_llama(hidden=256, layers=4, heads=8, kv_heads=4, ffn=688, vocab=1024, attn="sdpa", seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=2048)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as after some training, so lora_A gets gradients too
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model, cfg


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
        theory = theoretical_bytes_per_token(shape, layer_type, bits, dtype_bytes=4) * tokens
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="hyclora demo")
    parser.add_argument("--quick", action="store_true", help="compression report only")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    compression_report()
    if args.quick:
        return
    try:
        from .train import demo_finetune  # the fine-tuning comparison (examples issue)
    except ImportError:
        return
    demo_finetune()


if __name__ == "__main__":
    main()
