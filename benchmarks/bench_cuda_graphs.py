"""tokens/s and peak memory of hyclora with CUDA graphs of its decoder layers, against the same
step eager and PEFT LoRA, in one process (hyclora.cuda_graphs).

Llama-2-7B-shaped model (hidden 4096, FFN 11008, 32 layers, 32 heads, vocab 32000), random bf16
weights, PEFT LoRA r=16 on all seven linears, sdpa (the model builder of
bench_memory_throughput.py). Per shape (default 4x512 and 1x4096), three variants (five with
``--lora_ops_ab``: the eager step again with ``hyclora.ops.lora.FUSED_LORA_OPS = False``, and with
``hyclora.ops.lora_kernels.EAGER_MIN_TOKENS = 0``):

* ``PEFT LoRA``;
* ``hyclora full_fuse 2-bit eager``: ``intra_inter_full_fuse``, q_bit 2 (``--q_bit``), defaults otherwise;
* ``... graphed``: the same after ``graph_decoder_layers(model, sample_shape=(bs, seq))``; the
  statistics calibrate eagerly (``iteration_threshold`` steps), the next step captures.

One step = forward + backward (no optimizer), ``zero_grad(set_to_none=True)`` after it. tok/s is
the median over ``--steps`` timed steps after the warm-up; "peak above weights" is the peak
allocated during the timed steps minus what was allocated before the variant's first step
(weights + LoRA), so the graphs' memory pool counts; "resident" is what stays allocated between
steps (the pool: static inputs/outputs/gradient buffers and the saved compressed activations).
"capture peak" is the peak of the step that captured. The gradient check runs one graphed and
one eager step (``graphs.enabled = False``) on the same batch with the same frozen statistics
and reports the largest relative L2 difference over the LoRA gradients and the loss difference;
every hyclora row also gives its gradients' distance from PEFT's exact ones (no compression) on
the same batch: the compression error, against which the paths' rounding differences compare.

    python benchmarks/bench_cuda_graphs.py                 # H200: both shapes, ~3-5 minutes
    python benchmarks/bench_cuda_graphs.py --smoke         # CPU, tiny model, eager only
    python benchmarks/bench_cuda_graphs.py --shapes 1x4096 --liger   # + Liger's kernels, last (issue 4's stretch)

Prints a markdown table and writes cuda_graphs.csv under --out (default $OUT or ./out).
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
from bench_common import lora_ops, write_csv  # noqa: E402

from bench_memory_throughput import build_model, sync  # noqa: E402

from hyclora import HyCLoRAConfig, apply_hyclora, revert_hyclora  # noqa: E402
from hyclora.compat import checkpointing_disable, checkpointing_enable  # noqa: E402

NAN = float("nan")


def _alloc(device):
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def _reset(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def _lora_grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def _max_rel(a, b):
    """The largest relative L2 difference over the gradients of ``b``."""
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b)


def measure(model, ids, device, steps, warmup, before_timing=None):
    """Warm-up steps, then ``steps`` timed ones: tok/s (median), peak above the memory allocated
    before the first step, memory resident between steps; ``before_timing()`` runs after warm-up."""
    _reset(device)
    static = _alloc(device)
    for _ in range(warmup):
        _step(model, ids)
        model.zero_grad(set_to_none=True)
    if before_timing is not None:
        before_timing()
    sync(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        _step(model, ids)
        model.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    gc.collect()
    peak = (torch.cuda.max_memory_allocated() - static) / 2**30 if device == "cuda" else NAN
    resident = (_alloc(device) - static) / 2**30 if device == "cuda" else NAN
    return dict(tok_s=ids.numel() / statistics.median(times), step_ms=1e3 * statistics.median(times),
                peak_gib=peak, resident_gib=resident)


def run_shape(args, device, dtype, bs, seq):
    model, cfg = build_model(args, device, dtype, args.attn)
    ids = torch.randint(0, cfg.vocab_size, (bs, seq), device=device)
    hcfg = HyCLoRAConfig(layer_type="intra_inter_full_fuse", q_bit=args.q_bit)
    calib = hcfg.iteration_threshold + 1
    rows = []

    def row(name, **values):
        r = dict(shape=f"{bs}x{seq}", variant=name, tok_s=NAN, step_ms=NAN, peak_gib=NAN, resident_gib=NAN,
                 capture_peak_gib=NAN, grad_max_rel_diff=NAN, grad_rel_diff_vs_peft=NAN, loss_abs_diff=NAN,
                 replays=NAN, note="")
        r.update(values)
        rows.append(r)
        print(f"{r['shape']:8s} {name:34s} {r['tok_s']:9.0f} tok/s  peak {r['peak_gib']:7.2f} GiB  "
              f"resident {r['resident_gib']:6.2f} GiB  grad diff {r['grad_max_rel_diff']:.2e}  {r['note']}", flush=True)

    try:
        row("PEFT LoRA", **measure(model, ids, device, args.steps, args.warmup))
    except Exception as exc:  # one broken variant must not lose the others
        row("PEFT LoRA", note=f"FAILED {type(exc).__name__}: {exc}"[:300])
    # the exact LoRA gradients (no compression) of the batch every variant steps on: each hyclora
    # row reports its distance from them (the compression error, which the LoRA paths' rounding
    # differences must stay far below)
    _step(model, ids)
    exact = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    # the issue's second baseline, HF gradient checkpointing (non-reentrant), in the same process
    checkpointing_enable(model, use_reentrant=False)
    try:
        row("PEFT LoRA + GC", **measure(model, ids, device, args.steps, args.warmup))
    except Exception as exc:
        row("PEFT LoRA + GC", note=f"FAILED {type(exc).__name__}: {exc}"[:300])
    finally:
        checkpointing_disable(model)
        model.zero_grad(set_to_none=True)

    apply_hyclora(model, hcfg)
    try:
        result = measure(model, ids, device, args.steps, calib + args.warmup)
        _step(model, ids)
        row(f"hyclora full_fuse {args.q_bit}-bit eager", **result, grad_rel_diff_vs_peft=_max_rel(_lora_grads(model), exact))
        model.zero_grad(set_to_none=True)
    except Exception as exc:
        row(f"hyclora full_fuse {args.q_bit}-bit eager", note=f"FAILED {type(exc).__name__}: {exc}"[:300])
    revert_hyclora(model)
    model.zero_grad(set_to_none=True)
    if args.lora_ops_ab:
        # the same eager step with the fused LoRA ops off (op by op, as intra_inter), and with their
        # Triton kernels launched at any token count (by default only under graph capture); one
        # apply_hyclora for both, so they share the frozen statistics the first one calibrated
        ab_grads = {}
        apply_hyclora(model, hcfg)
        warmup = calib + args.warmup
        try:
            for name, setting in ((f"hyclora full_fuse {args.q_bit}-bit eager, LoRA op by op", "op_by_op"),
                                  (f"hyclora full_fuse {args.q_bit}-bit eager, LoRA kernels always", "kernels")):
                try:
                    with lora_ops(setting):
                        result = measure(model, ids, device, args.steps, warmup)
                        warmup = args.warmup  # calibrated by the first setting
                        _step(model, ids)
                        ab_grads[name] = _lora_grads(model)
                        model.zero_grad(set_to_none=True)
                    note = ""
                    if len(ab_grads) == 2:  # same statistics: only the LoRA paths' roundings differ
                        ref, got = ab_grads.values()
                        note = f"LoRA grads vs op by op (same statistics): max rel {_max_rel(got, ref):.2e}"
                    row(name, **result, grad_rel_diff_vs_peft=_max_rel(ab_grads[name], exact), note=note)
                except Exception as exc:
                    row(name, note=f"FAILED {type(exc).__name__}: {exc}"[:300])
        finally:
            revert_hyclora(model)
            model.zero_grad(set_to_none=True)
        del ab_grads

    name = f"hyclora full_fuse {args.q_bit}-bit graphed"
    if device != "cuda":
        row(name, note="skipped: CUDA graphs need a CUDA device")
    else:
        _graphed_row(args, device, model, ids, hcfg, calib, cfg, row, exact)
    if args.liger:
        _liger_row(args, device, model, ids, row)
    del model
    _reset(device)
    return rows


def _liger_row(args, device, model, ids, row):
    """Issue 4's stretch baseline: Liger's kernels (RoPE, RMSNorm, SwiGLU, fused linear CE, as
    ../shared/gpu/README.md measured them) on the same PEFT model. Liger patches transformers'
    Llama classes for the whole process, hence last, and --liger takes one shape."""
    name = "Liger (rope, rms_norm, swiglu, fused linear CE)"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except Exception as exc:  # ImportError, or a CUDA/Triton check failing at import
        row(name, note=f"skipped: liger_kernel does not import ({type(exc).__name__}: {exc})"[:300])
        return
    apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model.get_base_model())
    try:
        row(name, **measure(model, ids, device, args.steps, args.warmup))
    except Exception as exc:
        row(name, note=f"FAILED {type(exc).__name__}: {exc}"[:300])


def _graphed_row(args, device, model, ids, hcfg, calib, cfg, row, exact):
    name = f"hyclora full_fuse {args.q_bit}-bit graphed"
    from hyclora.cuda_graphs import graph_decoder_layers

    apply_hyclora(model, hcfg)  # fresh statistics: calibrate, then capture
    graphs = None
    try:
        _reset(device)
        static = _alloc(device)
        graphs = graph_decoder_layers(model, sample_shape=tuple(ids.shape), num_warmup_iters=args.graph_warmup)
        for _ in range(calib - 1):  # calibration (eager)
            _step(model, ids)
            model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        _step(model, ids)  # captures, then replays
        model.zero_grad(set_to_none=True)
        sync(device)
        capture_peak = (torch.cuda.max_memory_allocated() - static) / 2**30
        if not graphs.captured:
            raise RuntimeError(f"no capture after calibration: {dict(graphs.counts)}")
        replays = {}
        result = measure(model, ids, device, args.steps, args.warmup,
                         before_timing=lambda: replays.setdefault("before", graphs.counts["replay"]))
        replays = graphs.counts["replay"] - replays["before"]
        # peak/resident relative to the weights (measure() took its baseline after the capture)
        after = _alloc(device)
        result["resident_gib"] = (after - static) / 2**30
        result["peak_gib"] = (torch.cuda.max_memory_allocated() - static) / 2**30
        # gradient check: same batch, same frozen statistics, graphed then eager; the eager steps
        # launch the fused LoRA kernels as the capture did (at any token count)
        from hyclora.ops.lora_kernels import launches_are_free

        g_loss = _step(model, ids)
        g_grads = _lora_grads(model)
        model.zero_grad(set_to_none=True)
        graphs.enabled = False
        with launches_are_free():
            e_loss = _step(model, ids)
            e_grads = _lora_grads(model)
            model.zero_grad(set_to_none=True)
            # the same eager step once more: the run-to-run floor (atomics in the attention backward)
            _step(model, ids)
            e2_grads = _lora_grads(model)
            model.zero_grad(set_to_none=True)
        graphs.enabled = True

        diff = _max_rel(g_grads, e_grads)
        floor = _max_rel(e2_grads, e_grads)
        expected = args.steps * cfg.num_hidden_layers
        note = "" if replays == expected else f"only {replays}/{expected} layer calls replayed: {dict(graphs.counts)}"
        note = (note + f" eager vs eager again: {floor:.2e}").strip()
        row(name, **result, capture_peak_gib=capture_peak, grad_max_rel_diff=diff,
            grad_rel_diff_vs_peft=_max_rel(g_grads, exact),
            loss_abs_diff=abs(float(g_loss) - float(e_loss)), replays=replays, note=note)
    except Exception as exc:
        row(name, note=f"FAILED {type(exc).__name__}: {exc}"[:300])
    finally:
        if graphs is not None:
            print(f"  {graphs.summary()}", flush=True)
            graphs.remove()
        revert_hyclora(model)
        model.zero_grad(set_to_none=True)
        _reset(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, eager variants only")
    parser.add_argument("--shapes", default="4x512,1x4096", help="comma-separated BSxSEQ")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (after calibration)")
    parser.add_argument("--graph_warmup", type=int, default=3, help="make_graphed_callables warm-up iterations")
    parser.add_argument("--liger", action="store_true",
                        help="also time Liger's kernels on the same model, last (it patches transformers "
                             "process-wide); one shape per run")
    parser.add_argument("--lora_ops_ab", action="store_true",
                        help="also time the eager step with hyclora.ops.lora.FUSED_LORA_OPS = False")
    parser.add_argument("--q_bit", type=int, default=2, choices=[2, 4, 8], help="hyclora's q_bit")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if args.smoke:
        args.shapes, args.steps, args.warmup = "2x64", 1, 0
    if device != "cuda":
        print("CUDA not available (or --smoke): the graphed variant is skipped, eager variants only.", flush=True)
    if args.liger and len(args.shapes.split(",")) != 1:
        parser.error("--liger patches transformers for the whole process: give one --shapes entry per run")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"

    rows = []
    for shape in args.shapes.split(","):
        bs, seq = (int(v) for v in shape.split("x"))
        rows += run_shape(args, device, dtype, bs, seq)

    print(f"\n{gpu}, Llama-2-7B shape{' (smoke: tiny)' if args.smoke else ''}, LoRA r=16 x 7 linears, {args.attn}, "
          f"median of {args.steps} steps, hyclora q_bit {args.q_bit}")
    print("| bs x seq | variant | tok/s | x PEFT | x PEFT + GC | x eager hyclora | step ms | peak GiB above weights "
          "| resident GiB | capture-step peak GiB | LoRA grad max rel diff vs eager | LoRA grad max rel diff vs PEFT (exact) | loss diff "
          "| note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = [x for x in rows if x["shape"] == r["shape"]]
        peft = next((x["tok_s"] for x in same if x["variant"] == "PEFT LoRA"), NAN)
        gc_tok_s = next((x["tok_s"] for x in same if x["variant"] == "PEFT LoRA + GC"), NAN)
        eager = next((x["tok_s"] for x in same if x["variant"] == f"hyclora full_fuse {args.q_bit}-bit eager"), NAN)
        print(f"| {r['shape']} | {r['variant']} | {r['tok_s']:.0f} | {r['tok_s'] / peft:.2f} | "
              f"{r['tok_s'] / gc_tok_s:.2f} | {r['tok_s'] / eager:.2f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {r['resident_gib']:.2f} | "
              f"{r['capture_peak_gib']:.2f} | {r['grad_max_rel_diff']:.2e} | {r['grad_rel_diff_vs_peft']:.2e} | {r['loss_abs_diff']:.2e} | {r['note']} |")
        r["gpu"] = gpu
    write_csv(out_dir / "cuda_graphs.csv", rows)


if __name__ == "__main__":
    main()
