"""Peak memory and time of the LM head + cross-entropy (forward + backward) at big vocabularies:
what the chunked loss (``hyclora.ops.chunked_ce``, ``--chunked_lm_loss`` in the examples, the
loss of ``CausalLMChunkedLoss``) keeps out of memory.

Per vocabulary of --vocabs (default Llama-2 32000, Qwen2.5/3 152064, Gemma 3 262208) at
--hidden and --bs x --seq (default 4 x 1024), bf16 on a GPU:

* ``HF``: ``logits = lm_head(h)`` then ``F.cross_entropy(logits.float(), labels)``, as
  transformers' ``ForCausalLMLoss`` computes it (the upcast logits and their gradient are the
  peak);
* ``hyclora chunked``: ``chunked_cross_entropy(h, W, labels)``, logits one token chunk at a time;
* ``Liger fused linear CE`` (when liger_kernel imports), the peer doing the same.

"peak GiB" is the peak allocated during the step minus what was allocated before it (hidden
states, weight, labels); the LM head weight is frozen as in LoRA (no weight gradient), the hidden
states need one. Median of --steps after --warmup.

    python benchmarks/bench_lm_loss.py                    # GPU
    python benchmarks/bench_lm_loss.py --smoke            # CPU, small
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import harness

from hyclora.ops.chunked_ce import chunked_cross_entropy


def hf_loss(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float().flatten(0, -2), labels.flatten())


def liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # ImportError, or its CUDA/Triton checks failing at import
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, labels: loss(w, h.flatten(0, -2), labels.flatten())


def main(argv=None):
    p = harness.parser(__doc__, "model", "batch", "steps", "smoke", steps=5, warmup=2)
    p.add_argument("--hidden", type=int, default=3584, help="hidden size (default Qwen2.5-7B's)")
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 152064, 262208])
    harness.set_defaults(p, bs=4, seq=1024)
    args = harness.parse(p, argv, hidden=64, vocabs=[512, 2048], bs=2, seq=32, steps=1, warmup=0)
    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    variants = [("HF (full logits, fp32 upcast)", hf_loss),
                ("hyclora chunked", lambda h, w, labels: chunked_cross_entropy(h, w, labels))]
    liger = liger_loss() if device == "cuda" else None
    if liger is not None:
        variants.append(("Liger fused linear CE", liger))
    rows = []
    for vocab in args.vocabs:
        gen = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(vocab, args.hidden, device=device, generator=gen) * 0.02).to(dtype)
        h = torch.randn(args.bs, args.seq, args.hidden, device=device, generator=gen).to(dtype).requires_grad_()
        labels = torch.randint(0, vocab, (args.bs, args.seq), device=device, generator=gen)
        ref_grad = None
        for name, fn in variants:
            def step():
                h.grad = None
                loss = fn(h, w, labels)
                loss.backward()
                return loss.detach()

            harness.clear(device)
            m = harness.measure(step, device, steps=args.steps, warmup=args.warmup, tokens=h.shape[0] * h.shape[1])
            grad = h.grad.float()
            if ref_grad is None:
                ref_grad = grad.clone()
            rel = float((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
            peak = (m["peak"] - m["timed_start"]) / harness.GIB if device == "cuda" else harness.NAN
            rows.append(dict(vocab=vocab, variant=name, peak_gib=peak, step_ms=1e3 * m["step_s"],
                             tok_s=m["tok_s"], loss=float(m["last"]), grad_rel_diff_vs_hf=rel))
            print(f"vocab {vocab:6d} {name:32s} peak {peak:6.2f} GiB  {1e3 * m['step_s']:7.2f} ms  "
                  f"loss {float(m['last']):.4f}  dh rel diff {rel:.1e}", flush=True)
        del w, h, labels, ref_grad
        harness.clear(device)
    env = harness.environment(device)
    print(f"\n{harness.env_line(env)}; hidden {args.hidden}, {args.bs} x {args.seq} tokens, {dtype}, "
          f"median of {args.steps} steps")
    hf = {r["vocab"]: r["peak_gib"] for r in rows if r["variant"].startswith("HF")}
    print("\n".join(harness.markdown_table(
        ["vocab", "variant", "peak GiB", "x HF peak", "step ms", "loss", "dh rel diff vs HF"],
        [(r["vocab"], r["variant"], f"{r['peak_gib']:.2f}", f"{r['peak_gib'] / hf[r['vocab']]:.3f}",
          f"{r['step_ms']:.2f}", f"{r['loss']:.4f}", f"{r['grad_rel_diff_vs_hf']:.1e}") for r in rows])))
    harness.write_csv(harness.out_dir(args) / "lm_loss.csv", rows, env=env)
    return rows


if __name__ == "__main__":
    main()
