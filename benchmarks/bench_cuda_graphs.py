"""tokens/s and peak memory of hyclora with CUDA graphs of its decoder layers, against the same
step eager and PEFT LoRA, in one process (hyclora.cuda_graphs).

A random-weight Llama (Llama-2-7B shape by default, bf16), PEFT LoRA r=16 on all seven linears,
sdpa. Per shape of --shapes, the variants:

* ``PEFT LoRA`` and ``PEFT LoRA + GC`` (HF gradient checkpointing, non-reentrant);
* ``hyclora full_fuse 2-bit eager``: the hyclora arguments (default ``intra_inter_full_fuse``,
  ``--q_bit 2``);
* with ``--lora_ops_ab``, the same eager step with the LoRA terms op by op
  (``--fused_lora_ops false``) and with the Triton LoRA kernels launched at any token count
  (``--lora_kernels_min_tokens 0``), on the same calibration statistics;
* ``... graphed``: the same after ``graph_decoder_layers(model, sample_shape=(bs, seq))``; the
  statistics calibrate eagerly (``iteration_threshold`` steps), the next step captures;
* with ``--liger``, Liger's kernels on the same PEFT model, last (they patch transformers
  process-wide; one shape per run).

One step = forward + backward (no optimizer), ``zero_grad(set_to_none=True)`` after it. tok/s is
the median over --steps timed steps after the warm-up; "peak above weights" is the peak
allocated during the timed steps minus what was allocated before the variant's first step
(weights + LoRA), so the graphs' memory pool counts; "resident" is what stays allocated between
steps (the pool: static inputs/outputs/gradient buffers and the saved compressed activations).
"capture peak" is the peak of the step that captured. The gradient check runs one graphed and
one eager step (``graphs.enabled = False``) on the same batch with the same frozen statistics
and reports the largest relative L2 difference over the LoRA gradients and the loss difference;
every hyclora row also gives its gradients' distance from PEFT's exact ones (no compression) on
the same batch: the compression error, against which the paths' rounding differences compare.

    python benchmarks/bench_cuda_graphs.py                 # GPU: both shapes
    python benchmarks/bench_cuda_graphs.py --smoke         # CPU, tiny model, eager only
    python benchmarks/bench_cuda_graphs.py --shapes 1x4096 --liger   # + Liger's kernels, last

Prints a markdown table and writes cuda_graphs.csv under --out.
"""

from __future__ import annotations

import dataclasses
import tempfile

import torch

import harness

from hyclora import apply_hyclora, revert_hyclora
from hyclora.integrations.longseq import CausalLMChunkedLoss

NAN = harness.NAN


def _lora_grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def _max_rel(a, b):
    """The largest relative L2 difference over the gradients of ``b``."""
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b)


def _grads_of_one_step(model, ids, loss_of=None):
    loss = harness.lm_step(model, ids, loss_of)
    grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    return loss, grads


def _label(hcfg) -> str:
    return f"hyclora {hcfg.layer_type.replace('intra_inter_full_fuse', 'full_fuse')} {hcfg.q_bit}-bit"


def run_shape(args, device, dtype, bs, seq):
    model, cfg = harness.build_model(args, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (bs, seq), device=device)
    hcfg = harness.hyclora_config(args)
    calib = hcfg.iteration_threshold + 1
    rows = []
    # hyclora's rows with its chunked LM loss (no (tokens, vocab) logits), what Liger's fused linear
    # cross-entropy does for its row
    loss_of = CausalLMChunkedLoss(model) if args.chunked_loss else None

    def row(name, **values):
        r = dict(shape=f"{bs}x{seq}", variant=name, tok_s=NAN, step_ms=NAN, peak_gib=NAN, resident_gib=NAN,
                 capture_peak_gib=NAN, grad_max_rel_diff=NAN, grad_rel_diff_vs_peft=NAN, loss_abs_diff=NAN,
                 replays=NAN, note="")
        r.update(values)
        rows.append(r)
        print(f"{r['shape']:8s} {name:34s} {r['tok_s']:9.0f} tok/s  peak {r['peak_gib']:7.2f} GiB  "
              f"resident {r['resident_gib']:6.2f} GiB  grad diff {r['grad_max_rel_diff']:.2e}  {r['note']}", flush=True)

    def failed(name, exc):  # one broken variant must not lose the others
        row(name, note=f"FAILED {type(exc).__name__}: {exc}"[:300])

    for name, checkpointing in (("PEFT LoRA", False), ("PEFT LoRA + GC", True)):
        try:
            with harness.variant(model, checkpointing=checkpointing):
                row(name, **harness.time_steps(model, ids, device, args.steps, args.warmup))
        except Exception as exc:
            failed(name, exc)
        if not checkpointing:
            # the exact LoRA gradients (no compression) of the batch every variant steps on: each
            # hyclora row reports its distance from them (the compression error, which the LoRA
            # paths' rounding differences must stay far below)
            _, exact = _grads_of_one_step(model, ids)

    name = f"{_label(hcfg)} eager"
    try:
        with harness.variant(model, hcfg):
            result = harness.time_steps(model, ids, device, args.steps, calib + args.warmup, loss_of=loss_of)
            row(name, **result, grad_rel_diff_vs_peft=_max_rel(_grads_of_one_step(model, ids, loss_of)[1], exact))
    except Exception as exc:
        failed(name, exc)
    if args.lora_ops_ab:
        _lora_ops_rows(args, device, model, ids, hcfg, calib, row, failed, exact)
    name = f"{_label(hcfg)} graphed"
    if device != "cuda":
        row(name, note="skipped: CUDA graphs need a CUDA device")
    else:
        _graphed_row(args, device, model, ids, hcfg, calib, cfg, row, failed, exact, loss_of)
    if args.liger:
        _liger_row(args, device, model, ids, row, failed)
    del model
    harness.clear(device)
    return rows


def _lora_ops_rows(args, device, model, ids, hcfg, calib, row, failed, exact):
    """The eager step with the LoRA terms op by op (as the other layer types compute them), then
    with the Triton LoRA kernels launched at any token count (by default only under graph
    capture). The second runs on the statistics the first calibrated (saved and loaded), so
    their gradients differ only by the LoRA paths' roundings."""
    from hyclora.training import load_hyclora_state, save_hyclora_state

    grads = {}
    settings = ((f"{_label(hcfg)} eager, LoRA op by op", dataclasses.replace(hcfg, fused_lora_ops=False)),
                (f"{_label(hcfg)} eager, LoRA kernels always", dataclasses.replace(hcfg, lora_kernels_min_tokens=0)))
    with tempfile.TemporaryDirectory() as state_dir:
        for name, config in settings:
            try:
                with harness.variant(model, config):
                    if grads:
                        load_hyclora_state(model, state_dir)
                    result = harness.time_steps(model, ids, device, args.steps, args.warmup + (0 if grads else calib))
                    grads[name] = _grads_of_one_step(model, ids)[1]
                    if len(grads) == 1:
                        save_hyclora_state(model, state_dir)
                note = ""
                if len(grads) == 2:
                    ref, got = grads.values()
                    note = f"LoRA grads vs op by op (same statistics): max rel {_max_rel(got, ref):.2e}"
                row(name, **result, grad_rel_diff_vs_peft=_max_rel(grads[name], exact), note=note)
            except Exception as exc:
                failed(name, exc)


def _liger_row(args, device, model, ids, row, failed):
    """Liger's kernels (RoPE, RMSNorm, SwiGLU, fused linear CE) on the same PEFT model. Liger
    patches transformers' Llama classes for the whole process, hence last, and --liger takes one
    shape."""
    import inspect

    base = model.get_base_model()
    name = "Liger (rope, rms_norm, swiglu/geglu, fused linear CE)"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as exc:  # ImportError, or a CUDA/Triton check failing at import
        row(name, note=f"skipped: liger_kernel does not import ({type(exc).__name__}: {exc})"[:300])
        return
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(base.config.model_type)
    if apply is None:
        row(name, note=f"skipped: Liger has no patch for {base.config.model_type}")
        return
    wanted = dict(rope=True, swiglu=True, geglu=True, rms_norm=True, cross_entropy=False,
                  fused_linear_cross_entropy=True, model=base)
    accepted = inspect.signature(apply).parameters
    apply(**{k: v for k, v in wanted.items() if k in accepted})
    try:
        row(name, **harness.time_steps(model, ids, device, args.steps, args.warmup))
    except Exception as exc:
        failed(name, exc)


def _graphed_row(args, device, model, ids, hcfg, calib, cfg, row, failed, exact, loss_of=None):
    from hyclora.cuda_graphs import graph_decoder_layers

    name = f"{_label(hcfg)} graphed"
    # the gradient check's eager steps launch the Triton LoRA kernels as the capture did (at any
    # token count); the graphed steps replay what was captured either way
    apply_hyclora(model, dataclasses.replace(hcfg, lora_kernels_min_tokens=0))  # fresh statistics
    graphs = None
    try:
        harness.clear(device)
        harness.reset_peak(device)
        static = harness.allocated(device)
        graphs = graph_decoder_layers(model, sample_shape=tuple(ids.shape), num_warmup_iters=args.graph_warmup)
        for _ in range(calib - 1):  # calibration (eager)
            harness.lm_step(model, ids, loss_of)
            model.zero_grad(set_to_none=True)
        harness.reset_peak(device)
        harness.lm_step(model, ids, loss_of)  # captures, then replays
        model.zero_grad(set_to_none=True)
        harness.sync(device)
        capture_peak = (harness.max_allocated(device) - static) / harness.GIB
        if not graphs.captured:
            raise RuntimeError(f"no capture after calibration: {dict(graphs.counts)}")
        replays = {}
        result = harness.time_steps(model, ids, device, args.steps, args.warmup, loss_of=loss_of,
                                    before_timing=lambda: replays.setdefault("before", graphs.counts["replay"]))
        replays = graphs.counts["replay"] - replays["before"]
        # peak/resident relative to the weights (time_steps() took its baseline after the capture)
        result["resident_gib"] = (harness.allocated(device) - static) / harness.GIB
        result["peak_gib"] = (harness.max_allocated(device) - static) / harness.GIB
        # gradient check: same batch, same frozen statistics, graphed then eager twice (the second
        # eager step: the run-to-run floor, atomics in the attention backward)
        g_loss, g_grads = _grads_of_one_step(model, ids, loss_of)
        graphs.enabled = False
        e_loss, e_grads = _grads_of_one_step(model, ids, loss_of)
        e2_grads = _grads_of_one_step(model, ids, loss_of)[1]
        graphs.enabled = True

        expected = args.steps * cfg.num_hidden_layers
        note = "" if replays == expected else f"only {replays}/{expected} layer calls replayed: {dict(graphs.counts)}"
        note = (note + f" eager vs eager again: {_max_rel(e2_grads, e_grads):.2e}").strip()
        row(name, **result, capture_peak_gib=capture_peak, grad_max_rel_diff=_max_rel(g_grads, e_grads),
            grad_rel_diff_vs_peft=_max_rel(g_grads, exact),
            loss_abs_diff=abs(float(g_loss) - float(e_loss)), replays=replays, note=note)
    except Exception as exc:
        failed(name, exc)
    finally:
        if graphs is not None:
            print(f"  {graphs.summary()}", flush=True)
            graphs.remove()
        revert_hyclora(model)
        model.zero_grad(set_to_none=True)
        harness.clear(device)


def main(argv=None):
    p = harness.parser(__doc__, "model", "shapes", "steps", "lora", "hyclora", "smoke",
                       steps=5, warmup=2, layer_type="intra_inter_full_fuse", q_bit=2)
    p.add_argument("--graph_warmup", type=int, default=1, help="eager warm-up iterations per layer before the capture")
    p.add_argument("--liger", action="store_true",
                   help="also time Liger's kernels on the same model, last (they patch transformers "
                        "process-wide); one shape per run")
    p.add_argument("--chunked_loss", type=harness.flag, default=False,
                   help="hyclora's rows compute the LM loss with CausalLMChunkedLoss (no full logits; the "
                        "examples' --chunked_lm_loss); the PEFT rows keep the model's own loss")
    p.add_argument("--lora_ops_ab", action="store_true",
                   help="also time the eager step with the LoRA terms op by op and with the LoRA kernels "
                        "launched at any token count")
    args = harness.parse(p, argv, shapes=[(2, 64)], steps=1, warmup=0)
    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    if device != "cuda":
        print("CUDA not available (or --smoke): the graphed variant is skipped, eager variants only.", flush=True)
    if args.liger and len(args.shapes) != 1:
        p.error("--liger patches transformers for the whole process: give one --shapes entry per run")
    env = harness.environment(device)

    rows = []
    for bs, seq in args.shapes:
        rows += run_shape(args, device, dtype, bs, seq)

    hcfg = harness.hyclora_config(args)
    shape = harness.shape_of(args)
    what = (f"Llama hidden {shape.hidden}, {shape.layers} layers" if args.arch == "llama"
            else f"{args.arch} shape (random weights)")
    print(f"\n{harness.env_line(env)}; {what}, LoRA r={args.lora_r} x {len(harness.lora_targets(args))} linears, "
          f"{args.attn}, median of {args.steps} steps"
          + ("; hyclora rows: chunked LM loss (CausalLMChunkedLoss)" if args.chunked_loss else ""))
    table = []
    for r in rows:
        same = [x for x in rows if x["shape"] == r["shape"]]
        peft = next((x["tok_s"] for x in same if x["variant"] == "PEFT LoRA"), NAN)
        gc_tok_s = next((x["tok_s"] for x in same if x["variant"] == "PEFT LoRA + GC"), NAN)
        eager = next((x["tok_s"] for x in same if x["variant"] == f"{_label(hcfg)} eager"), NAN)
        table.append((r["shape"], r["variant"], f"{r['tok_s']:.0f}", f"{r['tok_s'] / peft:.2f}",
                      f"{r['tok_s'] / gc_tok_s:.2f}", f"{r['tok_s'] / eager:.2f}", f"{r['step_ms']:.1f}",
                      f"{r['peak_gib']:.2f}", f"{r['resident_gib']:.2f}", f"{r['capture_peak_gib']:.2f}",
                      f"{r['grad_max_rel_diff']:.2e}", f"{r['grad_rel_diff_vs_peft']:.2e}",
                      f"{r['loss_abs_diff']:.2e}", r["note"]))
        r["gpu"] = env["device"]
        r["arch"] = args.arch
    print("\n".join(harness.markdown_table(
        ["bs x seq", "variant", "tok/s", "x PEFT", "x PEFT + GC", "x eager hyclora", "step ms",
         "peak GiB above weights", "resident GiB", "capture-step peak GiB", "LoRA grad max rel diff vs eager",
         "LoRA grad max rel diff vs PEFT (exact)", "loss diff", "note"], table)))
    harness.write_csv(harness.out_dir(args) / "cuda_graphs.csv", rows, env=env)
    return rows


if __name__ == "__main__":
    main()
