"""Fused SwiGLU epilogue (intra_inter_full_fuse): kernels against the torch reference, the
reference against autograd, and the fused MLP block against the op-by-op intra_inter block.

Triton cases run under TRITON_INTERPRET=1 (set by `make test`) or on CUDA; they are skipped
otherwise. Shapes are small and odd on purpose (b*s = 37, d_ff = 45, ranks 8/12/20): every
tile is partial, the rank is not a power of two, the last packed byte is half used.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from hyclora.ops.blocks import MLPPlan, mlp_block
from hyclora.kernels.common import FIXED_TILE
from hyclora.kernels.glu import (
    FWD_CONFIGS,
    glu_lora_backward,
    glu_lora_backward_torch,
    glu_lora_backward_triton,
    glu_lora_forward,
    glu_lora_forward_torch,
    glu_lora_forward_triton,
)
from hyclora.ops.fused_swiglu import fused_gate_up_forward
from hyclora.ops.lora import LinearMeta, lora_base_forward, lora_linear_forward
from hyclora.ops.storage import StoragePolicy, TensorLoad, TensorStore
from hyclora.quant import ChannelStats, QuantizedTensor, dequantize, quantize
from hyclora.quant.core import affine_params, column_minmax

from helpers.kernels import DEVICE, HAS_TRITON_DEVICE, INTERPRET, compile_for_sm90, needs_triton
from helpers.mlp_block import mlp_grads, mlp_params, mlp_stats
from helpers.numerics import rel_err, ulp_close


def _case(m, n, r, dtype, seed, lora=(True, True), lora_dtype=None):
    """Base outputs with per-channel offsets and spreads (as real gate/up outputs have), LoRA
    operands with a LoRA term of the same order as the base part (so its errors would show)."""
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype

    def base():
        return (torch.randn(m, n, generator=g) * (torch.rand(n, generator=g) * 2 + 0.2)
                + torch.randn(n, generator=g)).to(dtype).to(DEVICE)

    yw_g, yw_u = base(), base()
    out = [yw_g, yw_u]
    for has in lora:
        if has:
            out += [torch.randn(m, r, generator=g).to(lora_dtype).to(DEVICE),
                    (torch.randn(n, r, generator=g) * 0.3).to(lora_dtype).to(DEVICE)]
        else:
            out += [None, None]
    yw_g, yw_u, xa_g, b_g, xa_u, b_u = out
    dd = torch.randn(m, n, generator=g).to(dtype).to(DEVICE)
    return yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd


def _own_params(y, bits):
    return affine_params(*column_minmax(y), bits)


def _close(a, b, dtype):
    # fp32: one dot accumulated in another order + a few fp32 ops; bf16/fp16: one output rounding
    # (the inputs of both sides are identical, only the rounding of the fp32 result can differ)
    return ulp_close(a, b, dtype, fp32_tol=1e-5, slack=1e-6)


# -- kernels against the torch reference ------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [8, 12])
def test_kernels_match_reference(bits, dtype, r):
    m, n, s_g, s_u = 37, 45, 2.0, 0.5
    yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _case(m, n, r, dtype, seed=bits * 100 + r)
    lo_g, st_g, inv_g = _own_params(yw_g, bits)
    lo_u, st_u, inv_u = _own_params(yw_u, bits)
    args = (yw_g, yw_u, xa_g, xa_u, b_g, b_u, s_g, s_u, lo_g, inv_g, lo_u, inv_u, bits)
    cg, cu, d = glu_lora_forward(*args, backend="triton")
    cg_r, cu_r, d_r = glu_lora_forward(*args, backend="torch")
    # codes bit-identical to the reference, which are hyclora.quant.quantize's codes
    assert torch.equal(cg, cg_r) and torch.equal(cu, cu_r)
    assert torch.equal(cg, quantize(yw_g, bits, backend="torch").codes)
    assert d.dtype == dtype and _close(d, d_r, dtype)

    bargs = (cg, cu, lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g, b_u, s_g, s_u, dd, bits)
    out = glu_lora_backward(*bargs, dtype=dtype, backend="triton")
    ref = glu_lora_backward(*bargs, dtype=dtype, backend="torch")
    for got, want in zip(out, ref):
        assert got.dtype == want.dtype and _close(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("bits", [(4, 2), (8, 4), (2, 8)])
def test_kernels_gate_and_up_at_different_widths(bits):
    # the blocks keep G (a SiLU input) at twice q_bit and U at q_bit (storage.DOUBLE_BIT_TENSORS)
    m, n, r = 37, 45, 12
    bg, bu = bits
    yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _case(m, n, r, torch.float32, seed=bg * 10 + bu)
    lo_g, st_g, inv_g = _own_params(yw_g, bg)
    lo_u, st_u, inv_u = _own_params(yw_u, bu)
    args = (yw_g, yw_u, xa_g, xa_u, b_g, b_u, 2.0, 0.5, lo_g, inv_g, lo_u, inv_u, bits)
    cg, cu, d = glu_lora_forward_triton(*args, config=(16, 32, 4, 2), tensor_core_on_fp32=True)
    cg_r, cu_r, d_r = glu_lora_forward(*args, backend="torch")
    assert torch.equal(cg, quantize(yw_g, bg, backend="torch").codes)
    assert torch.equal(cu, quantize(yw_u, bu, backend="torch").codes)
    assert torch.equal(cg, cg_r) and torch.equal(cu, cu_r) and _close(d, d_r, torch.float32)
    bargs = (cg, cu, lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g, b_u, 2.0, 0.5, dd, bits)
    out = glu_lora_backward_triton(*bargs, dtype=torch.float32, config=(16, 32, 4, 2), tensor_core_on_fp32=True)
    for got, want in zip(out, glu_lora_backward(*bargs, dtype=torch.float32, backend="torch")):
        assert _close(got, want, torch.float32)
    with pytest.raises(ValueError, match="expected uint8"):
        glu_lora_backward(cu, cg, *bargs[2:], dtype=torch.float32, backend="torch")


@needs_triton
@pytest.mark.parametrize("config", [(16, 16, 4, 1), (16, 32, 4, 2), (32, 64, 4, 3, True)])
@pytest.mark.parametrize("bits", [2, 4])
def test_kernels_many_partial_tiles(config, bits):
    # several programs per dimension, partial last tiles, ROW_ITERS sub-tiles past the end
    m, n, r = 53, 77, 20
    yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _case(m, n, r, torch.float32, seed=3)
    lo_g, st_g, inv_g = _own_params(yw_g, bits)
    lo_u, st_u, inv_u = _own_params(yw_u, bits)
    args = (yw_g, yw_u, xa_g, xa_u, b_g, b_u, 1.5, 0.25, lo_g, inv_g, lo_u, inv_u, bits)
    cg, cu, d = glu_lora_forward(*args, backend="triton", config=config)
    cg_r, cu_r, d_r = glu_lora_forward_torch(*args)
    assert torch.equal(cg, cg_r) and torch.equal(cu, cu_r) and _close(d, d_r, torch.float32)
    bargs = (cg, cu, lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g, b_u, 1.5, 0.25, dd, bits)
    out = glu_lora_backward(*bargs, dtype=torch.float32, backend="triton", config=config)
    for got, want in zip(out, glu_lora_backward_torch(*bargs, dtype=torch.float32)):
        assert _close(got, want, torch.float32)


@needs_triton
@pytest.mark.skipif(not INTERPRET, reason="a hook of the interpreter")
@pytest.mark.parametrize("bits", [2, 8])
def test_tensor_core_branch_under_the_interpreter(bits):
    # On the GPU bf16 operands take the tensor-core branch (one dot over the whole rank, B^T
    # loaded once per program); the interpreter's bf16 dot is wrong, so that branch is run here
    # on fp32 operands, which the interpreter multiplies correctly.
    m, n, r = 53, 77, 20
    yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _case(m, n, r, torch.float32, seed=13)
    lo_g, st_g, inv_g = _own_params(yw_g, bits)
    lo_u, st_u, inv_u = _own_params(yw_u, bits)
    args = (yw_g, yw_u, xa_g, xa_u, b_g, b_u, 1.5, 0.25, lo_g, inv_g, lo_u, inv_u, bits)
    cg, cu, d = glu_lora_forward_triton(*args, config=(16, 32, 4, 2), tensor_core_on_fp32=True)
    cg_r, cu_r, d_r = glu_lora_forward_torch(*args)
    assert torch.equal(cg, cg_r) and torch.equal(cu, cu_r) and _close(d, d_r, torch.float32)
    bargs = (cg, cu, lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g, b_u, 1.5, 0.25, dd, bits)
    out = glu_lora_backward_triton(*bargs, dtype=torch.float32, config=(16, 32, 4, 2), tensor_core_on_fp32=True)
    for got, want in zip(out, glu_lora_backward_torch(*bargs, dtype=torch.float32)):
        assert _close(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("lora", [(True, False), (False, True), (False, False)])
def test_kernels_without_some_lora(lora):
    m, n, bits = 21, 33, 4
    yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _case(m, n, 8, torch.float32, seed=5, lora=lora)
    lo_g, st_g, inv_g = _own_params(yw_g, bits)
    lo_u, st_u, inv_u = _own_params(yw_u, bits)
    args = (yw_g, yw_u, xa_g, xa_u, b_g, b_u, 2.0, 2.0, lo_g, inv_g, lo_u, inv_u, bits)
    got, ref = glu_lora_forward(*args, backend="triton"), glu_lora_forward_torch(*args)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and _close(got[2], ref[2], torch.float32)
    bargs = (ref[0], ref[1], lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g, b_u, 2.0, 2.0, dd, bits)
    dg, du, d_hat = glu_lora_backward(*bargs, dtype=torch.float32, backend="triton", need_d=False)
    dg_r, du_r, _ = glu_lora_backward_torch(*bargs, dtype=torch.float32, need_d=False)
    assert d_hat is None and _close(dg, dg_r, torch.float32) and _close(du, du_r, torch.float32)


@needs_triton
@pytest.mark.parametrize("dot_dtype", [torch.bfloat16, torch.float32])
def test_kernel_dot_dtype_follows_torch(dot_dtype):
    # fp32 LoRA weights with bf16 activations (autocast): the operands are rounded to the dot
    # dtype first, as F.linear under autocast does; the kernel then agrees with the reference
    m, n, r, bits = 37, 45, 12, 4
    yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _case(m, n, r, torch.bfloat16, seed=9, lora_dtype=torch.float32)
    lo_g, st_g, inv_g = _own_params(yw_g, bits)
    lo_u, st_u, inv_u = _own_params(yw_u, bits)
    args = (yw_g, yw_u, xa_g, xa_u, b_g, b_u, 2.0, 0.5, lo_g, inv_g, lo_u, inv_u, bits)
    got = glu_lora_forward(*args, backend="triton", dot_dtype=dot_dtype)
    ref = glu_lora_forward_torch(*args, dot_dtype=dot_dtype)
    assert _close(got[2], ref[2], torch.bfloat16)
    other = glu_lora_forward_torch(*args, dot_dtype=torch.float32 if dot_dtype == torch.bfloat16 else torch.bfloat16)
    assert not torch.equal(other[2], ref[2])  # the dot dtype matters on this data: the test can fail


# -- the reference against autograd -----------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 8])
def test_reference_matches_autograd(bits):
    m, n, r, s_g, s_u = 37, 45, 12, 2.0, 0.5
    yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _case(m, n, r, torch.float32, seed=11)
    lo_g, st_g, inv_g = _own_params(yw_g, bits)
    lo_u, st_u, inv_u = _own_params(yw_u, bits)
    cg, cu, d = glu_lora_forward_torch(yw_g, yw_u, xa_g, xa_u, b_g, b_u, s_g, s_u,
                                          lo_g, inv_g, lo_u, inv_u, bits)
    # forward: D from the exact (unquantised) G and U, in fp64 through plain torch ops
    g64 = yw_g.double() + s_g * xa_g.double() @ b_g.double().t()
    u64 = yw_u.double() + s_u * xa_u.double() @ b_u.double().t()
    assert rel_err(d, F.silu(g64) * u64) < 1e-6
    # backward: G~, U~ rebuilt from what quantize() keeps, then autograd of SiLU(G~) * U~
    deq_g = dequantize(QuantizedTensor(cg, lo_g, st_g, bits=bits, shape=(m, n), dtype=torch.float32)).double()
    deq_u = dequantize(QuantizedTensor(cu, lo_u, st_u, bits=bits, shape=(m, n), dtype=torch.float32)).double()
    g = (deq_g + s_g * xa_g.double() @ b_g.double().t()).requires_grad_()
    u = (deq_u + s_u * xa_u.double() @ b_u.double().t()).requires_grad_()
    d_hat_ref = F.silu(g) * u
    d_hat_ref.backward(dd.double())
    dg, du, d_hat = glu_lora_backward_torch(cg, cu, lo_g, st_g, lo_u, st_u, xa_g, xa_u, b_g, b_u,
                                               s_g, s_u, dd, bits, dtype=torch.float32)
    assert rel_err(dg, g.grad) < 1e-6 and rel_err(du, u.grad) < 1e-6 and rel_err(d_hat, d_hat_ref) < 1e-6


def test_bad_inputs_raise_clear_errors():
    yw_g, yw_u, xa_g, xa_u, b_g, b_u, dd = _case(8, 16, 4, torch.float32, seed=0)
    lo, _, inv = _own_params(yw_g, 4)
    with pytest.raises(ValueError, match="reshape"):
        glu_lora_forward(yw_g.view(2, 4, 16), yw_u, xa_g, xa_u, b_g, b_u, 1.0, 1.0, lo, inv, lo, inv, 4)
    with pytest.raises(ValueError, match="lora_B layout"):
        glu_lora_forward(yw_g, yw_u, xa_g, xa_u, b_g.t(), b_u, 1.0, 1.0, lo, inv, lo, inv, 4)
    with pytest.raises(ValueError, match="both"):
        glu_lora_forward(yw_g, yw_u, xa_g, xa_u, None, b_u, 1.0, 1.0, lo, inv, lo, inv, 4)
    with pytest.raises(ValueError, match="per-channel"):
        glu_lora_forward(yw_g, yw_u, xa_g, xa_u, b_g, b_u, 1.0, 1.0, lo[:3], inv, lo, inv, 4)
    with pytest.raises(ValueError, match="bits=3"):
        glu_lora_forward(yw_g, yw_u, xa_g, xa_u, b_g, b_u, 1.0, 1.0, lo, inv, lo, inv, 3)
    with pytest.raises(ValueError, match="uint8"):
        glu_lora_backward(yw_g, yw_u, lo, inv, lo, inv, xa_g, xa_u, b_g, b_u, 1.0, 1.0, dd, 4,
                             dtype=torch.float32)
    if HAS_TRITON_DEVICE:
        with pytest.raises(ValueError, match="ranks differ"):
            glu_lora_forward(yw_g, yw_u, xa_g, xa_u[:, :3], b_g, b_u[:, :3], 1.0, 1.0, lo, inv, lo, inv, 4,
                                backend="triton")


# -- block glue -------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_base_forward_is_lora_linear_forward_without_the_sum(dropout):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 16, generator=gen)
    w, bias = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    a, b = torch.randn(6, 16, generator=gen), torch.randn(24, 6, generator=gen)
    meta = LinearMeta("gate_proj", has_lora=True, scaling=2.0, dropout_p=dropout)
    torch.manual_seed(7)
    full = lora_linear_forward(meta, x, w, bias, a, b)
    torch.manual_seed(7)
    base = lora_base_forward(meta, x, w, bias, a, b)
    assert base.y is None and torch.equal(base.y_w, full.y_w) and torch.equal(base.xa, full.xa)
    assert (base.rng_state is None) == (dropout == 0) and (dropout == 0 or torch.equal(base.rng_state, full.rng_state))
    assert lora_base_forward(LinearMeta("up_proj"), x, w, None, None).xa is None


@pytest.mark.parametrize("state", ["none", "calibrating", "frozen", "replay"])
def test_quant_params_give_the_codes_policy_keep_gives(state):
    pol = StoragePolicy("intra_inter_full_fuse", 2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(29, 45, generator=gen) * 3 + 1
    calib = torch.randn(29, 45, generator=gen)  # a previous micro-batch with another range

    def stats_for():
        if state == "none":
            return None
        s = ChannelStats(45, iteration_threshold=1 if state == "frozen" else 3)
        quantize(calib, 2, stats=s)
        return s

    s_keep, s_fused = stats_for(), stats_for()
    replay = state == "replay"
    store = TensorStore()
    pol.keep(store, "gate", x, s_keep, update=True, replay=replay)
    lo, step, inv, idx = pol.quant_params(x, s_fused, update=True, replay=replay, name="gate")
    assert idx is None
    kept = store._tensors  # codes, lo, step, idx, vals of the one kept tensor
    bits = pol.bits_for("gate")  # G, a SiLU input, at twice q_bit
    assert bits == 4
    fused_codes = glu_lora_forward_torch(x, x, None, None, None, None, 1.0, 1.0, lo, inv, lo, inv, bits)[0]
    assert torch.equal(fused_codes, kept[0]) and torch.equal(lo, kept[1]) and torch.equal(step, kept[2])
    if s_keep is not None:  # the statistics advanced the same way
        assert s_keep._count_host == s_fused._count_host
        assert torch.equal(s_keep.lo, s_fused.lo) and torch.equal(s_keep.hi, s_fused.hi)
    if state == "frozen":  # values outside the calibrated range were clamped: not the own range
        assert not torch.equal(fused_codes, quantize(x, 2, backend="torch").codes)


BLOCK_CASES = {
    "plain": dict(),
    "bias+dropout": dict(bias=True, dropout=0.2),
    "no LoRA on up": dict(lora=(True, False, True)),
    "no LoRA on down": dict(lora=(True, True, False)),
}


# every case through the torch reference at 2 and 4 bits; through the (interpreted) kernels
# once each, at one bit width each (the interpreter is slow)
BLOCK_RUNS = [(c, b, "torch") for c in BLOCK_CASES for b in (2, 4)] + [
    pytest.param(c, b, "triton", marks=needs_triton)
    for c, b in (("plain", 4), ("bias+dropout", 2), ("no LoRA on up", 8), ("no LoRA on down", 2))]


@pytest.mark.parametrize("case,bits,backend", BLOCK_RUNS)
def test_fused_block_equals_op_by_op_block(case, bits, backend):
    """MLP block with the fused epilogue == the intra_inter block, to fp32 rounding, through
    calibration (own ranges), frozen statistics and a checkpoint replay."""
    opts = BLOCK_CASES[case]
    b, s, d, f, r = 2, 19, 24, 45, 12
    gen = torch.Generator().manual_seed(bits)
    params, metas = mlp_params(d, f, r, gen, lora=opts.get("lora", (True, True, True)), bias=opts.get("bias", False))
    if opts.get("dropout"):
        metas = tuple(LinearMeta(m.name, m.has_lora, m.scaling, opts["dropout"]) for m in metas)
    norm_w = (torch.rand(d, generator=gen) + 0.5).requires_grad_()
    params_dev = [None if p is None else p.detach().to(DEVICE).requires_grad_(p.requires_grad) for p in params]
    norm_dev = norm_w.detach().to(DEVICE).requires_grad_()
    stats = {lt: {k: v.to(DEVICE) for k, v in mlp_stats(d, f, threshold=2).items()}
             for lt in ("intra_inter", "intra_inter_full_fuse")}
    seed = 5 if opts.get("dropout") else None
    for step in range(3):  # calibrating, calibrating, frozen
        x = (torch.randn(b, s, d, generator=gen) * 2).to(DEVICE)
        y_ref, g_ref = mlp_grads("intra_inter", x, norm_dev, params_dev, metas, bits, stats["intra_inter"],
                                 backend, dropout_seed=seed)
        y_fus, g_fus = mlp_grads("intra_inter_full_fuse", x, norm_dev, params_dev, metas, bits,
                                 stats["intra_inter_full_fuse"], backend, dropout_seed=seed)
        assert rel_err(y_fus, y_ref) < 1e-6, step
        assert len(g_fus) == len(g_ref) >= 6  # x, norm weight, LoRA A/B of 2+ linears
        for gf, gr in zip(g_fus, g_ref):
            assert gr.norm() > 0 and rel_err(gf, gr) < 2e-5, step
    for lt in stats:  # both counted the same steps
        assert all(st._count_host == 2 for st in stats[lt].values())
    # a checkpoint recompute replaying a calibrating forward (own ranges, statistics untouched)
    replay = frozenset(("gate", "up"))
    x = (torch.randn(b, s, d, generator=gen) * 2).to(DEVICE)
    _, g_ref = mlp_grads("intra_inter", x, norm_dev, params_dev, metas, bits, stats["intra_inter"], backend,
                         update=False, replay=replay, dropout_seed=seed)
    _, g_fus = mlp_grads("intra_inter_full_fuse", x, norm_dev, params_dev, metas, bits,
                         stats["intra_inter_full_fuse"], backend, update=False, replay=replay, dropout_seed=seed)
    for gf, gr in zip(g_fus, g_ref):
        assert rel_err(gf, gr) < 2e-5


def test_fused_block_keeps_what_intra_inter_keeps():
    # same saved tensors (names, shapes, dtypes, bytes): the memory accounting is unchanged
    b, s, d, f, r = 2, 7, 16, 33, 8
    gen = torch.Generator().manual_seed(0)
    params, metas = mlp_params(d, f, r, gen)
    norm_w = torch.rand(d, generator=gen) + 0.5
    manifests = {}
    for lt in ("intra_inter", "intra_inter_full_fuse"):
        record = {}
        plan = MLPPlan(layer_name="l0", eps=1e-5, linears=metas, policy=StoragePolicy(lt, 2),
                       stats=mlp_stats(d, f, 1), update=True, record=record)
        mlp_block(plan, torch.randn(b, s, d, generator=torch.Generator().manual_seed(1)), norm_w, params)
        manifests[lt] = record["mlp"]
    assert manifests["intra_inter"] == manifests["intra_inter_full_fuse"]
    assert {e["name"] for e in manifests["intra_inter"]} >= {"gate", "up", "xa_gate", "xa_up"}


def test_fused_block_bf16_close_to_op_by_op():
    # bf16 activations: the fused path rounds once (fp32 inside the kernel), the op-by-op path
    # after every op, so they differ by bf16 roundings, not more. Measured (fused against
    # op-by-op): output 0.0042, gradients 0.0043..0.0058; asserted 0.006 and 0.008.
    b, s, d, f, r, bits = 2, 19, 24, 45, 12, 4
    gen = torch.Generator().manual_seed(3)
    params, metas = mlp_params(d, f, r, gen, dtype=torch.bfloat16)
    params = [None if p is None else p.detach().to(torch.bfloat16).requires_grad_(p.requires_grad) for p in params]
    norm_w = (torch.rand(d, generator=gen) + 0.5).to(torch.bfloat16)
    x = (torch.randn(b, s, d, generator=gen) * 2).to(torch.bfloat16)
    res = {}
    for lt in ("intra_inter", "intra_inter_full_fuse"):
        res[lt] = mlp_grads(lt, x, norm_w, params, metas, bits, mlp_stats(d, f, 0), "torch")
    y_ref, g_ref = res["intra_inter"]
    y_fus, g_fus = res["intra_inter_full_fuse"]
    assert rel_err(y_fus, y_ref) < 0.006
    errs = [rel_err(gf, gr) for gf, gr in zip(g_fus, g_ref)]
    print("bf16 fused vs op-by-op:", round(rel_err(y_fus, y_ref), 5), [round(e, 4) for e in errs])
    assert max(errs) < 0.008


def test_fused_forward_glue_stores_decodable_codes():
    # what the fused forward keeps dequantises (through the ordinary TensorLoad) to what
    # quantize()/dequantize() give for Y_W: the backward of any other path could read it
    gen = torch.Generator().manual_seed(6)
    d, f, r = 16, 45, 8
    params, metas = mlp_params(d, f, r, gen)
    xn = torch.randn(3, 5, d, generator=gen)
    g_out = lora_base_forward(metas[0], xn, *params[0:4])
    u_out = lora_base_forward(metas[1], xn, *params[4:8])
    plan = MLPPlan(layer_name="l0", eps=1e-5, linears=metas, policy=StoragePolicy("intra_inter_full_fuse", 4))
    store = TensorStore()
    d_out = fused_gate_up_forward(plan, store, g_out, u_out, params[3], params[7])

    class Ctx:
        pass

    ctx = Ctx()  # what store.save(ctx) + autograd would hand the backward
    ctx.saved_tensors = tuple(store._tensors)
    ctx.hyclora_index = store._index
    load = TensorLoad(ctx, "torch")
    for name, out in (("gate", g_out), ("up", u_out)):
        bits = plan.policy.bits_for(name)  # gate 8, up 4
        assert torch.equal(load.get(name), dequantize(quantize(out.y_w, bits, backend="torch")))
    g_full = lora_linear_forward(metas[0], xn, *params[0:4]).y
    u_full = lora_linear_forward(metas[1], xn, *params[4:8]).y
    assert rel_err(d_out, F.silu(g_full) * u_full) < 1e-6


# -- the kernels compile for the H200 (sm_90) without a GPU -----------------------------------

def _swiglu_case(which, bits, dt, r, cfg):
    ptrs = (dict(yg_ptr="Y", yu_ptr="Y", xag_ptr="X", xau_ptr="X", bg_ptr="X", bu_ptr="X", log_ptr="fp32",
                 invg_ptr="fp32", lou_ptr="fp32", invu_ptr="fp32", cg_ptr="u8", cu_ptr="u8", d_ptr="Y")
            if which == "fwd" else
            dict(cg_ptr="u8", cu_ptr="u8", log_ptr="fp32", stepg_ptr="fp32", lou_ptr="fp32", stepu_ptr="fp32",
                 xag_ptr="X", xau_ptr="X", bg_ptr="X", bu_ptr="X", dd_ptr="Y", dg_ptr="Y", du_ptr="Y", dh_ptr="Y"))
    ptrs = {k: {"Y": dt, "X": dt}.get(v, v) for k, v in ptrs.items()}
    bm, bn, warps, ri = cfg[:4]
    r_block = max(16, 1 << (r - 1).bit_length())
    consts = dict(BITS_G=bits, BITS_U=bits, ACT=0, HAS_G=True, HAS_U=True, DOT_FP32=dt == "fp32", USE_FMA=False, BLOCK_M=bm,
                  BLOCK_N=bn, BLOCK_R=r_block, ROW_ITERS=ri)
    consts.update(dict(EMULATE_BF16_RNE=False) if which == "fwd" else
                  dict(NEED_D=True, EMULATE_BF16_RNE_GRAD=False, EMULATE_BF16_RNE_D=False))
    return dict(module="hyclora.kernels.glu", kernel=f"_glu_{which}_kernel", ptrs=ptrs,
                floats=["scale_g", "scale_u"], consts=consts, warps=warps, tag=[which, bits, dt, r])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """Both kernels compile ahead of time for sm_90 (Triton's bundled ptxas, no GPU needed) at
    every bit width, in bf16/fp16/fp32, ranks 12, 16 and 128, and the default tile never spills.
    Measured registers per thread: bf16 r=16 78-92, bf16 r=128 ~200, fp32 r=128 ~200, the
    CUDA-core (USE_FMA) variants at r=16 113-197 (with the fp32 dot fully unrolled over K it had
    a 5 KB stack; 128x128 tiles spilled 2 KB)."""
    fixed = list(FIXED_TILE)
    cases = [_swiglu_case(w, bits, "bf16", 16, fixed) for w in ("fwd", "bwd") for bits in (2, 4)]
    fma = [_swiglu_case(w, 2, "bf16", 16, list(c)) for c in FWD_CONFIGS if c[4] for w in ("fwd", "bwd")]
    for c in fma:  # the CUDA-core variants the autotuner may pick
        c["consts"]["USE_FMA"] = True
        c["tag"] = c["tag"][:3] + ["fma"]
    cases += fma
    cases += [_swiglu_case(w, 2, "fp32", 128, fixed) for w in ("fwd", "bwd")]
    cases += [_swiglu_case("fwd", 8, "bf16", 128, fixed), _swiglu_case("bwd", 8, "fp16", 12, fixed)]
    for (which, bits, dt, r), regs, stack, local in compile_for_sm90(cases, tmp_path):
        assert local == 0 and stack == 0, (which, bits, dt, r, regs, stack)  # no spills
        if dt == "bf16" and r == 16:  # the benchmark case: room for 2+ blocks of 8 warps per SM
            assert regs <= 128, (which, bits, regs)
        if r == "fma":
            assert regs <= 200, (which, bits, regs)
