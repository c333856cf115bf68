"""The fused SwiGLU epilogue of intra_inter_full_fuse: kernel time and bandwidth, and full steps.

    python benchmarks/bench_fused.py                  # GPU: kernels + full steps (Llama-2-7B shape)
    python benchmarks/bench_fused.py --no_steps       # GPU: kernels only (+ --sweep: every tile config)
    python benchmarks/bench_fused.py --profile        # GPU: also a torch.profiler table of one step
    python benchmarks/bench_fused.py --smoke          # CPU: tiny shapes, checks the script works
    TRITON_INTERPRET=1 python benchmarks/bench_fused.py --smoke   # CPU, through the Triton interpreter

1. Kernels, at Llama-2-7B's FFN width (d_ff 11008), LoRA r=16, bf16, for 4x512 and 1x4096
   tokens and q_bit 2/4/8 (--bits), each the median of --reps repetitions timed alone with CUDA
   events after an L2 flush (harness.Timer):
   * ``copy``: a device-to-device copy of one (tokens, d_ff) bf16 tensor; its bandwidth is the
     reference the kernels' bandwidths are compared with;
   * ``fused fwd``: codes of Y_W gate/up + D in one kernel (frozen quantisation parameters, as
     on every step after calibration). Bytes: read Y_W gate+up, XA gate+up, B gate+up and the
     parameters; write two code tensors and D;
   * ``op-by-op fwd``: what intra_inter runs for the same result (G = Y_W + s XA B^T twice,
     two quantise kernels, SiLU(G) * U), timed the same way;
   * ``fused bwd``: dG, dU and D~ from both codes, XA, B and dD in one kernel;
   * ``op-by-op bwd``: dequantise twice, rebuild G and U, SiLU, D~, the SiLU-product backward.
   Each fused result is also checked against the torch reference (codes identical, D/dG/dU
   relative error printed).
   The fused RMSNorm (``norm:`` rows, hidden 4096, frozen statistics with 0.5% exact channels
   and exact outlier rows): the norm + compressed input in one kernel against rmsnorm_forward +
   StoragePolicy.keep, and the backward from the codes against dequantise + rmsnorm_backward +
   the residual add. Bytes: x read, y / codes / exact columns written (forward); codes, dy,
   residual read, dx written (backward).
   The fused Q rebuild (``rope:`` rows, 32 heads x 128, exact outlier rows): dequantise + LoRA +
   RoPE into the head-major layout against dequantize + lora_reconstruct + apply_rope. Bytes:
   codes and cos/sin read, the rotated Q written.
   The dense-input kernels (``dense:`` rows, 32 heads x 128, 4x512 and 1x8192 tokens): the RMSNorm
   backward with residual and weight gradient, the renormalisation from rstd, and RoPE forward and
   backward, each against the torch ops it replaces (``torch:`` rows).
   The fused LoRA ops (``lora:`` rows, fp32 adapters on bf16, 2048 and 8192 tokens x 4096 and
   11008 features): down-projection, token-reduced weight-gradient product, epilogue, against
   their op-by-op torch expressions (``--sweep``: also every tile of a list).
2. Full steps (forward + backward, no optimizer) of the harness model (Llama-2-7B shape, random
   bf16 weights, PEFT LoRA r=16 on all seven linears) at each of --shapes, as
   bench_memory_throughput.py measures them: PEFT LoRA, PEFT LoRA + gradient checkpointing,
   hyclora at every --layer_types (intra_inter, intra_inter_full_fuse) x --bits; tokens/s
   (median of --steps after --warmup steps, which cover calibration), peak memory above the
   weights, buffered activations per layer.
3. ``--profile``: torch.profiler of one full_fuse 2-bit step of the first shape: the kernels by
   total CUDA time (where the next fusion target is).

Prints markdown tables and writes bench_fused_kernels.csv, bench_fused_steps.csv (and
profile_full_fuse.txt) under --out.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import harness

from hyclora.kernels.glu import (
    BWD_CONFIGS,
    FWD_CONFIGS,
    glu_lora_backward,
    glu_lora_backward_torch,
    glu_lora_forward,
    glu_lora_forward_torch,
)
from hyclora.ops.swiglu import silu_mul_backward, silu_mul_forward
from hyclora.quant.core import (
    affine_params,
    column_minmax,
    packed_width,
    quantize_pack_torch,
    unpack_dequantize_torch,
)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _operands(m, n, r, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    yw_g = (rnd(m, n) * (rnd(n).abs() + 0.2) + rnd(n)).to(dtype)
    yw_u = (rnd(m, n) * (rnd(n).abs() + 0.2) + rnd(n)).to(dtype)
    xa_g, xa_u = rnd(m, r).to(dtype), rnd(m, r).to(dtype)
    b_g, b_u = (rnd(n, r) * 0.05).to(dtype), (rnd(n, r) * 0.05).to(dtype)
    dd = rnd(m, n).to(dtype)
    return yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd


def _copy_row(timer, x, tokens: int, width: int, op: str):
    """``(row, bytes/s)`` of a plain device copy of ``x``: the bandwidth the kernels are compared with."""
    dst = torch.empty_like(x)
    t = timer(lambda: dst.copy_(x))
    bw = 2 * x.numel() * x.element_size() / t
    return dict(tokens=tokens, d_ff=width, bits="-", op=op, ms=t * 1e3, gb_s=bw / 1e9, pct_copy=100.0, err="-"), bw


def _kernel_row(timer, fn, op, where, nbytes=None, bw_copy=None, err="-"):
    """The row of one timed call: ms, and with ``nbytes`` its bandwidth and its share of the
    copy's (``bw_copy``); printed."""
    t = timer(fn)
    gb_s = nbytes / t / 1e9 if nbytes else float("nan")
    row = dict(where, op=op, ms=t * 1e3, gb_s=gb_s, pct_copy=100 * gb_s * 1e9 / bw_copy if nbytes else float("nan"),
               err=err)
    print(f"{row['tokens']:6d} x {row['d_ff']:6d} {row['bits']}-bit {op:40s} {row['ms']:8.3f} ms  "
          f"{row['gb_s']:7.1f} GB/s  {row['pct_copy']:5.1f}% of copy  {err}", flush=True)
    return row


def _pair(timer, fused, unfused, op, ref_op, where, nbytes, bw_copy, err):
    """The rows of a fused kernel (bandwidth: ``nbytes`` moved) and of the op-by-op path it replaces."""
    return [_kernel_row(timer, fused, op, where, nbytes, bw_copy, err), _kernel_row(timer, unfused, ref_op, where)]


def kernel_rows(args, device, backend, timer):
    if backend == "triton":
        from hyclora.quant import triton_kernels

        pack, unpack = triton_kernels.quantize_pack, triton_kernels.unpack_dequantize
    else:
        pack, unpack = quantize_pack_torch, unpack_dequantize_torch

    shapes = [(64, 172)] if args.smoke else [(4 * 512, 11008), (4096, 11008)]
    r, s = args.lora_r, 1.0
    dtype = torch.bfloat16
    rows = []
    for m, n in shapes:
        yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _operands(m, n, r, dtype, device)
        es = yw_g.element_size()
        row, bw_copy = _copy_row(timer, yw_g, m, n, "copy")
        rows.append(row)
        for bits in args.bits:
            lo_g, st_g, inv_g = affine_params(*column_minmax(yw_g), bits)
            lo_u, st_u, inv_u = affine_params(*column_minmax(yw_u), bits)
            nb = packed_width(n, bits)
            lora_bytes = 2 * (m * r + n * r) * es + 4 * 4 * n

            def fused_fwd():
                return glu_lora_forward(yw_g, yw_u, xa_g, xa_u, b_g, b_u, s, s, lo_g, inv_g, lo_u, inv_u,
                                           bits, backend=backend)

            def unfused_fwd():
                g = (yw_g + F.linear(xa_g, b_g) * s).to(dtype)
                u = (yw_u + F.linear(xa_u, b_u) * s).to(dtype)
                pack(yw_g, lo_g, inv_g, bits)
                pack(yw_u, lo_u, inv_u, bits)
                return silu_mul_forward(g, u)[1]

            cg, cu, d = fused_fwd()
            cg_r, cu_r, d_r = glu_lora_forward_torch(yw_g, yw_u, xa_g, xa_u, b_g, b_u, s, s, lo_g, inv_g,
                                                        lo_u, inv_u, bits)
            ok = torch.equal(cg, cg_r) and torch.equal(cu, cu_r)
            where = dict(tokens=m, d_ff=n, bits=bits)
            rows += _pair(timer, fused_fwd, unfused_fwd, "fused fwd", "op-by-op fwd", where,
                          2 * m * n * es + lora_bytes + 2 * m * nb + m * n * es, bw_copy,
                          f"codes {'==' if ok else '!='} ref, D rel {_rel(d, d_r):.1e}")

            def fused_bwd():
                return glu_lora_backward(cg, cu, lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g, b_u, s, s, dd, bits,
                                            dtype=dtype, backend=backend)

            def unfused_bwd():
                g = unpack(cg, lo_g, st_g, bits, n, dtype)
                u = unpack(cu, lo_u, st_u, bits, n, dtype)
                g = (g + F.linear(xa_g, b_g) * s).to(dtype)
                u = (u + F.linear(xa_u, b_u) * s).to(dtype)
                sil, d_hat = silu_mul_forward(g, u)
                return silu_mul_backward(dd, g, u, sil), d_hat

            out = fused_bwd()
            ref = glu_lora_backward_torch(cg, cu, lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g, b_u, s, s, dd, bits,
                                             dtype=dtype)
            errs = ", ".join(f"{k} rel {_rel(a, b):.1e}" for k, a, b in zip(("dG", "dU", "D~"), out, ref))
            rows += _pair(timer, fused_bwd, unfused_bwd, "fused bwd", "op-by-op bwd", where,
                          2 * m * nb + lora_bytes + m * n * es + 3 * m * n * es, bw_copy, errs)
            if args.sweep and backend == "triton":
                for which, table in (("fwd", FWD_CONFIGS), ("bwd", BWD_CONFIGS)):
                    for cfg in table:
                        fn = ((lambda c=cfg: glu_lora_forward(yw_g, yw_u, xa_g, xa_u, b_g, b_u, s, s, lo_g, inv_g,
                                                                  lo_u, inv_u, bits, backend=backend, config=c))
                              if which == "fwd" else
                              (lambda c=cfg: glu_lora_backward(cg, cu, lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g,
                                                                   b_u, s, s, dd, bits, dtype=dtype, backend=backend,
                                                                   config=c)))
                        try:
                            t = timer(fn)
                            print(f"  sweep {which} {bits}-bit {m}x{n} config {cfg}: {t * 1e3:.3f} ms", flush=True)
                        except Exception as exc:  # a config may not fit (registers, shared memory)
                            print(f"  sweep {which} {bits}-bit {m}x{n} config {cfg}: failed ({type(exc).__name__})")
    return rows


def norm_rows(args, device, backend, timer):
    """Fused RMSNorm (+ compressed input) against what intra_inter runs for the same result, with
    frozen statistics (the steady state): hidden 4096, 0.5% exact channels, exact outlier rows."""
    from hyclora.kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward
    from hyclora.ops.blocks import MLPPlan
    from hyclora.ops.fused_rmsnorm import fused_norm_backward, fused_norm_forward
    from hyclora.ops.storage import StoragePolicy, TensorLoad, TensorStore
    from hyclora.quant import ChannelStats

    class Ctx:
        pass

    def load_of(store):
        ctx = Ctx()
        ctx.saved_tensors, ctx.hyclora_index = tuple(store._tensors), store._index
        return TensorLoad(ctx, backend)

    shapes = [(64, 96)] if args.smoke else [(4 * 512, 4096), (4096, 4096)]
    dtype = torch.bfloat16
    rows = []
    for m, d in shapes:
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(1, m, d, generator=g, device=device).to(dtype)
        w = (torch.rand(d, generator=g, device=device) + 0.5).to(dtype)
        dy_n, dy = torch.randn_like(x), torch.randn_like(x)
        es = x.element_size()
        row, bw_copy = _copy_row(timer, x, m, d, "norm: copy")
        rows.append(row)
        for bits in args.bits:
            k = max(1, d // 200)
            stats = {}
            for lt in ("intra_inter", "intra_inter_full_fuse"):
                st = ChannelStats(d, num_outliers=k, iteration_threshold=1).to(device)
                StoragePolicy("intra_inter", bits, backend=backend).keep(TensorStore(), "x_mid", x, st, update=True)
                stats[lt] = st
            plans = {lt: MLPPlan(layer_name="l", eps=1e-5, linears=(),
                                 policy=StoragePolicy(lt, bits, backend=backend), stats={"x_mid": stats[lt]})
                     for lt in stats}

            def fused_fwd():
                store = TensorStore()
                fused_norm_forward(plans["intra_inter_full_fuse"], store, "x_mid", "rstd2", x, w)
                return store

            def unfused_fwd():
                store = TensorStore()
                _, rstd = rmsnorm_forward(x, w, 1e-5)
                plans["intra_inter"].policy.keep(store, "x_mid", x, stats["intra_inter"], update=False)
                store.plain("rstd2", rstd)
                return store

            store_f, store_u = fused_fwd(), unfused_fwd()
            x_f, x_u = load_of(store_f).get("x_mid"), load_of(store_u).get("x_mid")
            same = torch.equal(x_f, x_u)
            where = dict(tokens=m, d_ff=d, bits=bits)
            rows += _pair(timer, fused_fwd, unfused_fwd, "norm: fused fwd", "norm: op-by-op fwd", where,
                          2 * x.numel() * es + x.numel() * bits // 8 + m * (k * es + es + 4), bw_copy,
                          f"x~ {'==' if same else '!='} intra_inter's")
            lf, lu = load_of(store_f), load_of(store_u)

            def fused_bwd():
                return fused_norm_backward(plans["intra_inter_full_fuse"], lf, "x_mid", "rstd2", w, dy_n, dy)

            def unfused_bwd():
                return rmsnorm_backward(dy_n, lu.get("x_mid"), lu.get("rstd2"), w)[0] + dy

            err = _rel(fused_bwd(), unfused_bwd())
            rows += _pair(timer, fused_bwd, unfused_bwd, "norm: fused bwd", "norm: op-by-op bwd", where,
                          x.numel() * bits // 8 + 3 * x.numel() * es + m * (k * es + 4), bw_copy, f"dx rel {err:.1e}")
    return rows


def rope_rows(args, device, backend, timer):
    """Q rebuild of the attention backward: the fused kernel (dequantise + exact rows + LoRA +
    RoPE, head-major) against intra_inter's dequantize + lora_reconstruct + view + apply_rope."""
    from hyclora.kernels.rope import apply_rope
    from hyclora.kernels.rope_rebuild import rebuild_rope
    from hyclora.ops.lora import LinearMeta, lora_reconstruct
    from hyclora.ops.storage import StoragePolicy, TensorLoad, TensorStore
    from hyclora.quant import ChannelStats

    class Ctx:
        pass

    shapes = [(2, 32, 2, 8)] if args.smoke else [(4, 512, 32, 128), (1, 4096, 32, 128)]
    dtype = torch.bfloat16
    rows = []
    for b, s, heads, hd in shapes:
        g = torch.Generator(device=device).manual_seed(2)
        x = torch.randn(b, s, heads * hd, generator=g, device=device).to(dtype)
        xa = torch.randn(b, s, args.lora_r, generator=g, device=device).to(dtype)
        lora_b = (torch.randn(heads * hd, args.lora_r, generator=g, device=device) * 0.05).to(dtype)
        pos = torch.arange(s, device=device).float()[None, :, None] * torch.rand(hd // 2, device=device)
        emb = torch.cat([pos, pos], -1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        es = x.element_size()
        m, n = b * s, heads * hd
        row, bw_copy = _copy_row(timer, x, m, n, "rope: copy")
        rows.append(row)
        for bits in args.bits:
            store = TensorStore()
            StoragePolicy("intra_inter", bits, backend=backend).keep(store, "q", x, ChannelStats(n).to(device),
                                                                     update=True)
            ctx = Ctx()
            ctx.saved_tensors, ctx.hyclora_index = tuple(store._tensors), store._index
            load = TensorLoad(ctx, backend)
            saved = load.get_quantized("q")
            meta = LinearMeta("q_proj", True, 1.0)

            def fused():
                return rebuild_rope(saved, xa, lora_b, 1.0, cos, sin, heads, hd, backend=backend)

            def unfused():
                val = lora_reconstruct(meta, load.get("q"), xa, lora_b)
                return apply_rope(val.view(b, s, heads, hd).transpose(1, 2), cos, sin)

            err = _rel(fused(), unfused())
            rows += _pair(timer, fused, unfused, "rope: fused rebuild", "rope: op-by-op", dict(tokens=m, d_ff=n, bits=bits),
                          m * n * bits // 8 + 2 * m * hd * es + m * n * es, bw_copy,
                          f"rel {err:.1e} vs op-by-op (bf16 roundings)")
    return rows


def dense_rows(args, device, backend, timer):
    """The one-pass kernels of the dense (rebuilt) norm input and RoPE, against the torch ops they
    replace: RMSNorm backward with the residual and the weight gradient (a trainable norm), the
    renormalisation from rstd, and RoPE forward/backward into the token-major layout. Bytes: the
    tensors each kernel must read and write once (bf16), cos/sin and partial sums left out."""
    from hyclora.kernels.rmsnorm import (
        rmsnorm_backward,
        rmsnorm_backward_dense,
        rmsnorm_forward,
        rmsnorm_from_rstd,
        rmsnorm_from_rstd_fused,
    )
    from hyclora.kernels.rope import apply_rope, rope_backward

    shapes = [(1, 64, 2, 48)] if args.smoke else [(4, 512, 32, 128), (1, 8192, 32, 128)]
    dtype = torch.bfloat16
    rows = []
    for b, s, heads, hd in shapes:
        g = torch.Generator(device=device).manual_seed(3)
        m, d = b * s, heads * hd
        x = torch.randn(b, s, d, generator=g, device=device).to(dtype)
        w = (torch.rand(d, generator=g, device=device) + 0.5).to(dtype)
        dy_n, dres = torch.randn_like(x), torch.randn_like(x)
        _, rstd = rmsnorm_forward(x, w, 1e-5)
        pos = torch.arange(s, device=device).float()[None, :, None] * torch.rand(hd // 2, device=device)
        cos, sin = torch.cat([pos, pos], -1).cos().to(dtype), torch.cat([pos, pos], -1).sin().to(dtype)
        heads_view = x.view(b, s, heads, hd).transpose(1, 2)
        es = x.element_size()
        row, bw_copy = _copy_row(timer, x, m, d, "dense: copy")
        rows.append(row)
        cases = [
            ("dense: norm bwd + residual + dw", 4,
             lambda: rmsnorm_backward_dense(dy_n, x, rstd, w, dres, need_dx=True, need_dweight=True, backend=backend),
             lambda: rmsnorm_backward(dy_n, x, rstd, w, need_dx=True, need_dweight=True)),
            ("dense: renormalise from rstd", 2,
             lambda: rmsnorm_from_rstd_fused(x, rstd, w, backend=backend),
             lambda: rmsnorm_from_rstd(x, rstd, w)),
            ("dense: rope fwd", 2, lambda: apply_rope(heads_view, cos, sin, backend=backend),
             lambda: apply_rope(heads_view, cos, sin, backend="torch")),
            ("dense: rope bwd", 2, lambda: rope_backward(heads_view, cos, sin, backend=backend),
             lambda: rope_backward(heads_view, cos, sin, backend="torch")),
        ]
        for op, passes, fused, unfused in cases:
            a, ref = fused(), unfused()
            a, ref = (a[0], ref[0]) if isinstance(a, tuple) else (a, ref)
            if op.startswith("dense: norm"):
                ref = ref + dres
            rows += _pair(timer, fused, unfused, op, op.replace("dense:", "torch:"), dict(tokens=m, d_ff=d, bits="-"),
                          passes * x.numel() * es, bw_copy, f"rel {_rel(a, ref):.1e} vs torch")
    return rows


def lora_rows(args, device, backend, timer):
    """The fused LoRA ops for PEFT's fp32 adapters on a bf16 base (hyclora.kernels.lora) against
    the op-by-op torch expressions they replace: the down-projection ``x A^T`` (bytes: x read),
    the token-reduced weight-gradient product ``x^T y`` (x read) and the epilogue ``y_w + s xa B^T``
    (y_w read, y written). The kernels are called with ``min_tokens=0``: they launch at any token
    count (in training, by default, only under CUDA graph capture). ``--sweep``: every tile of the list."""
    from hyclora.kernels import lora as lk

    shapes = [(64, 96)] if args.smoke else [(2048, 4096), (2048, 11008), (8192, 4096), (8192, 11008)]
    r, dtype = args.lora_r, torch.bfloat16
    down_tiles = [None] + ([(16, 64, 4, 1), (32, 64, 4, 1), (32, 128, 4, 1), (64, 128, 4, 1), (128, 64, 8, 1),
                            (64, 64, 4, 4), (128, 64, 4, 4), (64, 64, 8, 2)] if args.sweep else [])
    reduce_tiles = [None] + ([(32, 64, 4, 0), (128, 64, 8, 0), (64, 128, 4, 0), (64, 32, 4, 0), (64, 64, 4, -1),
                              (64, 64, 4, 1), (128, 128, 8, 0)] if args.sweep else [])
    rows = []
    for m, n in shapes:
        g = torch.Generator(device=device).manual_seed(7)
        x = torch.randn(m, n, generator=g, device=device).to(dtype)
        a = torch.randn(r, n, generator=g, device=device) * 0.02
        y = torch.randn(m, r, generator=g, device=device)
        y_w = torch.randn(m, n, generator=g, device=device).to(dtype)
        b = torch.randn(n, r, generator=g, device=device) * 0.02
        row, bw_copy = _copy_row(timer, x, m, n, "lora: copy")
        rows.append(row)
        es = x.element_size()

        def down(tiles):
            if tiles is None:
                return lambda: lk.lora_down(x, a, backend=backend, min_tokens=0)
            bm, bk, warps, slices = tiles
            per = -(-n // slices)
            block_r = lk._down_tiles(m, n, r)[2]
            return lambda: lk.lora_down(x, a, backend=backend, min_tokens=0, tiles=(bm, bk, block_r, warps, per))

        def reduce(tiles):
            if tiles is None:
                return lambda: lk.token_reduced_product(x, y, backend=backend, min_tokens=0)
            bn, bt, warps, shift = tiles
            _, _, block_r, _, per = lk._reduce_tiles(m, n, r)
            per = max(bt, per << shift if shift >= 0 else per >> -shift)
            return lambda: lk.token_reduced_product(x, y, backend=backend, min_tokens=0,
                                                    tiles=(bn, bt, block_r, warps, per))

        cases = [("lora: down x A^T", t, 1, down(t), lambda: lk.lora_down_torch(x, a)) for t in down_tiles]
        cases += [("lora: x^T y over tokens", t, 1, reduce(t), lambda: lk.token_reduced_product_torch(x, y))
                  for t in reduce_tiles]
        cases.append(("lora: epilogue y_w + s xa B^T", None, 2,
                      lambda: lk.lora_epilogue(y_w, y, b, 2.0, backend=backend, min_tokens=0),
                      lambda: lk.lora_epilogue_torch(y_w, y, b, 2.0)))
        timed_torch = set()
        where = dict(tokens=m, d_ff=n, bits="-")
        for op, tiles, passes, fused, unfused in cases:
            name = op + ("" if tiles is None else f" tiles {tiles}")
            rows.append(_kernel_row(timer, fused, name, where, passes * x.numel() * es, bw_copy,
                                    f"rel {_rel(fused(), unfused()):.1e} vs torch"))
            if op not in timed_torch:  # the torch expression once per op, not per tile
                timed_torch.add(op)
                rows.append(_kernel_row(timer, unfused, op.replace("lora:", "torch:"), where))
    return rows


def step_rows(args, device, env):
    """Full steps of the harness model: PEFT LoRA, PEFT LoRA + GC and hyclora at every
    --layer_types x --bits, per --shapes; the torch.profiler table of one full_fuse step of the
    first shape with --profile."""
    dtype = harness.dtype_of(args, device.type)
    variants = [("PEFT LoRA", None, False), ("PEFT LoRA + GC", None, True)]
    variants += [(f"{lt} {bits}-bit", hcfg, False) for lt, bits, hcfg in harness.sweep(args)]
    rows = []
    for bs, seq in args.shapes:
        shape = f"{bs}x{seq}"
        model, cfg = harness.build_model(args, device.type, dtype)
        ids = torch.randint(0, cfg.vocab_size, (bs, seq), device=device)
        for name, hcfg, checkpointing in variants:
            r = harness.step_row(model, ids, device.type, name, hcfg, checkpointing, steps=args.steps, warmup=args.warmup)
            r.update(shape=shape, attn=args.attn, gpu=env["device"])
            rows.append(r)
            print(f"{shape:8s} {r['variant']:30s} {r['tok_s']:9.0f} tok/s  peak {r['peak_gib']:7.2f} GiB  "
                  f"buffered/layer {r['buffered_layer_mib']:8.2f} MiB", flush=True)
        if args.profile and device.type == "cuda" and (bs, seq) == args.shapes[0]:
            profile(model, ids, args)
        del model
        harness.clear(device.type)
    return rows


def profile(model, ids, args):
    """torch.profiler of one ``intra_inter_full_fuse`` 2-bit step (after the warm-up): the kernels
    by total CUDA time."""
    with harness.variant(model, harness.hyclora_config(args, layer_type="intra_inter_full_fuse", q_bit=2)):
        for _ in range(args.warmup):
            harness.lm_step(model, ids)
            model.zero_grad(set_to_none=True)
        table = harness.torch_profile_table(lambda: harness.lm_step(model, ids), "cuda", rows=30,
                                            sort="cuda_time_total", width=60)
    harness.write_text(harness.out_dir(args) / "profile_full_fuse.txt", table)
    print(table)


def main(argv=None) -> int:
    p = harness.parser(__doc__.split("\n")[0], "model", "shapes", "steps", "lora", "sweep", "smoke", steps=4, warmup=6,
                       layer_types=["intra_inter", "intra_inter_full_fuse"], bits=[2, 4, 8])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 GPU, 2 smoke)")
    p.add_argument("--sweep", action="store_true", help="time every tile configuration of the swept kernels")
    p.add_argument("--no_steps", action="store_true", help="kernels only")
    p.add_argument("--only", default=None, choices=["swiglu", "norm", "rope", "dense", "lora"],
                   help="one family of kernel rows only")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one full_fuse step")
    args = harness.parse(p, argv, shapes=[(2, 64)], steps=1, warmup=1, bits=[2])

    picked = harness.kernel_device(args, "bench_fused")
    if picked is None:
        return 2
    device, backend = picked
    reps = args.reps or (2 if args.smoke else 50)
    timer = harness.Timer(device, reps=reps, warmup=1 if args.smoke else 5, flush_l2=True)
    env = harness.environment(device)
    print(f"bench_fused: {harness.env_line(env)}, backend={backend}, r={args.lora_r}, median of {reps} reps")

    families = dict(swiglu=kernel_rows, norm=norm_rows, rope=rope_rows, dense=dense_rows, lora=lora_rows)
    krows = [row for name, rows_of in families.items() if args.only in (None, name)
             for row in rows_of(args, device, backend, timer)]
    print()
    print("\n".join(harness.markdown_table(
        ["tokens x d_ff", "bits", "op", "ms", "GB/s", "% of copy bandwidth", "check"],
        [(f"{r['tokens']} x {r['d_ff']}", r["bits"], r["op"], f"{r['ms']:.3f}", f"{r['gb_s']:.0f}",
          f"{r['pct_copy']:.0f}", r["err"]) for r in krows])))
    out = harness.out_dir(args)
    harness.write_csv(out / "bench_fused_kernels.csv", krows, env=env)

    if not args.no_steps:
        srows = step_rows(args, device, env)
        table = []
        for r in srows:
            same = [b for b in srows if b["shape"] == r["shape"]]
            peft = next(b for b in same if b["variant"] == "PEFT LoRA")["tok_s"]
            gc_ = next(b for b in same if b["variant"] == "PEFT LoRA + GC")["tok_s"]
            table.append((r["shape"], r["variant"], f"{r['tok_s']:.0f}", harness.fmt(r["tok_s"] / peft if peft else None),
                          harness.fmt(r["tok_s"] / gc_ if gc_ else None), f"{r['peak_gib']:.2f}",
                          f"{r['buffered_layer_mib']:.2f}"))
        print()
        print("\n".join(harness.markdown_table(
            ["bs x seq", "variant", "tok/s", "x PEFT LoRA", "x PEFT LoRA + GC", "peak GiB above weights",
             "buffered MiB/layer"], table)))
        harness.write_csv(out / "bench_fused_steps.csv", srows, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
