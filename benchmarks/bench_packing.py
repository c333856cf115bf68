"""Non-padding tokens/s of SFT batches padded vs packed (padding-free), eager and with CUDA graphs.

A random-weight Llama (Llama-2-7B shape by default, bf16, sdpa), PEFT LoRA r=16 on all seven
linears, hyclora with the hyclora arguments (default ``intra_inter_full_fuse``, ``--q_bit 2``).
Documents of ``--min_doc .. --max_doc`` tokens (uniform, seeded) are packed first-fit into
``--rows`` rows of ``--tokens`` tokens (``hyclora.data.PackedBatchCollator``: fixed shape, one
``cu_seq_lens_q`` buffer of fixed capacity); the padded variant gets the same documents of each
step, one per row, right-padded to the step's longest (``attention_mask``, as
``hyclora.data.CausalLMCollator``). Every step takes the next batch, so the packed document
boundaries change from step to step. Variants:

* ``padded``: eager (a padding mask keeps the layers eager; shapes change with the longest document);
* ``packed (mask)``: the documents' exact block-diagonal causal mask through sdpa (what runs where no
  varlen kernel is; forced here by handing the layers no varlen kernel);
* ``packed (varlen)``: ``flash_attn_varlen_func`` (else ``torch.nn.attention.varlen``) over the
  ``cu_seqlens`` buffer; skipped where neither runs (CPU, fp32);
* each packed variant eager and ``graphed`` (``hyclora.cuda_graphs``; CUDA only): one capture, the
  later batches replay it.

One step = forward + backward (no optimizer). tok/s counts the documents' tokens only (no padding);
the median over --steps timed steps after --warmup (plus the hyclora calibration steps). The
``padding`` column is the fraction of the batch's tokens that are padding.

    python benchmarks/bench_packing.py                       # GPU
    python benchmarks/bench_packing.py --tokens 8192 --max_doc 2048
    python benchmarks/bench_packing.py --smoke               # CPU, tiny model: checks that it runs

Prints a markdown table and writes packing.csv under --out.
"""

from __future__ import annotations

import contextlib
import random
from unittest import mock

import torch

import harness

from hyclora.data.packing import PackedBatchCollator
from hyclora.ops import attention

NAN = harness.NAN


def make_batches(args, vocab: int, count: int):
    """``count`` steps' documents, each step packed first-fit into ``--rows`` rows of ``--tokens``."""
    rng = random.Random(args.seed)
    steps = []
    for _ in range(count):
        rows, lengths = [[] for _ in range(args.rows)], [0] * args.rows
        while True:
            n = rng.randint(args.min_doc, min(args.max_doc, args.tokens))
            fits = [r for r in range(args.rows) if lengths[r] + n <= args.tokens]
            if not fits:
                break
            r = fits[0]
            rows[r].append([rng.randrange(3, vocab) for _ in range(n)])
            lengths[r] += n
        steps.append(rows)
    return steps


def max_documents(args) -> int:
    return args.tokens // args.min_doc + 1


def packed_batch(args, rows, device):
    features = [{"input_ids": sum(docs, []), "seq_lengths": [len(d) for d in docs]} for docs in rows]
    batch = PackedBatchCollator(args.tokens, 0, max_documents(args), rows=args.rows)(features)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def padded_batch(rows, device):
    docs = [d for row in rows for d in row]
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = torch.tensor(d)
        mask[i, :len(d)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@contextlib.contextmanager
def no_varlen_kernel():
    """The layers see no varlen kernel: packed documents run through their block-diagonal mask."""
    with mock.patch.object(attention, "varlen_kernel", lambda q: None):
        yield


def run(args, device, dtype):
    model, cfg = harness.build_model(args, device, dtype, max_positions=max(4096, args.tokens))
    hcfg = harness.hyclora_config(args)
    calib = hcfg.iteration_threshold + 1
    total = calib + args.warmup + args.steps + 2
    steps = make_batches(args, cfg.vocab_size, total)
    real = sum(len(d) for row in steps[0] for d in row)
    probe = torch.empty(1, 1, 1, cfg.hidden_size // cfg.num_attention_heads, device=device, dtype=dtype)
    has_varlen = attention.varlen_kernel(probe) is not None
    rows = []

    def row(name, graphed, batches, result=None, note="", replays=NAN):
        tokens = [int(b["input_ids"].numel()) for b in batches]
        reals = [sum(len(d) for r in s for d in r) for s in steps[:len(batches)]]
        padding = 1 - sum(reals) / sum(tokens)
        tok_s = NAN if result is None else (sum(reals) / len(reals)) / result["step_s"]
        r = dict(variant=name, graphed=graphed, real_tok_s=tok_s,
                 step_ms=NAN if result is None else 1e3 * result["step_s"], padding=padding,
                 replays=replays, note=note)
        rows.append(r)
        print(f"{name:18s} graphed={graphed!s:5s} {tok_s:9.0f} tok/s  padding {padding:.2f}  {note}", flush=True)

    def timed(batches):
        it = iter(batches)

        def step():
            batch = next(it)
            loss = model(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()

        return harness.measure(step, device, steps=args.steps, warmup=calib + args.warmup,
                               tokens=real)

    padded = [padded_batch(s, device) for s in steps]
    packed = [packed_batch(args, s, device) for s in steps]
    with harness.variant(model, hcfg):
        row("padded", False, padded, timed(padded))
    for name, kernel in (("packed (mask)", no_varlen_kernel), ("packed (varlen)", contextlib.nullcontext)):
        for graphed in (False, True):
            if name.endswith("(varlen)") and not has_varlen:
                row(name, graphed, packed, note="skipped: no varlen kernel (flash_attn or torch's) for this "
                                                 "device and dtype")
                continue
            if graphed and device != "cuda":
                row(name, graphed, packed, note="skipped: CUDA graphs need a CUDA device")
                continue
            try:
                with harness.variant(model, hcfg), kernel():
                    graphs = None
                    if graphed:
                        from hyclora.cuda_graphs import graph_decoder_layers

                        graphs = graph_decoder_layers(model, sample_shape=(args.rows, args.tokens))
                    try:
                        result = timed(packed)
                    finally:
                        if graphs is not None:
                            replays = graphs.counts.get("replay", 0)
                            note = graphs.summary()
                            graphs.remove()
                    if graphs is None:
                        row(name, graphed, packed, result)
                    else:
                        row(name, graphed, packed, result, note=note, replays=replays)
            except Exception as exc:  # one broken variant must not lose the others
                row(name, graphed, packed, note=f"FAILED {type(exc).__name__}: {exc}"[:300])
    del model
    harness.clear(device)
    return rows


def main(argv=None):
    p = harness.parser(__doc__, "model", "steps", "lora", "hyclora", "smoke", q_bit=2,
                       layer_type="intra_inter_full_fuse")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=1, help="packed rows per step")
    p.add_argument("--min_doc", type=int, default=64, help="shortest document (tokens)")
    p.add_argument("--max_doc", type=int, default=1024, help="longest document (tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths and tokens")
    args = harness.parse(p, argv, tokens=128, min_doc=8, max_doc=48, steps=2, warmup=1,
                         layer_type="intra_inter", q_bit=4, iteration_threshold=1)
    if args.min_doc < 1 or args.max_doc < args.min_doc:
        raise SystemExit(f"--min_doc {args.min_doc} / --max_doc {args.max_doc}: expected 1 <= min_doc <= max_doc")
    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    rows = run(args, device, dtype)
    env = harness.environment(device)
    print("\n".join(harness.markdown_table(
        ["variant", "graphed", "non-padding tok/s", "step ms", "padding", "replays", "note"],
        [(r["variant"], r["graphed"], harness.fmt(r["real_tok_s"], ".0f"), harness.fmt(r["step_ms"], ".1f"),
          harness.fmt(r["padding"], ".2f"), harness.fmt(r["replays"], ".0f"), r["note"]) for r in rows])))
    print(harness.env_line(env))
    harness.write_csv(harness.out_dir(args) / "packing.csv", rows, env=env)
    return rows


if __name__ == "__main__":
    main()
