"""The two autograd Functions of a Llama-style decoder layer, with hand-written backwards.

* :class:`AttentionBlockFn`: ``x -> RMSNorm -> q/k/v LoRA -> RoPE -> attention -> o LoRA -> + x``
* :class:`MLPBlockFn`: ``x -> RMSNorm -> gate/up LoRA -> SiLU(G) * U -> down LoRA -> + x``

The forward computes every output from exact activations (outputs equal the unpatched
model's); what is kept for the backward is decided by a :class:`StoragePolicy`, so the three
layer types share this code. Parameters are Function inputs (never views made outside), so
ZeRO-3 can swap ``param.data``; LoRA A/B gradients are reduced over the batch here.

What each layer type keeps, at which width and bits, is the table of
:mod:`hyclora.ops.tensor_specs` (the norm inputs with their rstd, the exact LoRA ``xa``, the
q/k/v and gate/up base outputs, and for ``intra`` the activation and down_proj input; the
normalised q/k/v and gate/up inputs are never kept: they are rebuilt from the norm input).

With sdpa nothing of the attention map and no ``o`` is kept: the backward recomputes the
attention forward from the (rebuilt) q/k/v, which also yields the o_proj input.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import torch

from .attention import (
    attention_forward,
    attention_recompute,
    check_implementation,
    eager_attention_backward,
    eager_attention_forward,
    is_documents,
    is_s2,
)
from . import s2attn
from .s2attn import resolve_group_size, s2_flash_backward, s2_flash_eligible, s2_flash_forward, s2_output, s2_sdpa_backward
from . import fused_rmsnorm, fused_rope, fused_swiglu
from .block_common import (PARAMS_PER_LINEAR, XA_NAMES, BlockPlan, backward_in_autocast, begin_forward, end_forward,
                           keep, keep_linear_extras, linear_grads, linear_grads_input_first, linear_params,
                           merge_part_grads, part_inputs, part_param_rows)
from .lora import lora_base_forward, lora_linear_forward, lora_reconstruct
from hyclora.kernels.rmsnorm import rmsnorm_backward, rmsnorm_backward_dense, rmsnorm_forward, rmsnorm_from_rstd_fused
from hyclora.kernels.rope import apply_rope, rope_backward
from .storage import Manifest, TensorLoad, TensorStore
from .swiglu import silu_mul_backward, silu_mul_forward
from hyclora.quant import check_finite  # raises FloatingPointError naming the place
from hyclora.quant.checks import active_guard
from hyclora.quant import uncounted_updates


@dataclass
class AttentionPlan(BlockPlan):
    num_heads: int = 1
    num_kv_heads: int = 1
    head_dim: int = 1
    scaling: float = 1.0
    impl: str = "sdpa"
    is_causal: bool = True
    # S²-Attn's group (impl "hyclora_s2attn"): fraction of the sequence (None: LongLoRA's 1/4) or
    # a fixed size in tokens; read from the model config that enable_s2attn sets.
    s2_group_ratio: Optional[float] = None
    s2_group_size: Optional[int] = None
    # q/k norms (Qwen3, Gemma 3): an RMSNorm over head_dim of every head of q and of k, after the
    # projections and before RoPE. ``(q eps, k eps)``, or None for none; their weights are the
    # block's last two inputs (after the 16 linear parameters). ``qk_norm_variant``: how the
    # weight scales the normalised head (one of QK_NORM_VARIANTS).
    qk_norm_eps: Optional[Tuple[float, float]] = None
    qk_norm_variant: str = "w"
    # Gemma 2/3: ``norm_variant`` how the norm weights scale ("w"; "1+w"); ``post_norm_eps`` the
    # eps of a post-norm on the o_proj output before the residual add (its weight is the block's
    # last input, after the q/k norm weights), None without; ``softcap`` the attention logit
    # soft-capping ``cap * tanh(scores / cap)`` (eager attention only), None without.
    norm_variant: str = "w"
    post_norm_eps: Optional[float] = None
    softcap: Optional[float] = None


@dataclass
class MLPPlan(BlockPlan):
    """``d_ff``: the gate/up width; with it, :func:`mlp_block` runs long inputs in row chunks
    (0: unknown, never chunked). ``act``: the gate's activation, a transformers name (SiLU:
    SwiGLU; ``gelu_pytorch_tanh``: Gemma's GeGLU; :data:`hyclora.ops.swiglu.GATED_ACTIVATIONS`).
    ``norm_variant``: how the norm weights scale (``"w"``; Gemma's ``"1+w"``).
    ``post_norm_eps``: with a post-norm (Gemma's ``post_feedforward_layernorm``) on the down_proj
    output before the residual add, its eps, and its weight is the block's last input; None
    without."""

    d_ff: int = 0
    act: str = "silu"
    norm_variant: str = "w"
    post_norm_eps: Optional[float] = None




# -- helpers --------------------------------------------------------------------------------


def _normalised(plan: BlockPlan, x_hat: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The RMSNorm output rebuilt from the kept norm input and its exact ``rstd``, op by op as
    :func:`rmsnorm_forward` computes it (bit-identical when ``x_hat`` is the exact input; one
    Triton pass under ``intra_inter_full_fuse``, same roundings).

    The normalised tensor (input of q/k/v, of gate/up) is never kept: it is the norm input
    scaled per row (exact ``rstd``) and per channel (the weight), so renormalising the kept norm
    input costs one elementwise pass and no bytes, and carries the norm input's quantisation
    error, which its outlier channels and rows keep smaller than a separate copy's (measured on
    SmolLM2-135M: BENCHMARKS.md)."""
    return rmsnorm_from_rstd_fused(x_hat, rstd, weight, backend=plan.policy.fused_backend,
                                   variant=fused_rmsnorm.norm_variant(plan))


def _norm_input(plan: BlockPlan, load: TensorLoad, name: str, rstd_name: str, need_normalised: bool):
    """``(x_hat, x_n)``: the kept norm input (None when nothing needs it yet) and the normalised
    input rebuilt from it (None when no linear behind the norm has LoRA)."""
    if not need_normalised:
        return None, None
    x_hat = load.get(name)
    return x_hat, _normalised(plan, x_hat, load.get(rstd_name), load.param(2))


def _norm_backward(plan: BlockPlan, load: TensorLoad, need, name: str, rstd_name: str, x_hat, dxn, dy):
    """RMSNorm backward plus the residual: ``(dx, dnorm_weight)``."""
    if not (need[1] or need[2]):
        return None, None
    if x_hat is None and plan.policy.fused and not need[2]:  # one pass from the codes (+ residual)
        return fused_rmsnorm.fused_norm_backward(plan, load, name, rstd_name, load.param(2), dxn, dy), None
    if x_hat is None:
        x_hat = load.get(name)
    # full_fuse: one pass over the rebuilt input (dx + residual, weight-gradient partials)
    return rmsnorm_backward_dense(dxn, x_hat, load.get(rstd_name), load.param(2), dy,
                                                need_dx=need[1], need_dweight=need[2],
                                                backend=plan.policy.fused_backend,
                                                variant=fused_rmsnorm.norm_variant(plan))


# -- post-norms (Gemma's sandwich norms) ---------------------------------------------------------
#
# A post-norm normalises a branch output (o_proj's, down_proj's) before the residual add:
# y = x + PostNorm(z). Its backward needs z and the exact per-token rstd; z is kept as a norm
# input is (tensor_specs rows "attn_out" / "mlp_out": twice the bits, exact outlier channels and
# rows; as is for baseline), the rstd in fp32 (4 bytes a token). Recomputing z instead would cost
# the o_proj / down_proj forward again (and for down_proj the whole gated epilogue before dD).


def _post_norm_forward(plan, store: TensorStore, name: str, rstd_name: str, z: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    """``PostNorm(z)``, keeping ``z`` under ``name`` and its rstd under ``rstd_name``."""
    if plan.policy.fused:  # one pass: RMSNorm + Q+o(z)
        return fused_rmsnorm.fused_norm_forward(plan, store, name, rstd_name, z, weight, eps=plan.post_norm_eps)[0]
    h, rstd = rmsnorm_forward(z, weight, plan.post_norm_eps, plan.norm_variant)
    keep(plan, store, name, z)
    store.plain(rstd_name, rstd)
    return h


def _post_norm_backward(plan, load: TensorLoad, name: str, rstd_name: str, weight: torch.Tensor,
                        dy: torch.Tensor, need_dweight: bool):
    """``(dz, dweight)``: the gradient of the branch output ``z`` from the block output's ``dy``
    (``dweight`` None unless ``need_dweight``)."""
    if plan.policy.fused and not need_dweight:  # one pass from the codes
        return fused_rmsnorm.fused_norm_backward(plan, load, name, rstd_name, weight, dy, None), None
    return rmsnorm_backward_dense(dy, load.get(name), load.get(rstd_name), weight, None, need_dx=True,
                                  need_dweight=need_dweight, backend=plan.policy.fused_backend,
                                  variant=plan.norm_variant)


# -- attention block ------------------------------------------------------------------------

_QKV = ("q", "k", "v")
# how many leading linears of (the attention block, the MLP block) take the same input (q/k/v;
# gate/up): only those may be the parts of one fused linear (lora.FusedPart)
SHARED_INPUT_LINEARS = (3, 2)
_ATTN_LIN_OFFSET = 6  # forward(ctx, plan, x, norm_w, cos, sin, mask, *lin[, q_norm_w, k_norm_w])
_ATTN_LINEAR_PARAMS = PARAMS_PER_LINEAR * 4  # q, k, v, o; the q/k norm weights (if any) follow


def _num_qk_norm_weights(plan) -> int:
    """How many q/k norm weights follow the linear parameters (0 or 2); the post-norm weight, if
    any, comes after them."""
    return 0 if plan.qk_norm_eps is None else 2


# -- q/k norms ---------------------------------------------------------------------------------
#
# What is kept: nothing beyond what the block keeps without them. q and k are kept before the norm
# (and before RoPE), as Y or as Q(XW) (intra_inter), exactly as for a layer without q/k norms; the
# backward rebuilds the pre-norm q/k from them, recomputes the norm (its per-head rstd included,
# from the rebuilt values: bit-identical for baseline, whose q/k are exact) and RoPE, and chains
# attention backward -> RoPE backward -> norm backward -> linear backward. Keeping the normalised
# q/k instead would leave the pre-norm values (which the norm backward needs) to be rebuilt from
# them, and Q(XW) cannot be normalised before the LoRA term is added.

# implemented: "w" (weight * x_hat, Qwen3) and "1+w" (x_hat * (1 + w) in fp32, Gemma 3), the
# variants of hyclora.kernels.rmsnorm
QK_NORM_VARIANTS = ("w", "1+w")


def _qk_norm_forward(plan: AttentionPlan, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(y, rstd)`` of a q/k norm over the last dim (head_dim) of ``x`` (``(b, s, heads, d)``),
    op by op as the model's norm computes it (fp32 statistics, cast back, times the weight)."""
    if plan.qk_norm_variant in QK_NORM_VARIANTS:
        return rmsnorm_forward(x, weight, eps, plan.qk_norm_variant)
    raise NotImplementedError(f"hyclora: {plan.layer_name}: q/k norm variant {plan.qk_norm_variant!r} is not "
                              f"implemented (implemented: {', '.join(QK_NORM_VARIANTS)})")


def _qk_norm_backward(plan: AttentionPlan, dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor,
                      weight: torch.Tensor, need_dweight: bool):
    """``(dx, dweight)`` of :func:`_qk_norm_forward` (``dweight`` None unless ``need_dweight``)."""
    if plan.qk_norm_variant in QK_NORM_VARIANTS:
        return rmsnorm_backward(dy, x, rstd, weight, need_dx=True, need_dweight=need_dweight,
                                variant=plan.qk_norm_variant)
    raise NotImplementedError(f"hyclora: {plan.layer_name}: q/k norm variant {plan.qk_norm_variant!r} is not "
                              f"implemented (implemented: {', '.join(QK_NORM_VARIANTS)})")
_GATE_UP = ("gate", "up")
_MLP_LIN_OFFSET = 3  # forward(ctx, plan, x, norm_w, *lin[, post_norm_w])
_MLP_LINEAR_PARAMS = PARAMS_PER_LINEAR * 3  # gate, up, down; the post-norm weight (if any) follows


_EMPTY_ROWS = [None, False]  # ((weak ref, version) of the last mask checked, whether it had fully masked rows)


def _has_fully_masked_rows(mask) -> bool:
    """Whether some query row of ``mask`` attends to no key (left padding under a causal mask).

    One host read per distinct mask: a forward hands every decoder layer the same mask tensor,
    so the layers after the first reuse the answer."""
    if mask is None or is_documents(mask):  # every token of a packed document sees itself
        return False
    last = _EMPTY_ROWS[0]
    if last is None or last[0]() is not mask or last[1] != mask._version:
        keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        _EMPTY_ROWS[0], _EMPTY_ROWS[1] = (weakref.ref(mask), mask._version), bool((~keep.any(-1)).any())
    return _EMPTY_ROWS[1]


# (weak ref, version, guard) of the last decoder-layer output checked. A decoder stack hands that
# very tensor to the next layer, whose input check would read the same values into the same
# guard again (eleven ops per layer); a tensor changed in place since (another version), another
# tensor, or another guard (a CUDA-graph capture's) is checked.
_LAST_OUTPUT = [None]


def _check_input(plan, x: torch.Tensor) -> None:
    last = _LAST_OUTPUT[0]
    if last is not None and last[0]() is x and last[1] == x._version and last[2] is active_guard():
        return
    check_finite(x, f"{plan.layer_name} (input of the decoder layer)")


def _check_output(plan, y: torch.Tensor) -> None:
    check_finite(y, f"{plan.layer_name} (output of the decoder layer)")
    _LAST_OUTPUT[0] = (weakref.ref(y), y._version, active_guard())


def _core_impl(plan, mask) -> str:
    """The attention kernel a block runs. An ``eager`` layer that keeps no map (``probs_mode ==
    "recompute"``, the default when compressing) runs the fused sdpa kernel in the forward and in
    the backward's recompute: the eager softmax map would only be a transient of b*h*s*s elements
    (fp32 in the softmax) that nothing keeps, and the two compute the same attention (gradients
    equal to rounding, tests/models/test_eager_as_sdpa.py). Except when a query row is fully
    masked (left padding): eager makes such a row uniform through rounding and sdpa's backward
    does not follow that, so those batches keep the eager formulation, like the unpatched model."""
    if (plan.impl == "eager" and plan.policy.probs_mode == "recompute" and plan.softcap is None
            and not _has_fully_masked_rows(mask)):
        return "sdpa"
    return plan.impl


def _s2_flash(core_impl: str, plan: AttentionPlan, q, k, v, mask) -> bool:
    """S²-Attn through ``s2attn.s2_flash_forward/backward`` (strided views, no copies)?"""
    return is_s2(core_impl) and plan.is_causal and s2_flash_eligible(q, k, v, mask)


def _s2_group(plan: AttentionPlan, seq_len: int) -> int:
    return resolve_group_size(seq_len, plan.s2_group_ratio, plan.s2_group_size)


class AttentionBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: AttentionPlan, x, norm_w, cos, sin, mask, *lin):
        check_implementation(plan.impl, plan.layer_name)
        # lin: the 16 linear parameters, then the q/k norm weights; q/k/v take the same input
        begin_forward(ctx, plan, lin, norm_w, x, shared_input=SHARED_INPUT_LINEARS[0])
        pol = plan.policy
        b, s, _ = x.shape
        H, HKV, D = plan.num_heads, plan.num_kv_heads, plan.head_dim
        qk_norm_w = lin[_ATTN_LINEAR_PARAMS:_ATTN_LINEAR_PARAMS + _num_qk_norm_weights(plan)]
        if plan.check_finite:
            _check_input(plan, x)
        store = TensorStore()
        store.params((None, None, norm_w) + (None, None, None) + tuple(lin),
                     rows=part_param_rows(plan.linears, _ATTN_LIN_OFFSET))
        lin = part_inputs(plan.linears, lin)  # a fused linear's parts: their bias / B rows

        if pol.fused:  # one pass: RMSNorm + Q+o(x_in)
            xn, _ = fused_rmsnorm.fused_norm_forward(plan, store, "x_in", "rstd1", x, norm_w)
        else:
            xn, rstd = rmsnorm_forward(x, norm_w, plan.eps, plan.norm_variant)
            keep(plan, store, "x_in", x)
            store.plain("rstd1", rstd)

        metas = plan.linears
        ys = []
        down = None  # (XA, rng state) of the previous linear: a later part of a fused qkv reuses it
        for i, name in enumerate(_QKV):
            out = lora_linear_forward(metas[i], xn, *linear_params(lin, i), fused=pol.fused_lora,
                                      down=down if metas[i].reuses_xa else None)
            keep_linear_extras(store, name, metas[i], out)
            down = (out.xa, out.rng_state)
            # Q/K are kept before RoPE (re-applied in the backward): RoPE mixes channel pairs
            # with a position-dependent angle, so per-channel statistics fit the un-rotated
            # values better (the paper's intra_inter choice; used here for every layer type).
            kept = out.y_w if pol.reconstruct else out.y
            bias = lin[PARAMS_PER_LINEAR * i + 1]
            if name == "v" and pol.compress and bias is not None:
                kept = kept - bias.to(kept.dtype)  # a per-channel offset would stretch V's row groups; added back in the backward
            keep(plan, store, name, kept)
            ys.append(out.y)
            del out  # its base part y_w is freed before the next projection runs (long inputs)
        del xn, down  # xn not kept: the backward renormalises the kept x_in (see _normalised)

        q = ys[0].view(b, s, H, D)
        k = ys[1].view(b, s, HKV, D)
        if plan.qk_norm_eps is not None:  # per head, token-major as the model normalises
            q = _qk_norm_forward(plan, q, qk_norm_w[0], plan.qk_norm_eps[0])[0]
            k = _qk_norm_forward(plan, k, qk_norm_w[1], plan.qk_norm_eps[1])[0]
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = ys[2].view(b, s, HKV, D).transpose(1, 2)
        del ys
        rope = pol.fused_backend  # full_fuse: one Triton pass (same bits)
        q, k = apply_rope(q, cos, sin, backend=rope), apply_rope(k, cos, sin, backend=rope)
        ctx.core_impl = _core_impl(plan, mask)
        if ctx.core_impl == "eager":
            o, probs = eager_attention_forward(q, k, v, mask, plan.scaling, plan.is_causal, plan.softcap)
            if pol.probs_mode != "recompute":
                pol.keep_probs(store, "probs", probs)
                if metas[3].has_lora:
                    keep(plan, store, "o", o)
            del probs
        elif _s2_flash(ctx.core_impl, plan, q, k, v, mask):  # S²-Attn on views, no block copies
            o = s2_output(q, k, v, _s2_group(plan, s), plan.scaling, pol.s2_block_kernels).view(b, s, H * D)
        else:
            o = attention_forward(ctx.core_impl, q, k, v, mask, plan.scaling, plan.is_causal,
                                  plan.s2_group_ratio, plan.s2_group_size)
        del q, k, v
        out_o = lora_linear_forward(metas[3], o, *linear_params(lin, 3), fused=pol.fused_lora)
        del o
        keep_linear_extras(store, "o", metas[3], out_o)
        o_y = out_o.y
        del out_o  # frees the base part before the residual add (long inputs)
        if plan.post_norm_eps is not None:  # Gemma: x + PostNorm(o_proj(o))
            o_y = _post_norm_forward(plan, store, "attn_out", "rstd_attn_out", o_y, lin[-1])
        y = x + o_y
        del o_y

        store.plain("cos", cos, describe=False)
        store.plain("sin", sin, describe=False)
        if plan.impl != "eager" or pol.probs_mode == "recompute":
            store.plain("mask", mask, describe=False)  # only a recompute of the attention needs it
        end_forward(ctx, plan, store, "attention")
        return y

    @staticmethod
    def backward(ctx, dy):
        return backward_in_autocast(ctx, AttentionBlockFn._backward, dy)

    @staticmethod
    def _backward(ctx, plan: AttentionPlan, dy):
        pol = plan.policy
        load = TensorLoad(ctx, pol.backend)
        need = ctx.needs_input_grad
        metas = plan.linears
        b, s, _ = dy.shape
        H, HKV, D = plan.num_heads, plan.num_kv_heads, plan.head_dim
        cos, sin, mask = load.get("cos"), load.get("sin"), load.get("mask")
        off = _ATTN_LIN_OFFSET
        lin_grads = [None] * (PARAMS_PER_LINEAR * 4)
        post_grads = ()
        d_branch = dy  # gradient of o_proj's output
        if plan.post_norm_eps is not None:
            post_idx = off + _ATTN_LINEAR_PARAMS + _num_qk_norm_weights(plan)
            d_branch, d_post = _post_norm_backward(plan, load, "attn_out", "rstd_attn_out", load.param(post_idx), dy,
                                                   bool(need[post_idx]))
            post_grads = (d_post,)

        def rebuilt_tokens(i: int, name: str, heads: int):  # (b, s, heads, D)
            val = load.get(name)
            bias = load.param(off + PARAMS_PER_LINEAR * i + 1)
            if name == "v" and pol.compress and bias is not None:
                val = val + bias.to(val.dtype)
            if pol.reconstruct:
                val = lora_reconstruct(metas[i], val, load.get(XA_NAMES[name]), load.param(off + PARAMS_PER_LINEAR * i + 3),
                                       fused=pol.fused_lora)
            return val.view(b, s, heads, D)

        def rebuilt(i: int, name: str, heads: int):  # (b, heads, s, D)
            return rebuilt_tokens(i, name, heads).transpose(1, 2)

        qk_norms = plan.qk_norm_eps is not None
        if qk_norms:
            # the pre-norm q/k rebuilt (kept until the norm backward), the norm recomputed, then RoPE;
            # op by op under every layer type (the fused rebuild+RoPE kernel has no norm step)
            qn_idx, kn_idx = off + _ATTN_LINEAR_PARAMS, off + _ATTN_LINEAR_PARAMS + 1
            qn_w, kn_w = load.param(qn_idx), load.param(kn_idx)
            rope = pol.fused_backend
            q_pre = rebuilt_tokens(0, "q", H)
            qn, rstd_q = _qk_norm_forward(plan, q_pre, qn_w, plan.qk_norm_eps[0])
            q = apply_rope(qn.transpose(1, 2), cos, sin, backend=rope)
            del qn
            k_pre = rebuilt_tokens(1, "k", HKV)
            kn, rstd_k = _qk_norm_forward(plan, k_pre, kn_w, plan.qk_norm_eps[1])
            k = apply_rope(kn.transpose(1, 2), cos, sin, backend=rope)
            del kn
        elif pol.fused:  # one kernel each: dequantise + exact rows + LoRA term + RoPE, head-major
            q = fused_rope.fused_rebuild_rope(plan, load, "q", metas[0], load.param(off + 3), H, cos, sin)
            k = fused_rope.fused_rebuild_rope(plan, load, "k", metas[1], load.param(off + PARAMS_PER_LINEAR + 3),
                                              HKV, cos, sin)
        else:
            q = apply_rope(rebuilt(0, "q", H), cos, sin)
            k = apply_rope(rebuilt(1, "k", HKV), cos, sin)
        v = rebuilt(2, "v", HKV)

        if ctx.core_impl == "eager":
            if load.has("probs"):
                probs = load.get("probs")
                o_hat = load.get("o") if metas[3].has_lora else None
            else:  # recompute the map (and the o_proj input) from the rebuilt q/k/v
                o_hat, probs = eager_attention_forward(q, k, v, mask, plan.scaling, plan.is_causal, plan.softcap)
            do, lin_grads[12:16] = linear_grads(ctx, plan, load, 3, "o", d_branch, o_hat, off)
            del o_hat
            do = do.view(b, s, H, D).transpose(1, 2)
            dq, dk, dv = eager_attention_backward(do, probs, q, k, v, plan.scaling, plan.softcap)
            del probs
        elif _s2_flash(ctx.core_impl, plan, q, k, v, mask):
            # S²-Attn by flash calls on views: no block copies, gradients written over q/k/v
            group = _s2_group(plan, s)
            own = (True, True, not load.holds(v))  # q, k: fresh from RoPE; v: a saved tensor in baseline
            if s2attn.s2_block_kernels(group, plan.policy.s2_block_kernels) == "sdpa":
                # dO first (it needs no attention output); each block's attention is then recomputed
                # under autograd and differentiated, writing the o_proj input that o's LoRA-A
                # gradient reads last: one attention forward per block, as the flash variant
                do, dbias_o, db_o, grad_a_o = linear_grads_input_first(ctx, plan, load, 3, "o", d_branch, off)
                o_re = q.new_empty(b, s, H, D)
                dq, dk, dv = s2_sdpa_backward(q, k, v, do.view(b, s, H, D), group, plan.scaling, own, out=o_re)
                lin_grads[12:16] = (None, dbias_o, grad_a_o(o_re.view(b, s, H * D)), db_o)
                del o_re, grad_a_o
            else:
                o_re, per_block = s2_flash_forward(q, k, v, group, plan.scaling)
                do, lin_grads[12:16] = linear_grads(ctx, plan, load, 3, "o", d_branch, o_re.view(b, s, H * D), off)
                dq, dk, dv = s2_flash_backward(q, k, v, o_re, do.view(b, s, H, D), per_block, group, plan.scaling,
                                               own)
                del o_re, per_block
        else:
            o_re, leaves = attention_recompute(ctx.core_impl, q, k, v, mask, plan.scaling, plan.is_causal,
                                               plan.s2_group_ratio, plan.s2_group_size)
            do, lin_grads[12:16] = linear_grads(ctx, plan, load, 3, "o", d_branch, o_re.detach(), off)
            dq, dk, dv = torch.autograd.grad(o_re, leaves, do)
            del o_re, leaves
        del q, k, v, do, d_branch

        rope = pol.fused_backend
        dq = rope_backward(dq, cos, sin, backend=rope).transpose(1, 2)
        dk = rope_backward(dk, cos, sin, backend=rope).transpose(1, 2)
        qk_norm_grads = ()
        if qk_norms:  # norm backward over head_dim, token-major
            dq, dqn_w = _qk_norm_backward(plan, dq, q_pre, rstd_q, qn_w, bool(need[qn_idx]))
            del q_pre, rstd_q
            dk, dkn_w = _qk_norm_backward(plan, dk, k_pre, rstd_k, kn_w, bool(need[kn_idx]))
            del k_pre, rstd_k
            qk_norm_grads = (dqn_w, dkn_w)
        dq = dq.reshape(b, s, H * D)
        dk = dk.reshape(b, s, HKV * D)
        dv = dv.transpose(1, 2).reshape(b, s, HKV * D)

        x_hat, x_n1 = _norm_input(plan, load, "x_in", "rstd1", any(m.has_lora for m in metas[:3]))
        dxn = None
        dprojs = [dq, dk, dv]
        del dq, dk, dv  # each freed once its linear's backward has run (long sequences: (s, d) each)
        for i, name in enumerate(_QKV):
            dxi, lin_grads[4 * i : 4 * i + 4] = linear_grads(ctx, plan, load, i, name, dprojs[i], x_n1, off)
            dprojs[i] = None
            dxn = dxi if dxn is None else dxn.add_(dxi)  # dxi/dxn: fresh tensors of this backward
            del dxi
        del x_n1
        dx, dnorm = _norm_backward(plan, load, need, "x_in", "rstd1", x_hat, dxn, dy)
        merge_part_grads(metas, lin_grads)  # a fused qkv's parts: one gradient per fused parameter
        return (None, dx, dnorm, None, None, None, *lin_grads, *qk_norm_grads, *post_grads)


# -- MLP block ------------------------------------------------------------------------------
#
# The gated epilogue (what is kept of G/U, act(G) * U, and its backward; act = SiLU for SwiGLU,
# tanh-GELU for Gemma's GeGLU: plan.act) is the part the fused-kernel layer type replaces; it is
# isolated in these two functions so that a fused implementation can be plugged in without
# touching the rest of the block. The kept activation output is named "silu" whatever act is.


def swiglu_epilogue_forward(plan: BlockPlan, store: TensorStore, g_out, u_out) -> torch.Tensor:
    """Keep what the backward needs of the gate/up outputs; return ``D = act(G) * U``."""
    pol, metas = plan.policy, plan.linears
    for name, meta, out in zip(_GATE_UP, metas[:2], (g_out, u_out)):
        keep_linear_extras(store, name, meta, out)
        keep(plan, store, name, out.y_w if pol.reconstruct else out.y)
    sil, hidden = silu_mul_forward(g_out.y, u_out.y, plan.act)
    if pol.store_elementwise:
        keep(plan, store, "silu", sil)
        if metas[2].has_lora:
            keep(plan, store, "hidden", hidden)
    return hidden


def swiglu_epilogue_backward(plan: BlockPlan, load: TensorLoad):
    """Generator: first yields ``D`` rebuilt (or ``None`` when down_proj has no LoRA, which then
    needs no input), then receives ``dD`` and yields ``(dG, dU)``.

    Memory: the caller computes ``dD`` before starting this generator (it needs no activation),
    so at most ``dD``, ``G``, ``U`` and ``D`` exist as ``(tokens, d_ff)`` tensors at once; SiLU(G)
    is not kept beside them (the backward recomputes it chunk by chunk), and with a compressing
    policy ``dU`` / ``dG`` are written into ``dD`` / ``G`` (fresh tensors owned here)."""
    pol, metas = plan.policy, plan.linears
    off = _MLP_LIN_OFFSET

    def rebuilt(i: int, name: str):
        val = load.get(name)
        if pol.reconstruct:
            val = lora_reconstruct(metas[i], val, load.get(XA_NAMES[name]), load.param(off + PARAMS_PER_LINEAR * i + 3),
                                   fused=pol.fused_lora)
        return val

    g, u = rebuilt(0, "gate"), rebuilt(1, "up")
    if pol.store_elementwise:
        sil = load.get("silu")
        hidden = load.get("hidden") if metas[2].has_lora else None
    else:
        sil = None  # recomputed inside silu_mul_backward (bit-identical: same op on the same G)
        hidden = silu_mul_forward(g, u, plan.act)[1] if metas[2].has_lora else None
    dh = yield hidden
    del hidden
    # dD (a fresh gradient) and, when rebuilt from compressed codes, G are owned here: the
    # backward writes dU and dG into them. A baseline G is the saved tensor itself and must
    # stay intact (retain_graph).
    yield silu_mul_backward(dh, g, u, sil, inplace=pol.compress, act=plan.act)


class MLPBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: MLPPlan, x, norm_w, *lin):
        # lin: the 12 linear parameters[, the post-norm weight]; gate/up take the same input
        begin_forward(ctx, plan, lin, norm_w, x, shared_input=SHARED_INPUT_LINEARS[1])
        store = TensorStore()
        store.params((None, None, norm_w) + tuple(lin), rows=part_param_rows(plan.linears, _MLP_LIN_OFFSET))
        lin = part_inputs(plan.linears, lin)  # a fused gate_up's parts: their bias / B rows

        if plan.policy.fused:  # one pass: RMSNorm + Q+o(x_mid)
            xn, _ = fused_rmsnorm.fused_norm_forward(plan, store, "x_mid", "rstd2", x, norm_w)
        else:
            xn, rstd = rmsnorm_forward(x, norm_w, plan.eps, plan.norm_variant)
            keep(plan, store, "x_mid", x)
            store.plain("rstd2", rstd)

        metas = plan.linears
        # full_fuse: base outputs and XA only; one kernel adds the LoRA terms, quantises and
        # computes SiLU(G) * U, so the full G and U never reach memory
        linear_fwd = lora_base_forward if plan.policy.fused else lora_linear_forward
        g_out = linear_fwd(metas[0], xn, *linear_params(lin, 0), fused=plan.policy.fused_lora)
        u_out = linear_fwd(metas[1], xn, *linear_params(lin, 1), fused=plan.policy.fused_lora,
                           down=(g_out.xa, g_out.rng_state) if metas[1].reuses_xa else None)
        del xn  # not kept: the backward renormalises the kept x_mid (see _normalised)
        if plan.policy.fused:
            hidden = fused_swiglu.fused_gate_up_forward(
                plan, store, g_out, u_out, linear_params(lin, 0)[3], linear_params(lin, 1)[3])
        else:
            hidden = swiglu_epilogue_forward(plan, store, g_out, u_out)
        del g_out, u_out
        d_out = lora_linear_forward(metas[2], hidden, *linear_params(lin, 2), fused=plan.policy.fused_lora)
        del hidden
        keep_linear_extras(store, "down", metas[2], d_out)
        if plan.post_norm_eps is not None:  # Gemma: x + PostNorm(down(D))
            z = d_out.y
            del d_out
            y = x + _post_norm_forward(plan, store, "mlp_out", "rstd_mlp_out", z, lin[_MLP_LINEAR_PARAMS])
            del z
        else:
            y = x + d_out.y
        if plan.check_finite:
            _check_output(plan, y)
        end_forward(ctx, plan, store, "mlp")
        return y

    @staticmethod
    def backward(ctx, dy):
        return backward_in_autocast(ctx, MLPBlockFn._backward, dy)

    @staticmethod
    def _backward(ctx, plan: MLPPlan, dy):
        pol = plan.policy
        load = TensorLoad(ctx, pol.backend)
        need = ctx.needs_input_grad
        off = _MLP_LIN_OFFSET
        lin_grads = [None] * (PARAMS_PER_LINEAR * 3)
        post_grads = ()
        d_branch = dy  # gradient of down_proj's output
        if plan.post_norm_eps is not None:
            post_idx = off + _MLP_LINEAR_PARAMS
            d_branch, d_post = _post_norm_backward(plan, load, "mlp_out", "rstd_mlp_out", load.param(post_idx), dy,
                                                   bool(need[post_idx]))
            post_grads = (d_post,)

        if pol.fused:  # dD first (needs no activation), then one kernel: dG, dU and D~
            params = [tuple(load.param(off + PARAMS_PER_LINEAR * i + j) for j in range(PARAMS_PER_LINEAR))
                      for i in range(3)]
            need_down = need[off + 2 * PARAMS_PER_LINEAR : off + 3 * PARAMS_PER_LINEAR]
            lin_grads[8:12], dg, du = fused_swiglu.fused_mlp_epilogue_backward(plan, load, d_branch, params, need_down)
        else:
            # dD first (it needs no activation, so nothing of size (tokens, d_ff) is alive while its
            # matmuls run), then G/U/D are rebuilt and down's LoRA-A gradient reads D.
            dh, dbias, db, grad_a = linear_grads_input_first(ctx, plan, load, 2, "down", d_branch, off)
            epilogue = swiglu_epilogue_backward(plan, load)
            lin_grads[8:12] = (None, dbias, grad_a(next(epilogue)), db)
            dg, du = epilogue.send(dh)
            epilogue.close()
            del dh
        del d_branch

        metas = plan.linears
        x_hat, x_n2 = _norm_input(plan, load, "x_mid", "rstd2", metas[0].has_lora or metas[1].has_lora)
        dxg, lin_grads[0:4] = linear_grads(ctx, plan, load, 0, "gate", dg, x_n2, off)
        dxu, lin_grads[4:8] = linear_grads(ctx, plan, load, 1, "up", du, x_n2, off)
        dxn = dxg.add_(dxu)  # dxg: a fresh tensor of this backward
        del x_n2, dxg, dxu, dg, du
        dx, dnorm = _norm_backward(plan, load, need, "x_mid", "rstd2", x_hat, dxn, dy)
        merge_part_grads(metas, lin_grads)  # a fused gate_up's parts: one gradient per fused parameter
        return (None, dx, dnorm, *lin_grads, *post_grads)


# -- functional entry points ----------------------------------------------------------------


def attention_block(plan: AttentionPlan, x, norm_w, cos, sin, mask, params: Sequence, qk_norm_weights: Sequence = (),
                    post_norm_weight=None):
    """``params``: ``(W, bias, A, B)`` for q, k, v, o (16 entries, ``None`` where absent).
    ``qk_norm_weights``: ``(q_norm weight, k_norm weight)`` when ``plan.qk_norm_eps`` is set, else empty.
    ``post_norm_weight``: the post-norm's weight exactly when ``plan.post_norm_eps`` is set (Gemma), else None."""
    if len(params) != _ATTN_LINEAR_PARAMS or len(plan.linears) != 4:
        raise ValueError("hyclora: attention_block needs 4 linears (q, k, v, o)")
    if len(qk_norm_weights) != _num_qk_norm_weights(plan):
        raise ValueError("hyclora: attention_block takes the two q/k norm weights exactly when plan.qk_norm_eps is set")
    if (post_norm_weight is None) != (plan.post_norm_eps is None):
        raise ValueError("hyclora: attention_block takes a post-norm weight exactly when plan.post_norm_eps is set")
    post = () if post_norm_weight is None else (post_norm_weight,)
    return AttentionBlockFn.apply(plan, x, norm_w, cos, sin, mask, *params, *qk_norm_weights, *post)


def mlp_block(plan: MLPPlan, x, norm_w, params: Sequence, post_norm_weight=None):
    """``params``: ``(W, bias, A, B)`` for gate, up, down (12 entries). ``post_norm_weight``: the
    post-norm's weight exactly when ``plan.post_norm_eps`` is set (Gemma), else None."""
    if len(params) != _MLP_LINEAR_PARAMS or len(plan.linears) != 3:
        raise ValueError("hyclora: mlp_block needs 3 linears (gate, up, down)")
    if (post_norm_weight is None) != (plan.post_norm_eps is None):
        raise ValueError("hyclora: mlp_block takes a post-norm weight exactly when plan.post_norm_eps is set")
    if post_norm_weight is not None:
        params = tuple(params) + (post_norm_weight,)
    width = x.shape[-1]
    rows = x.numel() // width if x.dim() and width else 0
    # the MLP is position-wise: a long sequence runs it in row chunks, so that its (tokens, d_ff)
    # temporaries never exist for the whole sequence (policy.mlp_chunk_elements per chunk)
    chunk = plan.policy.mlp_chunk_elements
    chunk_rows = max(1, chunk // plan.d_ff) if plan.d_ff > 0 and chunk > 0 else rows
    if rows <= chunk_rows:
        return MLPBlockFn.apply(plan, x, norm_w, *params)
    return _mlp_in_row_chunks(plan, x, norm_w, params, chunk_rows)


def _mlp_in_row_chunks(plan: MLPPlan, x, norm_w, params: Sequence, chunk_rows: int):
    """The MLP block applied to ``chunk_rows`` rows (tokens) at a time; each chunk is its own
    autograd node, so its backward temporaries are freed before the next chunk's backward runs.
    Calibration sees every row once: all chunks but the last update the statistics without
    counting a forward (``uncounted_updates``), so the frozen range and outlier set equal the
    one-call block's; what each chunk quantises with while calibrating is its own rows' range."""
    pieces = x.reshape(-1, x.shape[-1]).split(chunk_rows)
    last = len(pieces) - 1
    outs, manifests = [], []
    for i, piece in enumerate(pieces):
        record = {} if plan.record is not None else None
        chunk_plan = replace(plan, record=record)
        with uncounted_updates(plan.stats.values()) if i < last and plan.update else contextlib.nullcontext():
            outs.append(MLPBlockFn.apply(chunk_plan, piece, norm_w, *params))
        if record is not None:
            manifests.append(record["mlp"])
    if plan.record is not None:
        plan.record["mlp"] = Manifest.joined(manifests)
    return torch.cat(outs).view(x.shape)


__all__ = [
    "AttentionPlan",
    "MLPPlan",
    "BlockPlan",
    "AttentionBlockFn",
    "MLPBlockFn",
    "attention_block",
    "mlp_block",
    "check_finite",
    "QK_NORM_VARIANTS",
    "SHARED_INPUT_LINEARS",
]
