"""Measurements behind two design decisions of hyclora.quant, on real pretrained Llamas (CPU).

--what granularity
    Relative quantisation error ||x_hat - x|| / ||x|| of every buffered activation kind of a
    Llama decoder layer (captured with forward hooks, averaged over layers), for per-channel
    ranges (+ exact outlier channels) against per-row groups (per token = one group per row), at
    2/4/8 bits, with the bits each scheme really stores per element (codes + fp32 lo/step +
    outliers). Answers: where is another granularity more accurate at the same bytes?

--what sparse
    How to keep `softmax_outlier_ratio` of the attention probabilities. Only the probabilities
    saved for the backward are pruned (everything else exact); the LoRA gradients (PEFT r=16 on
    all linears, lora_B ~ N(0, 0.01), GSM8K examples: the protocol of
    ../shared/reference/fidelity-findings.md) are compared by cosine with the exact ones.
    Variants: global top fraction of the whole map incl. the masked triangle (the reference),
    per head, per row with a fixed k = ceil(r * s_k) (masked entries count), per row with
    k = ceil(r * valid) (masked do not count), global over valid entries only.

    python benchmarks/quant_fidelity.py --model tiny      # TinyStories 260K Llama (seconds)
    python benchmarks/quant_fidelity.py --model smollm2   # SmolLM2-135M (a few minutes)

Prints markdown tables; writes quant_fidelity_<model>.csv under --out.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

import harness

from hyclora.quant import dequantize, quantize


# ---------------------------------------------------------------------------------------------
# models and text
# ---------------------------------------------------------------------------------------------
class _PieceTokenizer:
    """Greedy longest-match over a SentencePiece model's pieces, read without `sentencepiece`
    (not installed here): good enough to feed real text to the TinyStories model."""

    def __init__(self, path: Path):
        data = path.read_bytes()
        self.pieces = {}
        pos = 0
        idx = 0
        while pos < len(data):
            key, pos = self._varint(data, pos)
            field, wire = key >> 3, key & 7
            if wire == 2:
                length, pos = self._varint(data, pos)
                if field == 1:  # repeated SentencePiece pieces
                    piece = self._piece(data[pos:pos + length])
                    if piece is not None:
                        self.pieces.setdefault(piece, idx)
                    idx += 1
                pos += length
            elif wire == 0:
                _, pos = self._varint(data, pos)
            elif wire == 5:
                pos += 4
            elif wire == 1:
                pos += 8
            else:
                raise ValueError("unexpected protobuf wire type")
        self.max_len = max(len(p) for p in self.pieces)
        self.bos_token_id = 1

    @staticmethod
    def _varint(data, pos):
        out = shift = 0
        while True:
            b = data[pos]
            pos += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return out, pos

    def _piece(self, msg):
        pos = 0
        while pos < len(msg):
            key, pos = self._varint(msg, pos)
            if key & 7 == 2:
                length, pos = self._varint(msg, pos)
                if key >> 3 == 1:
                    return msg[pos:pos + length].decode("utf-8", "replace")
                pos += length
            elif key & 7 == 5:
                pos += 4
            elif key & 7 == 0:
                _, pos = self._varint(msg, pos)
            else:
                pos += 8
        return None

    def encode(self, text: str):
        s = "\u2581" + text.replace(" ", "\u2581")
        ids, i = [self.bos_token_id], 0
        while i < len(s):
            for ln in range(min(self.max_len, len(s) - i), 0, -1):
                if s[i:i + ln] in self.pieces:
                    ids.append(self.pieces[s[i:i + ln]])
                    i += ln
                    break
            else:
                for byte in s[i].encode("utf-8"):  # byte fallback pieces <0xNN>
                    ids.append(self.pieces.get(f"<0x{byte:02X}>", 0))
                i += 1
        return ids


def load_model(which: str):
    from transformers import AutoModelForCausalLM

    if which == "smollm2":
        model, tok = harness.load_smollm2("eager")
        encode = lambda t: tok(t).input_ids  # noqa: E731
    else:
        folder = harness.SHARED_DATA / "tinyllamas-stories260K" / "hf"
        if not folder.exists():
            raise SystemExit(f"{folder} is missing")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     attn_implementation="eager")
        encode = _PieceTokenizer(folder / "tokenizer.model").encode
    return model, encode


def text_batch(encode, n: int, length: int):
    """n sequences of exactly `length` tokens from GSM8K (question + worked answer), unpadded."""
    seqs, buf = [], []
    for text in harness.gsm8k_texts():
        buf += encode(text + "\n")
        while len(buf) >= length and len(seqs) < n:
            seqs.append(buf[:length])
            buf = buf[length:]
        if len(seqs) == n:
            break
    return torch.tensor(seqs)


# ---------------------------------------------------------------------------------------------
# granularity
# ---------------------------------------------------------------------------------------------
def _schemes(n: int):
    """(name, kwargs builder, extra bits/element beyond the codes) for a width-n tensor."""
    out = [("per-channel", dict(), 0.0)]
    for frac in (0.005, 1 / 32, 1 / 16):
        k = int(math.floor(n * frac))
        if k > 0:
            out.append((f"per-channel + {frac:.1%} outliers", dict(outliers=k), 16 * k / n))
    for g in (128, 64, 32):
        if g < n:
            out.append((f"per-row groups of {g}", dict(group_size=g), 64 / g))
    out.append(("per-token (group = row)", dict(group_size=n), 64 / n))
    return out


def granularity(model, ids, bits_list, csv_rows):
    errs = defaultdict(list)  # (kind, scheme, bits) -> [rel err per layer]
    extra = {}

    def measure(kind, x):
        x = x.detach().reshape(-1, x.shape[-1])
        n = x.shape[-1]
        xf = x.float()
        norm = xf.norm()
        for name, kw, ebits in _schemes(n):
            idx = None
            if "outliers" in kw:
                idx = xf.square().sum(0).topk(kw["outliers"]).indices.sort().values
            for bits in bits_list:
                q = quantize(x, bits, outlier_idx=idx, group_size=kw.get("group_size"), backend="torch")
                rel = ((dequantize(q).float() - xf).norm() / norm).item()
                errs[(kind, name, bits)].append(rel)
                extra[(kind, name, bits)] = q.nbytes * 8 / x.numel()

    hooks = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        pairs = [
            (layer.input_layernorm, "in", "X_in (norm1 input)"),
            (a.q_proj, "in", "X_n1 (q/k/v input)"),
            (a.q_proj, "out", "Q pre-RoPE"),
            (a.k_proj, "out", "K pre-RoPE"),
            (a.v_proj, "out", "V"),
            (a.o_proj, "in", "O (o_proj input)"),
            (layer.post_attention_layernorm, "in", "X_mid (norm2 input)"),
            (m.gate_proj, "in", "X_n2 (gate/up input)"),
            (m.gate_proj, "out", "G (gate out)"),
            (m.up_proj, "out", "U (up out)"),
            (m.down_proj, "in", "D (down input)"),
        ]
        for mod, where, kind in pairs:
            def hook(_m, inp, out, kind=kind, where=where):
                measure(kind, inp[0] if where == "in" else out)
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()

    kinds = list(dict.fromkeys(k for k, _, _ in errs))
    print(f"\nRelative quantisation error ||x_hat - x|| / ||x|| (mean over layers); "
          f"`bits/el` = bytes actually stored x 8 / elements")
    for bits in bits_list:
        print(f"\n{bits} bits\n")
        schemes = list(dict.fromkeys(s for k, s, b in errs if b == bits))
        print("| tensor | " + " | ".join(schemes) + " |")
        print("|---|" + "---|" * len(schemes))
        for kind in kinds:
            cells = []
            for s in schemes:
                v = errs.get((kind, s, bits))
                if v is None:
                    cells.append("-")
                    continue
                mean = sum(v) / len(v)
                cells.append(f"{mean:.4f} ({extra[(kind, s, bits)]:.2f})")
                csv_rows.append(dict(what="granularity", tensor=kind, scheme=s, bits=bits,
                                     rel_err=mean, bits_per_el=extra[(kind, s, bits)]))
            print(f"| {kind} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------
# sparse attention probabilities
# ---------------------------------------------------------------------------------------------
def _topk_mask_rows(p, k_rows):
    """Keep the k_rows[..., i] largest entries of each row (k may differ per row)."""
    order = p.argsort(-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(p.shape[-1]).expand_as(order).contiguous())
    return rank < k_rows.unsqueeze(-1)


def _topk_mask_flat(p, k, dims):
    """Keep the k largest entries over the trailing `dims` dimensions."""
    flat = p.flatten(start_dim=p.dim() - dims)
    idx = flat.topk(k, -1).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.view_as(p)


def keep_mask(variant: str, p, valid, r: float):
    b, h, s_q, s_k = p.shape
    n_valid = valid.expand_as(p).sum(-1)  # (b, h, s_q)
    pv = p.masked_fill(~valid, -1.0)  # masked entries never win over a valid one
    if variant == "exact":
        return torch.ones_like(p, dtype=torch.bool)
    if variant == "global, masked count (reference; hyclora default)":
        return _topk_mask_flat(p.unsqueeze(0), max(1, int(r * p.numel())), 4)[0]
    if variant == "per head, masked count":
        return _topk_mask_flat(p, max(1, int(r * s_q * s_k)), 2)
    if variant == "per row, k=ceil(r*s_k)":
        return _topk_mask_rows(p, torch.full((b, h, s_q), math.ceil(r * s_k - 1e-9)))
    if variant.startswith("per row, k=ceil(r*valid)"):
        rr = 2 * r if "2r" in variant else r
        return _topk_mask_rows(pv, torch.ceil(rr * n_valid - 1e-9).long()) & valid
    if variant.startswith("global over valid"):
        rr = 2 * r if "2r" in variant else r
        k = max(1, int(rr * valid.expand_as(p).sum().item()))
        return _topk_mask_flat(pv.unsqueeze(0), k, 4)[0] & valid
    raise ValueError(variant)


SPARSE_VARIANTS = [
    "exact",
    "global, masked count (reference; hyclora default)",
    "per head, masked count",
    "per row, k=ceil(r*s_k)",
    "per row, k=ceil(r*valid)",
    "per row, k=ceil(r*valid), 2r",
    "global over valid",
    "global over valid, 2r",
]


class _PrunedProbsMatmul(torch.autograd.Function):
    """O = P V with the exact P; the backward sees only the kept entries of P."""

    @staticmethod
    def forward(ctx, scores, v, keep):
        p = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype)
        ph = p * keep
        ctx.save_for_backward(ph, v)
        return p @ v

    @staticmethod
    def backward(ctx, do):
        ph, v = ctx.saved_tensors
        dv = ph.transpose(-1, -2) @ do
        dp = do @ v.transpose(-1, -2)
        ds = ph * (dp - (ph * dp).sum(-1, keepdim=True))
        return ds, dv, None


def sparse(model, ids, ratios, csv_rows, which):
    from transformers.models.llama import modeling_llama

    model = harness.add_lora(model, seed=0)
    original = modeling_llama.eager_attention_forward
    state = dict(variant="exact", r=0.05, kept=0, valid=0, slots=0)

    def attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        v = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        scores = (query @ k.transpose(2, 3)) * scaling
        s_q, s_k = scores.shape[-2:]
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                valid = attention_mask[..., :s_k]
                scores = scores.masked_fill(~valid, float("-inf"))
            else:
                m = attention_mask[..., :s_k]
                scores = scores + m
                valid = m > torch.finfo(m.dtype).min / 2
        else:  # causal without an explicit mask
            valid = torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q)[None, None]
            scores = scores.masked_fill(~valid, float("-inf"))
        with torch.no_grad():
            p = torch.softmax(scores, -1, dtype=torch.float32)
            keep = keep_mask(state["variant"], p, valid, state["r"])
        state["kept"] += int((keep & valid).sum())
        state["valid"] += int(valid.expand_as(p).sum())
        state["slots"] += p.numel()
        out = _PrunedProbsMatmul.apply(scores, v, keep.to(v.dtype))
        return out.transpose(1, 2).contiguous(), None

    def lora_grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: q.grad.detach().clone() for n, q in model.named_parameters()
                if q.grad is not None and "lora_" in n}

    modeling_llama.eager_attention_forward = attn
    try:
        model.config._attn_implementation = "eager"
        state["variant"] = "exact"
        exact = lora_grads()
        print("\nLoRA gradient cosine vs exact, only the saved attention probabilities pruned"
              f" ({which}, batch {tuple(ids.shape)})\n")
        print("| ratio r | variant | kept / valid entries | mean cosine | min cosine |")
        print("|---|---|---|---|---|")
        for r in ratios:
            for variant in SPARSE_VARIANTS:
                if variant == "exact" and r != ratios[0]:
                    continue
                state.update(variant=variant, r=r, kept=0, valid=0, slots=0)
                g = lora_grads()
                cos = torch.tensor([torch.nn.functional.cosine_similarity(
                    exact[n].flatten(), g[n].flatten(), dim=0).item() for n in exact])
                kept = state["kept"] / state["valid"]
                print(f"| {r} | {variant} | {kept:.3f} | {cos.mean():.4f} | {cos.min():.4f} |", flush=True)
                csv_rows.append(dict(what="sparse", model=which, ratio=r, variant=variant,
                                     kept_of_valid=kept, mean_cos=cos.mean().item(),
                                     min_cos=cos.min().item()))
    finally:
        modeling_llama.eager_attention_forward = original


def main(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--what", action=harness.Items, choices=("granularity", "sparse"), default=["granularity", "sparse"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--bits", action=harness.Items, item=int, choices=(2, 4, 8), default=[2, 4, 8])
    p.add_argument("--ratios", action=harness.Items, item=float, default=[0.05, 0.1])
    args = harness.parse(p, argv)
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are measured
    torch.manual_seed(0)
    model, encode = load_model(args.model)
    ids = text_batch(encode, args.batch, args.seq)
    rows = []
    if "granularity" in args.what:
        granularity(model, ids, args.bits, rows)
    if "sparse" in args.what:
        sparse(model, ids, args.ratios, rows, args.model)
    fields = sorted({k for r in rows for k in r})
    harness.write_csv(harness.out_dir(args) / f"quant_fidelity_{args.model}.csv", rows, fields,
                      env=harness.environment("cpu"))


if __name__ == "__main__":
    main()
