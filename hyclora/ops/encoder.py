"""Post-LN encoder layer (BERT / RoBERTa) as two autograd Functions with hand-written backwards.

* :class:`EncoderAttentionBlockFn`:
  ``x -> q/k/v LoRA -> attention (+ probs dropout) -> o LoRA -> dropout -> Z1 = . + x -> LN1``
* :class:`EncoderFFNBlockFn`:
  ``h -> up LoRA -> GELU -> down LoRA -> dropout -> Z2 = . + h -> LN2``

Same design as the Llama blocks (:mod:`hyclora.ops.blocks`; shared helpers in
:mod:`hyclora.ops.block_common`): the forward computes every output from exact activations; what
is kept for the backward is decided by a :class:`~hyclora.ops.storage.StoragePolicy`, one code
path for all four layer types; everything goes through one ``ctx.save_for_backward``.
``intra_inter_full_fuse`` stores exactly what ``intra_inter`` stores; its GELU epilogue (quantise
``X W + bias``, add the LoRA term, GELU; and back: rebuild, ``GELU'``, ``F~``) runs as one Triton
kernel each way (:mod:`hyclora.kernels.act_lora`).

Saved tensors (``*`` only when that linear carries LoRA; ``Q`` quantised at ``q_bit``,
``Q+o`` quantised with exact outlier channels, ``fp`` as is):

=================  ===================  ==========  ==========  =============================
tensor             shape                baseline    intra       intra_inter / _full_fuse
=================  ===================  ==========  ==========  =============================
x_n1*              (b, s, d) q/k/v in   fp          Q           Q
xa_<linear>*       (b, s, r)            fp          fp          fp
q, k, v            (b, s, d)            fp          Q           Q(x W + bias), rebuilt + s XA B
probs (eager)      (b, h, s, s)         fp          sparse      sparse
o* (eager)         (b, s, d) o in       fp          Q           Q
z1, z2 (LN input)  (b, s, d)            fp          Q+o         Q+o
mean, rstd         (b, s, 1) fp32       fp          fp          fp
x_n2*              (b, s, d) up in      fp          Q           Q
up                 (b, s, d_ff)         fp (U)      Q(U)        Q(x W + bias), rebuilt
hidden*            (b, s, d_ff) GELU    recomputed  Q(GELU(U))  recomputed from the rebuilt U
rng_*              generator states of the dropout masks (a few bytes each)
=================  ===================  ==========  ==========  =============================

Dropout is honoured (the HyC-LoRA reference silently dropped RoBERTa's 0.1 dropouts in its
fused training path): the attention-probability dropout, both hidden dropouts and LoRA dropout
draw their masks in the forward exactly as ``torch.nn.functional.dropout`` does on the CPU (so
a seeded CPU run reproduces transformers' masks, in transformers' order), keep only the
generator state, and draw the same masks again in the backward. On CUDA the masks are
statistically equivalent to, not identical with, PyTorch's fused dropout kernel.

Attention: ``eager`` keeps the probability map (dense for baseline, sparse top fraction else,
or nothing with ``probs='recompute'``); ``sdpa`` keeps nothing of it and recomputes the
attention in the backward (see :mod:`hyclora.ops.attention`). SDPA's own dropout cannot be
drawn again, so with attention dropout in training the sdpa path computes the attention with
the eager formulation and recomputes the map in the backward (same memory as sdpa).

LayerNorm: forward through ``F.layer_norm`` (identical outputs to ``nn.LayerNorm``), statistics
(mean, rstd) kept in fp32; backward ``dz = rstd (g - mean(g) - x_hat mean(g x_hat))`` with
``g = dy * gamma`` and ``x_hat = (z - mean) rstd`` rebuilt from the (dequantised) input and the
exact statistics. GELU: the exact erf GELU with its exact derivative
``Phi(u) + u phi(u)`` (the reference used the tanh approximation's derivative for the erf
forward), or the tanh approximation with its own derivative for ``gelu_new`` /
``gelu_pytorch_tanh`` models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .attention import (
    additive_mask,
    check_implementation,
    sdpa_attention_forward,
    sdpa_attention_recompute,
)
from .block_common import (
    PARAMS_PER_LINEAR,
    BlockPlan,
    backward_in_autocast,
    begin_forward,
    end_forward,
    keep,
    keep_linear_extras,
    linear_grads,
    linear_params,
)
from .lora import (
    capture_rng_state,
    lora_base_forward,
    draw_dropout_mask,
    lora_linear_backward,
    lora_linear_forward,
    lora_reconstruct,
    redraw_dropout_mask,
)
from .storage import TensorLoad, TensorStore
from hyclora.kernels.act_lora import act_lora_backward, act_lora_forward
from hyclora.kernels.activations import ACTIVATIONS, GELU, GELU_TANH, gelu_backward, gelu_forward
from hyclora.kernels.common import dot_dtype_for
from hyclora.quant import check_finite
from hyclora.quant.core import QuantizedTensor

# -- LayerNorm -------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half/bf16/fp32 activations, fp64 for fp64 ones."""
    return torch.promote_types(t.dtype, torch.float32)


def layernorm_forward(
    z: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(y, mean, rstd)``; ``mean`` and ``rstd`` are fp32 (fp64 for fp64 input), shape
    ``z.shape[:-1] + (1,)``.

    ``y`` comes from ``F.layer_norm`` so that it equals ``nn.LayerNorm`` bit for bit (also
    under autocast, which runs layer_norm in fp32). The statistics are computed again in fp32:
    on the CPU ``torch.native_layer_norm`` returns them in the input dtype (bf16), too coarse
    for the backward of a quantised input.
    """
    d = z.shape[-1]
    y = F.layer_norm(z, (d,), weight, bias, eps)
    with torch.no_grad():
        var, mean = torch.var_mean(z.detach().to(_acc(z)), dim=-1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + eps)
    return y, mean, rstd


def layernorm_backward(
    dy: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    need_dz: bool = True,
    need_dweight: bool = False,
    need_dbias: bool = False,
):
    """Gradients of :func:`layernorm_forward`: ``(dz, dweight, dbias)`` (``None`` where not asked).

    ``z`` may be a reconstruction of the forward input; ``mean`` / ``rstd`` are the exact
    statistics, so the normalisation of the gradient stays exact. All arithmetic in fp32 (fp64
    for fp64 tensors).
    """
    acc = _acc(z)
    x_hat = (z.to(acc) - mean) * rstd
    dyf = dy.to(acc)
    dz = dweight = dbias = None
    if need_dz:
        g = dyf * weight.to(acc) if weight is not None else dyf
        dz = rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
        dz = dz.to(z.dtype)
    if need_dweight and weight is not None:
        dweight = (dyf * x_hat).reshape(-1, x_hat.shape[-1]).sum(0).to(weight.dtype)
    if need_dbias:
        dbias = dyf.reshape(-1, dyf.shape[-1]).sum(0)
    return dz, dweight, dbias


# -- GELU ------------------------------------------------------------------------------------

# the GELUs of transformers' hidden_act; their torch forms and derivatives live in
# hyclora.kernels.activations, beside the kernels' own
SUPPORTED_ACTIVATIONS = tuple(name for name, code in ACTIVATIONS.items() if code in (GELU, GELU_TANH))


def check_activation(act: str, where: str = "") -> str:
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"hyclora{(' (' + where + ')') if where else ''}: hidden_act={act!r} is not supported by "
            f"the encoder blocks; supported: {', '.join(SUPPORTED_ACTIVATIONS)}. Set "
            "HyCLoRAConfig(use_hyclora=False) to train this model without hyclora."
        )
    return act


# -- dropout with a mask drawn again in the backward -------------------------------------------


def dropout_forward(x: torch.Tensor, p: float):
    """``(x * mask, rng_state)``; ``mask`` drawn as ``F.dropout`` draws it on the CPU."""
    if p <= 0:
        return x, None
    state = capture_rng_state(x.device)
    return x * draw_dropout_mask(x, p), state


def dropout_mask_again(state, like: torch.Tensor, p: float) -> Optional[torch.Tensor]:
    if state is None or p <= 0:
        return None
    return redraw_dropout_mask(state, like.shape, like.dtype, like.device, p)


# -- encoder attention core (bidirectional, MHA, optional probability dropout) ---------------


def encoder_attention_probs(q, k, mask, scaling: float) -> torch.Tensor:
    """``softmax(q k^T * scaling + mask)`` in fp32, cast to ``q.dtype`` (transformers' eager
    RoBERTa/BERT attention: scores scaled before the additive mask)."""
    s, kv = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    amask = additive_mask(mask, scores.dtype, s, kv, q.device, is_causal=False)
    if amask is not None:
        scores = scores + amask
    return torch.softmax(scores, dim=-1, dtype=_acc(scores)).to(q.dtype)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    b, h, s, d = o.shape
    return o.transpose(1, 2).reshape(b, s, h * d)


def encoder_attention_forward(q, k, v, mask, scaling: float, dropout_p: float = 0.0):
    """Eager attention with probability dropout. Returns ``(o, probs, rng_state)``: ``o`` is the
    ``(b, s, h*d)`` o_proj input, ``probs`` the map BEFORE dropout (what the softmax backward
    needs), ``rng_state`` the generator state of the dropout mask (``None`` without dropout)."""
    probs = encoder_attention_probs(q, k, mask, scaling)
    dropped, state = dropout_forward(probs, dropout_p)
    return _merge_heads(torch.matmul(dropped, v)), probs, state


def encoder_attention_backward(do, probs, q, k, v, scaling: float, drop_mask=None):
    """Gradients w.r.t. ``q``, ``k``, ``v`` (``(b, h, s, d)``) of :func:`encoder_attention_forward`.

    With dropout ``o = (P * M) V``: ``dV = (P * M)^T dO``, ``dP = (dO V^T) * M``, and the
    softmax backward uses the undropped ``P`` (possibly a pruned reconstruction; pruned entries
    act as exact zeros). The softmax backward runs in fp32 (fp64 for fp64 tensors).
    """
    dropped = probs if drop_mask is None else probs * drop_mask
    dv = torch.matmul(dropped.transpose(2, 3), do)
    del dropped
    dp = torch.matmul(do, v.transpose(2, 3)).to(_acc(probs))
    if drop_mask is not None:
        dp = dp * drop_mask
    p32 = probs.to(dp.dtype)
    ds = p32 * (dp - (p32 * dp).sum(-1, keepdim=True))
    del dp, p32
    ds = ds.to(q.dtype) * scaling
    dq = torch.matmul(ds, k)
    dk = torch.matmul(ds.transpose(2, 3), q)
    return dq, dk, dv


# -- plans -----------------------------------------------------------------------------------


@dataclass
class EncoderAttentionPlan(BlockPlan):
    """``eps``: LayerNorm epsilon; ``attn_dropout`` / ``hidden_dropout``: probabilities in
    this forward (0 unless training)."""

    num_heads: int = 1
    head_dim: int = 1
    scaling: float = 1.0
    impl: str = "eager"
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @property
    def attention_mode(self) -> str:
        """``dense`` / ``sparse`` (eager, map kept), ``recompute`` (eager math, nothing kept,
        map recomputed in the backward) or ``sdpa`` (sdpa forward, recomputed in backward)."""
        if self.impl == "sdpa":
            return "recompute" if self.attn_dropout > 0 else "sdpa"
        return self.policy.probs_mode


@dataclass
class EncoderFFNPlan(BlockPlan):
    activation: str = "gelu"
    hidden_dropout: float = 0.0


# -- attention block -------------------------------------------------------------------------

_QKV = ("q", "k", "v")
_ENC_ATTN_LIN_OFFSET = 5  # forward(ctx, plan, x, ln_w, ln_b, mask, *lin)
_ENC_FFN_LIN_OFFSET = 4  # forward(ctx, plan, x, ln_w, ln_b, *lin)


def _check_layernorm(plan: BlockPlan, ln_w, ln_b):
    for t in (ln_w, ln_b):
        if t is not None and t.numel() == 0:
            raise RuntimeError(
                f"hyclora: {plan.layer_name} got an empty LayerNorm parameter (a ZeRO-3 partitioned "
                "parameter that was not gathered?). Register the encoder layer as a ZeRO-3 leaf module."
            )


# Each sublayer ends in ``LN(dropout(y) + x)`` (BertSelfOutput / BertOutput); ``i`` (1 or 2) names
# what it keeps: ``z<i>`` (the LayerNorm input), ``mean<i>``, ``rstd<i>``.


def _hidden_dropout(plan, store: TensorStore, y: torch.Tensor) -> torch.Tensor:
    """``dropout(y)``, keeping the generator state of its mask."""
    h, rng = dropout_forward(y, plan.hidden_dropout)
    if rng is not None:
        store.plain("rng_hidden", rng)
    return h


def _layernorm_kept(plan: BlockPlan, store: TensorStore, i: int, z: torch.Tensor, ln_w, ln_b) -> torch.Tensor:
    """``LN(z)``; keeps ``z`` as the policy says and the exact statistics."""
    y, mean, rstd = layernorm_forward(z, ln_w, ln_b, plan.eps)
    keep(plan, store, f"z{i}", z)
    store.plain(f"mean{i}", mean)
    store.plain(f"rstd{i}", rstd)
    return y


def _add_norm_backward(plan, load: TensorLoad, need, i: int, dy: torch.Tensor):
    """Backward of ``LN(dropout(y) + x)``: ``(dz, dy_sublayer, dln_w, dln_b)``; ``dz`` is also the
    residual's gradient. The LayerNorm parameters are Function inputs 2 and 3."""
    dz, dln_w, dln_b = layernorm_backward(
        dy, load.get(f"z{i}"), load.get(f"mean{i}"), load.get(f"rstd{i}"), load.param(2),
        need_dz=True, need_dweight=bool(need[2]), need_dbias=bool(need[3]),
    )
    if dln_b is not None:
        dln_b = dln_b.to(load.param(3).dtype)
    dh = dz
    hid_mask = dropout_mask_again(load.get("rng_hidden"), dz, plan.hidden_dropout)
    if hid_mask is not None:
        dh = dz * hid_mask
    return dz, dh, dln_w, dln_b


class EncoderAttentionBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: EncoderAttentionPlan, x, ln_w, ln_b, mask, *lin):
        check_implementation(plan.impl, plan.layer_name)
        _check_layernorm(plan, ln_w, ln_b)
        begin_forward(ctx, plan, lin, x if ln_w is None else ln_w, x)  # (norm check: LayerNorm above)
        pol, metas = plan.policy, plan.linears
        b, s, _ = x.shape
        H, D = plan.num_heads, plan.head_dim
        if plan.check_finite:
            check_finite(x, f"{plan.layer_name} (input of the encoder layer)")
        store = TensorStore()
        store.params((None, None, ln_w, ln_b, None) + tuple(lin))

        outs = [lora_linear_forward(metas[i], x, *linear_params(lin, i)) for i in range(3)]
        if any(m.has_lora for m in metas[:3]):
            keep(plan, store, "x_n1", x)
        for name, meta, out in zip(_QKV, metas[:3], outs):
            keep_linear_extras(store, name, meta, out)
            keep(plan, store, name, out.y_w if pol.reconstruct else out.y)
        q, k, v = (out.y.view(b, s, H, D).transpose(1, 2) for out in outs)
        del outs

        mode = plan.attention_mode
        if mode == "sdpa":
            o = sdpa_attention_forward(q, k, v, mask, plan.scaling, is_causal=False)
        else:
            o, probs, attn_rng = encoder_attention_forward(q, k, v, mask, plan.scaling, plan.attn_dropout)
            if attn_rng is not None:
                store.plain("rng_attn", attn_rng)
            if mode != "recompute":
                pol.keep_probs(store, "probs", probs)
                if metas[3].has_lora:
                    keep(plan, store, "o", o)
            del probs
        if mode in ("sdpa", "recompute"):
            store.plain("mask", mask, describe=False)  # only a recompute of the attention needs it
        del q, k, v
        out_o = lora_linear_forward(metas[3], o, *linear_params(lin, 3))
        del o
        keep_linear_extras(store, "o", metas[3], out_o)
        h = _hidden_dropout(plan, store, out_o.y)
        z1 = h + x
        del h, out_o
        y = _layernorm_kept(plan, store, 1, z1, ln_w, ln_b)
        end_forward(ctx, plan, store, "attention")
        return y

    @staticmethod
    def backward(ctx, dy):
        return backward_in_autocast(ctx, EncoderAttentionBlockFn._backward, dy)

    @staticmethod
    def _backward(ctx, plan: EncoderAttentionPlan, dy):
        pol, metas = plan.policy, plan.linears
        load = TensorLoad(ctx, pol.backend)
        need = ctx.needs_input_grad
        b, s, _ = dy.shape
        H, D = plan.num_heads, plan.head_dim
        off = _ENC_ATTN_LIN_OFFSET
        lin_grads = [None] * (PARAMS_PER_LINEAR * 4)
        mode = plan.attention_mode

        dz1, dh, dln_w, dln_b = _add_norm_backward(plan, load, need, 1, dy)

        def rebuilt(i: int, name: str):
            val = load.get(name)
            if pol.reconstruct:
                val = lora_reconstruct(metas[i], val, load.get(f"xa_{name}"), load.param(off + PARAMS_PER_LINEAR * i + 3))
            return val.view(b, s, H, D).transpose(1, 2)

        q, k, v = (rebuilt(i, name) for i, name in enumerate(_QKV))
        mask = load.get("mask")
        if mode == "sdpa":
            o_re, leaves = sdpa_attention_recompute(q, k, v, mask, plan.scaling, is_causal=False)
            do, lin_grads[12:16] = linear_grads(ctx, plan, load, 3, "o", dh, o_re.detach(), off)
            dq, dk, dv = torch.autograd.grad(o_re, leaves, do)
            del o_re, leaves
        else:
            if mode == "recompute":
                probs = encoder_attention_probs(q, k, mask, plan.scaling)
            else:
                probs = load.get("probs")
            drop = dropout_mask_again(load.get("rng_attn"), probs, plan.attn_dropout)
            if metas[3].has_lora:
                if mode == "recompute":  # the o_proj input, from the recomputed map
                    o_hat = _merge_heads(torch.matmul(probs if drop is None else probs * drop, v))
                else:
                    o_hat = load.get("o")
            else:
                o_hat = None
            do, lin_grads[12:16] = linear_grads(ctx, plan, load, 3, "o", dh, o_hat, off)
            del o_hat
            do = do.view(b, s, H, D).transpose(1, 2)
            dq, dk, dv = encoder_attention_backward(do, probs, q, k, v, plan.scaling, drop)
            del probs, drop
        del q, k, v, do, dh

        x_hat = load.get("x_n1")
        dx = dz1  # the residual branch
        for i, (name, dproj) in enumerate(zip(_QKV, (dq, dk, dv))):
            dproj = dproj.transpose(1, 2).reshape(b, s, H * D)
            dxi, lin_grads[4 * i : 4 * i + 4] = linear_grads(ctx, plan, load, i, name, dproj, x_hat, off)
            dx = dx + dxi
        return (None, dx if need[1] else None, dln_w, dln_b, None, *lin_grads)


# -- FFN block -------------------------------------------------------------------------------
#
# The GELU epilogue (what is kept of U, GELU(U), and its backward) is the part the fused layer
# type replaces; it is isolated in these two functions, as for the SwiGLU MLP.


def gelu_epilogue_forward(plan: EncoderFFNPlan, store: TensorStore, u_out) -> torch.Tensor:
    """Keep what the backward needs of the up_proj output; return ``F = GELU(U)``."""
    pol, metas = plan.policy, plan.linears
    keep_linear_extras(store, "up", metas[0], u_out)
    keep(plan, store, "up", u_out.y_w if pol.reconstruct else u_out.y)
    act = gelu_forward(u_out.y, plan.activation)
    if pol.store_elementwise and metas[1].has_lora:
        keep(plan, store, "hidden", act)
    return act


def gelu_epilogue_backward(plan: EncoderFFNPlan, load: TensorLoad):
    """Generator: first yields ``F`` (rebuilt, or ``None`` when down_proj has no LoRA and so
    needs no input), then receives ``dF`` and yields ``dU``."""
    pol, metas = plan.policy, plan.linears
    u = load.get("up")
    if pol.reconstruct:
        u = lora_reconstruct(metas[0], u, load.get("xa_up"), load.param(_ENC_FFN_LIN_OFFSET + 3))
    act = None
    if metas[1].has_lora:
        act = load.get("hidden") if pol.store_elementwise else gelu_forward(u, plan.activation)
    d_act = yield act
    del act
    yield gelu_backward(d_act, u, plan.activation)


def _fused(plan: BlockPlan) -> bool:
    return plan.policy.layer_type == "intra_inter_full_fuse"


# the fused GELU epilogue of intra_inter_full_fuse (its block glue) is at the end of this file


class EncoderFFNBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: EncoderFFNPlan, x, ln_w, ln_b, *lin):
        check_activation(plan.activation, plan.layer_name)
        _check_layernorm(plan, ln_w, ln_b)
        begin_forward(ctx, plan, lin, x if ln_w is None else ln_w, x)
        metas = plan.linears
        store = TensorStore()
        store.params((None, None, ln_w, ln_b) + tuple(lin))

        # full_fuse: base output and XA only; the fused kernel adds the LoRA term, quantises and
        # applies GELU in one pass, so the full U never reaches memory
        up_forward = lora_base_forward if _fused(plan) else lora_linear_forward
        u_out = up_forward(metas[0], x, *linear_params(lin, 0))
        if metas[0].has_lora:
            keep(plan, store, "x_n2", x)
        if _fused(plan):
            act = _fused_gelu_epilogue_forward(plan, store, u_out, linear_params(lin, 0)[3])
        else:
            act = gelu_epilogue_forward(plan, store, u_out)
        del u_out
        d_out = lora_linear_forward(metas[1], act, *linear_params(lin, 1))
        del act
        keep_linear_extras(store, "down", metas[1], d_out)
        h = _hidden_dropout(plan, store, d_out.y)
        z2 = h + x
        del h, d_out
        y = _layernorm_kept(plan, store, 2, z2, ln_w, ln_b)
        if plan.check_finite:
            check_finite(y, f"{plan.layer_name} (output of the encoder layer)")
        end_forward(ctx, plan, store, "ffn")
        return y

    @staticmethod
    def backward(ctx, dy):
        return backward_in_autocast(ctx, EncoderFFNBlockFn._backward, dy)

    @staticmethod
    def _backward(ctx, plan: EncoderFFNPlan, dy):
        pol = plan.policy
        load = TensorLoad(ctx, pol.backend)
        need = ctx.needs_input_grad
        off = _ENC_FFN_LIN_OFFSET
        lin_grads = [None] * (PARAMS_PER_LINEAR * 2)

        dz2, dd, dln_w, dln_b = _add_norm_backward(plan, load, need, 2, dy)

        if _fused(plan):
            lin_grads[4:8], du = _fused_ffn_epilogue_backward(ctx, plan, load, dd)
        else:
            epilogue = gelu_epilogue_backward(plan, load)
            d_act, lin_grads[4:8] = linear_grads(ctx, plan, load, 1, "down", dd, next(epilogue), off)
            du = epilogue.send(d_act)
            epilogue.close()
            del d_act
        del dd

        dx_up, lin_grads[0:4] = linear_grads(ctx, plan, load, 0, "up", du, load.get("x_n2"), off)
        dx = dz2 + dx_up
        return (None, dx if need[1] else None, dln_w, dln_b, *lin_grads)


# -- fused GELU epilogue (intra_inter_full_fuse) ------------------------------------------------
#
# Same numerics as the intra_inter GELU epilogue, one pass each way over the (tokens, d_ff)
# tensors (hyclora.kernels.act_lora): the forward writes the codes of ``X W + bias`` and
# ``F = GELU(X W + bias + s XA B^T)``; the backward writes ``dU = dF * GELU'(U~)`` and ``F~``.
# Everything between loads and stores is fp32 (the op-by-op path rounds U~ to the activation
# dtype first; with fp32 activations the two agree to rounding).


def _fused_gelu_epilogue_forward(plan: EncoderFFNPlan, store: TensorStore, u_out, lora_b) -> torch.Tensor:
    """Keep ``Q(X W + bias)`` of the up projection (codes from the fused kernel) and its ``XA``;
    return ``F = GELU(U)``. ``u_out`` comes from ``lora_base_forward``."""
    pol, meta = plan.policy, plan.linears[0]
    shape = u_out.y_w.shape
    n = shape[-1]
    y2d = u_out.y_w.detach().reshape(-1, n)
    params = pol.quant_params(y2d, plan.stats.get("up"), plan.update, "up" in plan.replay)
    lo, step, inv = params[:3]
    if len(params) > 3 and params[3] is not None:  # (lo, step, inv[, outlier_idx])
        raise RuntimeError("hyclora internal error: the fused GELU kernel quantises U without outlier "
                           "channels, but its statistics have some.")
    xa = u_out.xa.reshape(-1, u_out.xa.shape[-1]) if meta.has_lora else None
    b = lora_b if meta.has_lora else None
    dot = dot_dtype_for(xa, b) if xa is not None else None
    with torch.no_grad():
        codes, f = act_lora_forward(y2d, xa, b, meta.scaling, lo, inv, pol.bits, plan.activation,
                                    dot_dtype=dot, backend=pol.backend)
    # same names and order as the op-by-op path (gelu_epilogue_forward)
    keep_linear_extras(store, "up", meta, u_out)
    store.packed("up", "quant", QuantizedTensor(codes, lo, step, bits=pol.bits, shape=shape, dtype=u_out.y_w.dtype))
    return f.view(shape)


def _fused_ffn_epilogue_backward(ctx, plan: EncoderFFNPlan, load: TensorLoad, dd: torch.Tensor):
    """down-projection backward + the fused GELU backward. ``dF`` needs no activation, so it
    comes first; one kernel then writes ``dU`` and ``F~``; the down projection's LoRA-A gradient
    reads ``F~``. Returns ``((None, dbias, dA, dB) of down, dU)``."""
    pol = plan.policy
    meta_u, meta_d = plan.linears
    off = _ENC_FFN_LIN_OFFSET
    need = ctx.needs_input_grad
    b_u = load.param(off + 3)
    w_d, bias_d, a_d, b_d = (load.param(off + PARAMS_PER_LINEAR + j) for j in range(PARAMS_PER_LINEAR))
    need_d = need[off + PARAMS_PER_LINEAR: off + 2 * PARAMS_PER_LINEAR]
    q = load.get_quantized("up")
    if q.num_outliers or q.group_size is not None:
        raise RuntimeError("hyclora internal error: fused GELU expects per-channel codes without outliers.")
    xa_d, rng_d = load.get("xa_down"), load.get("rng_down")
    need_da = bool(need_d[2]) and meta_d.has_lora
    d_act, dbias, _, db = lora_linear_backward(
        meta_d, dd, None, xa_d, w_d, bias_d, a_d, b_d, rng_state=rng_d, need_dx=True,
        need_da=False, need_db=bool(need_d[3]), need_dbias=bool(need_d[1]))
    shape = q.shape
    n = shape[-1]
    xa_u = load.get("xa_up") if meta_u.has_lora else None
    xa_u = None if xa_u is None else xa_u.reshape(-1, xa_u.shape[-1])
    b = b_u if meta_u.has_lora else None
    dot = dot_dtype_for(xa_u, b) if xa_u is not None else None
    with torch.no_grad():
        du, f_hat = act_lora_backward(q.codes, q.lo, q.step, xa_u, b, meta_u.scaling, d_act.reshape(-1, n), pol.bits,
                                      plan.activation, dtype=q.dtype, need_f=need_da, dot_dtype=dot,
                                      backend=pol.backend)
    del d_act
    da = None
    if need_da:
        _, _, da, _ = lora_linear_backward(meta_d, dd, f_hat.view(shape), xa_d, w_d, None, a_d, b_d,
                                           rng_state=rng_d, need_dx=False, need_da=True, need_db=False)
    return (None, dbias, da, db), du.view(shape)


# -- functional entry points -----------------------------------------------------------------


def encoder_attention_block(plan: EncoderAttentionPlan, x, ln_w, ln_b, mask, params: Sequence):
    """``params``: ``(W, bias, A, B)`` for query, key, value, attention-output dense (16 entries)."""
    if len(params) != PARAMS_PER_LINEAR * 4 or len(plan.linears) != 4:
        raise ValueError("hyclora: encoder_attention_block needs 4 linears (query, key, value, output)")
    return EncoderAttentionBlockFn.apply(plan, x, ln_w, ln_b, mask, *params)


def encoder_ffn_block(plan: EncoderFFNPlan, x, ln_w, ln_b, params: Sequence):
    """``params``: ``(W, bias, A, B)`` for the intermediate (up) and output (down) dense (8 entries)."""
    if len(params) != PARAMS_PER_LINEAR * 2 or len(plan.linears) != 2:
        raise ValueError("hyclora: encoder_ffn_block needs 2 linears (intermediate, output)")
    return EncoderFFNBlockFn.apply(plan, x, ln_w, ln_b, *params)


__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "check_activation",
    "layernorm_forward",
    "layernorm_backward",
    "dropout_forward",
    "dropout_mask_again",
    "encoder_attention_probs",
    "encoder_attention_forward",
    "encoder_attention_backward",
    "EncoderAttentionPlan",
    "EncoderFFNPlan",
    "EncoderAttentionBlockFn",
    "EncoderFFNBlockFn",
    "encoder_attention_block",
    "encoder_ffn_block",
    "gelu_epilogue_forward",
    "gelu_epilogue_backward",
]
