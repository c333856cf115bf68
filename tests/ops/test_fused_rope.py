"""Fused Q/K rebuild of the attention backward (intra_inter_full_fuse): dequantise + exact rows +
LoRA term + RoPE in one kernel, against its torch reference and the op-by-op intra_inter code.
Triton cases run under TRITON_INTERPRET=1 or on CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hyclora.kernels.rope import apply_rope
from hyclora.kernels.rope_rebuild import rebuild_rope, rebuild_rope_torch
from hyclora.ops.blocks import AttentionPlan
from hyclora.ops.fused_rope import fused_rebuild_rope
from hyclora.ops.lora import LinearMeta, lora_reconstruct
from hyclora.ops.storage import OutlierRows, StoragePolicy, TensorLoad, TensorStore
from hyclora.quant import ChannelStats

from helpers.kernels import DEVICE, compile_for_sm90, needs_triton
from helpers.numerics import rel_err, ulp_close


class _Ctx:
    pass


def _case(b, s, heads, hd, r, dtype, bits, seed, cos_batch=None, name="q", exact_cols=0):
    """keep()'s storage of a pre-RoPE projection (massive token included), its LoRA operands,
    RoPE tables, and a TensorLoad over it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, heads * hd, generator=g) * 2 + torch.randn(heads * hd, generator=g)
    x[-1, s // 2] *= 30
    x = x.to(dtype).to(DEVICE)
    xa = torch.randn(b, s, r, generator=g).to(dtype).to(DEVICE)
    lora_b = (torch.randn(heads * hd, r, generator=g) * 0.3).to(dtype).to(DEVICE)
    inv = 1.0 / (1000 ** (torch.arange(0, hd, 2).float() / hd))
    pos = torch.arange(s).float()[None, :, None] + torch.randint(0, 5, (cos_batch or b, 1, 1), generator=g)
    emb = torch.cat([pos * inv, pos * inv], -1)
    cos, sin = emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)
    store = TensorStore()
    stats = ChannelStats(heads * hd, num_outliers=exact_cols).to(DEVICE)
    StoragePolicy("intra_inter", bits).keep(store, name, x, stats, update=True)
    store.plain(f"xa_{name}", xa)
    ctx = _Ctx()
    ctx.saved_tensors, ctx.hyclora_index = tuple(store._tensors), store._index
    return TensorLoad(ctx, "torch"), xa, lora_b, cos, sin


def _op_by_op(load, xa, lora_b, scaling, cos, sin, heads, hd, name="q"):
    val = lora_reconstruct(LinearMeta("q_proj", True, scaling), load.get(name), xa, lora_b)
    b, s, _ = val.shape
    return apply_rope(val.view(b, s, heads, hd).transpose(1, 2), cos, sin)


def _ulps_close(a, b, dtype):
    return ulp_close(a, b, dtype, fp32_tol=1e-5, slack=1e-5)


@needs_triton
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd,rows,cos_batch", [(8, True, None), (6, False, 1), (12, True, 1)])
def test_kernel_matches_reference(bits, dtype, hd, rows, cos_batch):
    # head_dim 6: half-heads of 3 columns, not on 2-bit byte boundaries; rows=False: too few
    # tokens for exact rows (a plain QuantizedTensor)
    b, s = (2, 19) if rows else (1, 7)
    load, xa, lora_b, cos, sin = _case(b, s, 3, hd, 12, dtype, bits, seed=bits + hd, cos_batch=cos_batch)
    saved = load.get_quantized("q")
    assert isinstance(saved, OutlierRows) == rows
    got = rebuild_rope(saved, xa, lora_b, 2.0, cos, sin, 3, hd, backend="triton")
    ref = rebuild_rope_torch(saved, xa, lora_b, 2.0, cos, sin, 3, hd)
    assert got.shape == (b, 3, s, hd) and got.dtype == dtype and got.is_contiguous()
    assert _ulps_close(got, ref, dtype)
    no_lora = rebuild_rope(saved, None, None, 2.0, cos, sin, 3, hd, backend="triton")
    assert _ulps_close(no_lora, rebuild_rope_torch(saved, None, None, 2.0, cos, sin, 3, hd), dtype)


@pytest.mark.parametrize("bits", [2, 8])
def test_reference_equals_op_by_op_in_fp32(bits):
    load, xa, lora_b, cos, sin = _case(2, 19, 4, 8, 12, torch.float32, bits, seed=1)
    ref = rebuild_rope_torch(load.get_quantized("q"), xa, lora_b, 0.5, cos, sin, 4, 8)
    assert rel_err(ref, _op_by_op(load, xa, lora_b, 0.5, cos, sin, 4, 8)) < 1e-6  # measured 0


def test_reference_at_least_as_accurate_as_op_by_op_in_bf16():
    # bf16: the fused rotation runs in fp32 and rounds once; the op-by-op path rounds after every
    # op. Against fp64 of the same formula on the same dequantised values, the fused error is the
    # smaller one (measured 0.0019 against 0.0031).
    load, xa, lora_b, cos, sin = _case(2, 19, 4, 8, 12, torch.bfloat16, 4, seed=2)
    fused = rebuild_rope_torch(load.get_quantized("q"), xa, lora_b, 0.5, cos, sin, 4, 8)
    opbyop = _op_by_op(load, xa, lora_b, 0.5, cos, sin, 4, 8)
    x = load.get("q").double() + 0.5 * xa.double() @ lora_b.double().t()
    truth = apply_rope(x.view(2, 19, 4, 8).transpose(1, 2), cos.double(), sin.double())
    e_fused, e_op = rel_err(fused, truth), rel_err(opbyop, truth)
    print(f"bf16 rebuild error against fp64: fused {e_fused:.4f}, op-by-op {e_op:.4f}")
    assert e_fused <= e_op and e_fused < 0.004


@pytest.mark.parametrize("exact_cols", [0, 2])
def test_block_glue_and_its_op_by_op_fallback(exact_cols):
    # exact columns (q/k never get them today) are a layout the kernel does not take: the glue
    # then runs the op-by-op code; either way the result is intra_inter's
    hd = 8
    load, xa, lora_b, cos, sin = _case(2, 19, 2, hd, 4, torch.float32, 4, seed=3, exact_cols=exact_cols)
    assert load.get_quantized("q").quant.num_outliers == exact_cols
    plan = AttentionPlan(layer_name="l0", eps=1e-5, linears=(), policy=StoragePolicy("intra_inter_full_fuse", 4),
                         head_dim=hd)
    meta = LinearMeta("q_proj", True, 2.0)
    got = fused_rebuild_rope(plan, load, "q", meta, lora_b, 2, cos, sin)
    assert rel_err(got, _op_by_op(load, xa, lora_b, 2.0, cos, sin, 2, hd)) < 1e-6


def test_bad_inputs_raise_clear_errors():
    load, xa, lora_b, cos, sin = _case(2, 19, 2, 8, 4, torch.float32, 4, seed=4)
    saved = load.get_quantized("q")
    with pytest.raises(ValueError, match="cos/sin"):
        rebuild_rope(saved, xa, lora_b, 1.0, cos[:, :5], sin[:, :5], 2, 8)
    with pytest.raises(ValueError, match="even head_dim"):
        rebuild_rope(saved, xa, lora_b, 1.0, cos, sin, 4, 4 + 1)
    with pytest.raises(ValueError, match="both"):
        rebuild_rope(saved, xa, None, 1.0, cos, sin, 2, 8)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_compiles_for_sm90_without_spills(tmp_path):
    """Compiled ahead of time for sm_90 (no GPU): head_dim 128 (Llama-2-7B), r=16 and r=128,
    2/4/8 bits (K is kept at twice the bits), bf16 and fp32, the launcher's 16 x 64 tile; no
    spills (measured 128 registers at r=16, 156 at r=128)."""
    def case(bits, r, dt, tag):
        ptrs = dict(codes_ptr="u8", lo_ptr="fp32", step_ptr="fp32", rslot_ptr="i32", rvals_ptr=dt, xa_ptr=dt,
                    b_ptr=dt, cos_ptr=dt, sin_ptr=dt, out_ptr=dt)
        consts = dict(BITS=bits, HAS_ROWS=True, HAS_LORA=True, DOT_FP32=dt == "fp32", RNE=False, BLOCK_M=16,
                      BLOCK_H=64, BLOCK_R=max(16, 1 << (r - 1).bit_length()))
        return dict(module="hyclora.kernels.rope_rebuild", kernel="_rope_rebuild_kernel", ptrs=ptrs, floats=["scale"],
                    consts=consts, warps=4, tag=tag)

    cases = [case(2, 16, "bf16", [2, 16]), case(4, 16, "bf16", [4, 16]), case(8, 128, "bf16", [8, 128]),
             case(4, 16, "fp32", [4, 16, "fp32"])]
    for tag, regs, stack, local in compile_for_sm90(cases, tmp_path):
        assert local == 0 and stack == 0, (tag, regs, stack)
