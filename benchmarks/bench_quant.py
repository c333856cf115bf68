"""Throughput of hyclora's quantise+pack and unpack+dequantise against a device-to-device copy.

    python benchmarks/bench_quant.py                 # GPU: (4,1024,4096), (4,1024,11008) bf16
    python benchmarks/bench_quant.py --smoke         # CPU: tiny shapes, checks the script works
    TRITON_INTERPRET=1 python benchmarks/bench_quant.py --smoke   # CPU, through the Triton interpreter

Bandwidth counts the bytes each operation must move: quantise reads the input and writes the
packed codes (+ 8 bytes of parameters per channel); dequantise reads the codes (+ parameters)
and writes the output; the copy reads and writes the tensor. Each timing is the median of many
repetitions, each timed alone with CUDA events after the L2 cache was flushed (a 256 MB write),
so no repetition reads a tensor that is still in L2.

Rows:
* ``quant kernel``: quantise+pack with precomputed per-channel parameters (what runs on every
  training step once calibration has frozen the ranges);
* ``quantize(stats frozen)``: the whole public call with frozen ChannelStats (kernel + the tiny
  per-channel parameter ops);
* ``quantize(own range)``: the public call computing this tensor's per-channel min/max first
  (calibration steps and iteration_threshold=0): one more read of the input, so it cannot reach
  the kernel's bandwidth; reported against the same byte count;
* ``dequant kernel`` / ``dequantize()``: unpack+dequantise, kernel alone and public call;
* ``sparsify_probs`` / ``densify_probs`` of a causal (4, 32, 512, 512) bf16 attention map at
  ratio 0.05 for each scope (torch top-k / sort / scatter, no Triton).

Also checks, for every configuration, that the Triton codes equal the torch reference's, and
(unless --no_sweep) times a few tile shapes per kernel so the launch heuristic can be tuned.
Prints markdown tables and writes bench_quant.csv (and bench_quant_sweep.csv) under --out.
"""

from __future__ import annotations

import sys

import torch

import harness

from hyclora.quant import ChannelStats, dequantize, quantize
from hyclora.quant.core import (
    affine_params,
    packed_width,
    quantize_pack_torch,
    unpack_dequantize_torch,
)

INTERPRET = harness.TRITON_INTERPRET


def _activation(shape, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    n = shape[-1]
    x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
    x = x * (torch.rand(n, generator=g, device=device) * 2 + 0.1) + torch.randn(n, generator=g, device=device)
    return x.to(dtype)


def main(argv=None) -> int:
    p = harness.parser(__doc__, "smoke")
    p.add_argument("--bits", action=harness.Items, item=int, choices=(2, 4, 8), default=[2, 4, 8], help="bit widths")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 100 GPU, 3 smoke)")
    p.add_argument("--no_sweep", action="store_true", help="skip the tile-shape sweep")
    args = harness.parse(p, argv)

    picked = harness.kernel_device(args, "bench_quant")
    if picked is None:
        return 2
    device, backend = picked
    shapes = [(2, 8, 96), (2, 8, 172)] if args.smoke else [(4, 1024, 4096), (4, 1024, 11008)]
    dtype = torch.bfloat16
    reps = args.reps or (3 if args.smoke else 100)
    timer = harness.Timer(device, reps=reps, warmup=1 if args.smoke else 10, flush_l2=True)
    if backend == "triton":
        from hyclora.quant import triton_kernels

    env = harness.environment(device)
    print(f"bench_quant: {harness.env_line(env)}, backend={backend}, median of {reps} reps")

    rows = []
    codes_ok = True
    for shape in shapes:
        x = _activation(shape, dtype, device)
        n = shape[-1]
        m = x.numel() // n
        x2d = x.view(m, n)
        esize = x.element_size()
        dst = torch.empty_like(x)
        t_copy = timer(lambda: dst.copy_(x))
        copy_bytes = 2 * x.numel() * esize
        copy_bw = copy_bytes / t_copy
        rows.append(dict(shape=str(shape), bits="-", op="copy (read+write)", bytes=copy_bytes,
                         us=t_copy * 1e6, gbps=copy_bw / 1e9, pct_copy=100.0))
        for bits in args.bits:
            lo, hi = torch.aminmax(x2d, dim=0)
            lo, step, inv = affine_params(lo, hi, bits)
            pbytes = m * packed_width(n, bits)
            q_bytes = x.numel() * esize + pbytes + 8 * n
            d_bytes = pbytes + 8 * n + x.numel() * esize
            stats = ChannelStats(n, iteration_threshold=1).to(device)
            quantize(x, bits, stats=stats, backend=backend)  # calibrate once -> frozen
            assert stats.frozen
            q = quantize(x, bits, stats=stats, backend=backend)

            if backend == "triton":
                ref = quantize_pack_torch(x2d, lo, inv, bits)
                got = triton_kernels.quantize_pack(x2d, lo, inv, bits)
                same = torch.equal(ref, got)
                codes_ok &= same
                y_ref = unpack_dequantize_torch(ref, lo, step, bits, n, dtype)
                y_got = triton_kernels.unpack_dequantize(ref, lo, step, bits, n, dtype)
                max_diff = (y_ref.float() - y_got.float()).abs().max().item()
                print(f"  {shape} {bits}-bit: triton codes == torch reference: {same}; "
                      f"max |dequant diff| = {max_diff:.3g}")
                q_kernel = lambda: triton_kernels.quantize_pack(x2d, lo, inv, bits)  # noqa: E731
                d_kernel = lambda: triton_kernels.unpack_dequantize(q.codes, q.lo, q.step, bits, n, dtype)  # noqa: E731
            else:
                q_kernel = lambda: quantize_pack_torch(x2d, lo, inv, bits)  # noqa: E731
                d_kernel = lambda: unpack_dequantize_torch(q.codes, q.lo, q.step, bits, n, dtype)  # noqa: E731

            cases = [
                ("quant kernel", q_kernel, q_bytes),
                ("quantize(stats frozen)", lambda: quantize(x, bits, stats=stats, backend=backend), q_bytes),
                ("quantize(own range)", lambda: quantize(x, bits, backend=backend), q_bytes),
                ("dequant kernel", d_kernel, d_bytes),
                ("dequantize()", lambda: dequantize(q, backend=backend), d_bytes),
            ]
            for name, fn, nbytes in cases:
                t = timer(fn)
                rows.append(dict(shape=str(shape), bits=bits, op=name, bytes=nbytes, us=t * 1e6,
                                 gbps=nbytes / t / 1e9, pct_copy=100.0 * (nbytes / t) / copy_bw))
        del x, dst

    rows += bench_sparse(args.smoke, device, timer)

    print()
    print("\n".join(harness.markdown_table(
        ["shape (bf16)", "bits", "operation", "bytes moved", "time (us)", "GB/s", "% of copy"],
        [(r["shape"], r["bits"], r["op"], f"{r['bytes'] / 1e6:.3f} MB", f"{r['us']:.1f}", f"{r['gbps']:.0f}",
          f"{r['pct_copy']:.0f}%") for r in rows])))
    out = harness.out_dir(args)
    harness.write_csv(out / "bench_quant.csv", rows, env=env)

    if backend == "triton" and not INTERPRET:
        from hyclora.kernels.common import tuned_choices

        names = {id(triton_kernels._tuned(kern)): kern for kern in ("quant", "dequant")}
        for (tuner, key, bucket), cfg in tuned_choices().items():
            if tuner in names:
                print(f"autotuned {names[tuner]} {key} M<={bucket}: {cfg}")
    if backend == "triton" and not args.no_sweep:
        sweep(shapes, args.bits, dtype, device, timer, out)
    if not codes_ok:
        print("ERROR: Triton codes differ from the torch reference")
        return 1
    return 0


def bench_sparse(smoke, device, timer):
    """sparsify_probs / densify_probs of a causal bf16 attention map, per scope, vs a copy of
    the dense map. Bytes: the dense map read (sparsify) or written (densify) + the sparse form."""
    from hyclora.quant import densify_probs, sparsify_probs

    shape = (1, 2, 16, 16) if smoke else (4, 32, 512, 512)
    s = shape[-1]
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(*shape, generator=g, device=device) * 3
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=device).triu(1), float("-inf"))
    p = torch.softmax(scores, -1).to(torch.bfloat16)
    del scores
    dst = torch.empty_like(p)
    dense = p.numel() * p.element_size()
    t_copy = timer(lambda: dst.copy_(p))
    copy_bw = 2 * dense / t_copy
    out = [dict(shape=str(shape), bits="-", op="attn map copy", bytes=2 * dense, us=t_copy * 1e6,
                gbps=copy_bw / 1e9, pct_copy=100.0)]
    for scope in ("global", "head", "row"):
        sp = sparsify_probs(p, 0.05, scope=scope)
        nbytes = dense + sp.nbytes
        for name, fn in ((f"sparsify_probs({scope}, 0.05)", lambda: sparsify_probs(p, 0.05, scope=scope)),
                         (f"densify_probs({scope})", lambda: densify_probs(sp))):
            t = timer(fn)
            out.append(dict(shape=str(shape), bits="-", op=name, bytes=nbytes, us=t * 1e6,
                            gbps=nbytes / t / 1e9, pct_copy=100.0 * (nbytes / t) / copy_bw))
    return out


def sweep(shapes, bits_list, dtype, device, timer, out) -> None:
    """Time tile shapes (BLOCK_M rows, BLOCK_N columns, warps) per kernel; best first."""
    from hyclora.quant import triton_kernels

    # (BLOCK_M, BLOCK_N, warps, ROW_ITERS): both kernels' autotuning lists and neighbours
    configs = [(16, 128, 8, 1), (16, 128, 8, 2), (16, 128, 8, 4), (16, 128, 8, 8), (32, 64, 8, 4),
               (32, 64, 8, 8), (8, 128, 4, 4), (32, 256, 8, 1), (16, 256, 4, 1), (16, 1024, 4, 1),
               (32, 512, 4, 1), (8, 1024, 4, 1), (32, 256, 4, 1), (16, 256, 4, 2)]
    if INTERPRET:
        configs = configs[:2]
    results = []
    for shape in shapes[-1:]:
        x = _activation(shape, dtype, device)
        n = shape[-1]
        m = x.numel() // n
        x2d = x.view(m, n)
        copy_t = timer(lambda: torch.empty_like(x).copy_(x))
        copy_bw = 2 * x.numel() * x.element_size() / copy_t
        for bits in bits_list:
            lo, hi = torch.aminmax(x2d, dim=0)
            lo, step, inv = affine_params(lo, hi, bits)
            codes = triton_kernels.quantize_pack(x2d, lo, inv, bits)
            pbytes = codes.numel()
            nbytes = x.numel() * x.element_size() + pbytes + 8 * n
            for cfg in configs:
                tq = timer(lambda: triton_kernels.quantize_pack(x2d, lo, inv, bits, config=cfg))
                td = timer(lambda: triton_kernels.unpack_dequantize(codes, lo, step, bits, n, dtype,
                                                                    config=cfg))
                results.append(dict(shape=str(shape), bits=bits, block_m=cfg[0], block_n=cfg[1],
                                    warps=cfg[2], row_iters=cfg[3], quant_pct=100 * nbytes / tq / copy_bw,
                                    dequant_pct=100 * nbytes / td / copy_bw))
    print("\nTile sweep (% of copy bandwidth), best 5 per kernel and bit width:")
    print("| shape | bits | kernel | BLOCK_M | BLOCK_N | warps | ROW_ITERS | % of copy |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in bits_list:
        for kern in ("quant", "dequant"):
            rs = sorted((r for r in results if r["bits"] == bits), key=lambda r: -r[f"{kern}_pct"])
            for r in rs[:5]:
                print(f"| {r['shape']} | {bits} | {kern} | {r['block_m']} | {r['block_n']} | "
                      f"{r['warps']} | {r['row_iters']} | {r[f'{kern}_pct']:.0f}% |")
    harness.write_csv(out / "bench_quant_sweep.csv", results)


if __name__ == "__main__":
    sys.exit(main())
