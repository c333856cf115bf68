"""Post-LN encoder layer (BERT / RoBERTa) as two autograd Functions with hand-written backwards.

* :class:`EncoderAttentionBlockFn`:
  ``x -> q/k/v LoRA -> attention (+ probs dropout) -> o LoRA -> dropout -> Z1 = . + x -> LN1``
* :class:`EncoderFFNBlockFn`:
  ``h -> up LoRA -> GELU -> down LoRA -> dropout -> Z2 = . + h -> LN2``

Same design as the Llama blocks (:mod:`hyclora.ops.blocks`, whose helpers these reuse): the
forward computes every output from exact activations; what is kept for the backward is decided
by a :class:`~hyclora.ops.storage.StoragePolicy`, one code path for all four layer types;
everything goes through one ``ctx.save_for_backward``. ``intra_inter_full_fuse`` stores exactly
what ``intra_inter`` stores; its GELU epilogue (quantise ``X W + bias``, add the LoRA term,
GELU; and back: rebuild, ``GELU'``, ``F~``) runs as one Triton kernel each way (end of file).

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

import math
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
from .blocks import (
    PARAMS_PER_LINEAR,
    BlockPlan,
    _autocast,
    _autocast_state,
    _check_params,
    _keep,
    _keep_linear_extras,
    _linear_grads,
    _linear_params,
)
from . import fused_swiglu
from .lora import (
    capture_rng_state,
    draw_dropout_mask,
    lora_linear_backward,
    lora_linear_forward,
    lora_reconstruct,
    redraw_dropout_mask,
)
from .storage import TensorLoad, TensorStore
from hyclora.quant import check_finite
from hyclora.quant.core import QuantizedTensor, check_bits, packed_width, quantize_pack_torch, resolve_backend, unpack_codes

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

GELU_EXACT = ("gelu",)
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
SUPPORTED_ACTIVATIONS = GELU_EXACT + GELU_TANH
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(act: str, where: str = "") -> str:
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"hyclora{(' (' + where + ')') if where else ''}: hidden_act={act!r} is not supported by "
            f"the encoder blocks; supported: {', '.join(SUPPORTED_ACTIVATIONS)}. Set "
            "HyCLoRAConfig(use_hyclora=False) to train this model without hyclora."
        )
    return act


def gelu_forward(u: torch.Tensor, act: str = "gelu") -> torch.Tensor:
    """GELU as transformers computes it: ``gelu`` is the exact erf form (``GELUActivation``),
    ``gelu_new`` / ``gelu_pytorch_tanh`` the tanh approximation."""
    check_activation(act)
    return F.gelu(u, approximate="none" if act in GELU_EXACT else "tanh")


def gelu_backward(du_out: torch.Tensor, u: torch.Tensor, act: str = "gelu") -> torch.Tensor:
    """``dL/du`` from ``dL/dGELU(u)``, in fp32 (fp64 for fp64), returned in ``u``'s dtype.

    exact: ``GELU'(u) = Phi(u) + u phi(u)``, ``Phi`` the normal CDF, ``phi`` its density;
    tanh:  ``0.5 (1 + t) + 0.5 u (1 - t^2) c (1 + 3 a u^2)``, ``t = tanh(c (u + a u^3))``.
    """
    check_activation(act)
    uf = u.to(_acc(u))
    if act in GELU_EXACT:
        cdf = 0.5 * (1.0 + torch.erf(uf * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * uf * uf) * _INV_SQRT_2PI
        deriv = cdf + uf * pdf
    else:
        inner = _SQRT_2_OVER_PI * (uf + 0.044715 * uf * uf * uf)
        t = torch.tanh(inner)
        deriv = 0.5 * (1.0 + t) + 0.5 * uf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * uf * uf)
    return (du_out.to(uf.dtype) * deriv).to(u.dtype)


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


class EncoderAttentionBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: EncoderAttentionPlan, x, ln_w, ln_b, mask, *lin):
        check_implementation(plan.impl, plan.layer_name)
        _check_layernorm(plan, ln_w, ln_b)
        _check_params(plan, lin, x if ln_w is None else ln_w)  # (norm check: LayerNorm above)
        ctx.plan = plan
        ctx.autocast = _autocast_state(x.device.type)
        pol, metas = plan.policy, plan.linears
        b, s, _ = x.shape
        H, D = plan.num_heads, plan.head_dim
        if plan.check_finite:
            check_finite(x, f"{plan.layer_name} (input of the encoder layer)")
        store = TensorStore()
        store.params((None, None, ln_w, ln_b, None) + tuple(lin))

        outs = [lora_linear_forward(metas[i], x, *_linear_params(lin, i)) for i in range(3)]
        if any(m.has_lora for m in metas[:3]):
            _keep(plan, store, "x_n1", x)
        for name, meta, out in zip(_QKV, metas[:3], outs):
            _keep_linear_extras(store, name, meta, out)
            _keep(plan, store, name, out.y_w if pol.reconstruct else out.y)
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
                    _keep(plan, store, "o", o)
            del probs
        if mode in ("sdpa", "recompute"):
            store.plain("mask", mask, describe=False)  # only a recompute of the attention needs it
        del q, k, v
        out_o = lora_linear_forward(metas[3], o, *_linear_params(lin, 3))
        del o
        _keep_linear_extras(store, "o", metas[3], out_o)
        h, hid_rng = dropout_forward(out_o.y, plan.hidden_dropout)
        if hid_rng is not None:
            store.plain("rng_hidden", hid_rng)
        z1 = h + x
        del h, out_o
        y, mean, rstd = layernorm_forward(z1, ln_w, ln_b, plan.eps)
        _keep(plan, store, "z1", z1)
        store.plain("mean1", mean)
        store.plain("rstd1", rstd)
        store.save(ctx)
        if plan.record is not None:
            plan.record["attention"] = store.manifest
        return y

    @staticmethod
    def backward(ctx, dy):
        with _autocast(ctx.autocast):
            return EncoderAttentionBlockFn._backward(ctx, ctx.plan, dy)

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

        ln_w = load.param(2)
        dz1, dln_w, dln_b = layernorm_backward(
            dy, load.get("z1"), load.get("mean1"), load.get("rstd1"), ln_w,
            need_dz=True, need_dweight=bool(need[2]), need_dbias=bool(need[3]),
        )
        if dln_b is not None:
            dln_b = dln_b.to(load.param(3).dtype)
        dh = dz1
        hid_mask = dropout_mask_again(load.get("rng_hidden"), dz1, plan.hidden_dropout)
        if hid_mask is not None:
            dh = dz1 * hid_mask
        del hid_mask

        def rebuilt(i: int, name: str):
            val = load.get(name)
            if pol.reconstruct:
                val = lora_reconstruct(metas[i], val, load.get(f"xa_{name}"), load.param(off + PARAMS_PER_LINEAR * i + 3))
            return val.view(b, s, H, D).transpose(1, 2)

        q, k, v = (rebuilt(i, name) for i, name in enumerate(_QKV))
        mask = load.get("mask")
        if mode == "sdpa":
            o_re, leaves = sdpa_attention_recompute(q, k, v, mask, plan.scaling, is_causal=False)
            do, lin_grads[12:16] = _linear_grads(ctx, plan, load, 3, "o", dh, o_re.detach(), off)
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
            do, lin_grads[12:16] = _linear_grads(ctx, plan, load, 3, "o", dh, o_hat, off)
            del o_hat
            do = do.view(b, s, H, D).transpose(1, 2)
            dq, dk, dv = encoder_attention_backward(do, probs, q, k, v, plan.scaling, drop)
            del probs, drop
        del q, k, v, do, dh

        x_hat = load.get("x_n1")
        dx = dz1  # the residual branch
        for i, (name, dproj) in enumerate(zip(_QKV, (dq, dk, dv))):
            dproj = dproj.transpose(1, 2).reshape(b, s, H * D)
            dxi, lin_grads[4 * i : 4 * i + 4] = _linear_grads(ctx, plan, load, i, name, dproj, x_hat, off)
            dx = dx + dxi
        return (None, dx if need[1] else None, dln_w, dln_b, None, *lin_grads)


# -- FFN block -------------------------------------------------------------------------------
#
# The GELU epilogue (what is kept of U, GELU(U), and its backward) is the part the fused layer
# type replaces; it is isolated in these two functions, as for the SwiGLU MLP.


def gelu_epilogue_forward(plan: EncoderFFNPlan, store: TensorStore, u_out) -> torch.Tensor:
    """Keep what the backward needs of the up_proj output; return ``F = GELU(U)``."""
    pol, metas = plan.policy, plan.linears
    _keep_linear_extras(store, "up", metas[0], u_out)
    _keep(plan, store, "up", u_out.y_w if pol.reconstruct else u_out.y)
    act = gelu_forward(u_out.y, plan.activation)
    if pol.store_elementwise and metas[1].has_lora:
        _keep(plan, store, "hidden", act)
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


# the fused GELU epilogue of intra_inter_full_fuse is at the end of this file


class EncoderFFNBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: EncoderFFNPlan, x, ln_w, ln_b, *lin):
        check_activation(plan.activation, plan.layer_name)
        _check_layernorm(plan, ln_w, ln_b)
        _check_params(plan, lin, x if ln_w is None else ln_w)
        ctx.plan = plan
        ctx.autocast = _autocast_state(x.device.type)
        metas = plan.linears
        store = TensorStore()
        store.params((None, None, ln_w, ln_b) + tuple(lin))

        # full_fuse: base output and XA only; the fused kernel adds the LoRA term, quantises and
        # applies GELU in one pass, so the full U never reaches memory
        up_forward = fused_swiglu.lora_base_forward if _fused(plan) else lora_linear_forward
        u_out = up_forward(metas[0], x, *_linear_params(lin, 0))
        if metas[0].has_lora:
            _keep(plan, store, "x_n2", x)
        if _fused(plan):
            act = _fused_gelu_epilogue_forward(plan, store, u_out, _linear_params(lin, 0)[3])
        else:
            act = gelu_epilogue_forward(plan, store, u_out)
        del u_out
        d_out = lora_linear_forward(metas[1], act, *_linear_params(lin, 1))
        del act
        _keep_linear_extras(store, "down", metas[1], d_out)
        h, hid_rng = dropout_forward(d_out.y, plan.hidden_dropout)
        if hid_rng is not None:
            store.plain("rng_hidden", hid_rng)
        z2 = h + x
        del h, d_out
        y, mean, rstd = layernorm_forward(z2, ln_w, ln_b, plan.eps)
        _keep(plan, store, "z2", z2)
        store.plain("mean2", mean)
        store.plain("rstd2", rstd)
        if plan.check_finite:
            check_finite(y, f"{plan.layer_name} (output of the encoder layer)")
        store.save(ctx)
        if plan.record is not None:
            plan.record["ffn"] = store.manifest
        return y

    @staticmethod
    def backward(ctx, dy):
        with _autocast(ctx.autocast):
            return EncoderFFNBlockFn._backward(ctx, ctx.plan, dy)

    @staticmethod
    def _backward(ctx, plan: EncoderFFNPlan, dy):
        pol = plan.policy
        load = TensorLoad(ctx, pol.backend)
        need = ctx.needs_input_grad
        off = _ENC_FFN_LIN_OFFSET
        lin_grads = [None] * (PARAMS_PER_LINEAR * 2)

        dz2, dln_w, dln_b = layernorm_backward(
            dy, load.get("z2"), load.get("mean2"), load.get("rstd2"), load.param(2),
            need_dz=True, need_dweight=bool(need[2]), need_dbias=bool(need[3]),
        )
        if dln_b is not None:
            dln_b = dln_b.to(load.param(3).dtype)
        dd = dz2
        hid_mask = dropout_mask_again(load.get("rng_hidden"), dz2, plan.hidden_dropout)
        if hid_mask is not None:
            dd = dz2 * hid_mask
        del hid_mask

        if _fused(plan):
            lin_grads[4:8], du = _fused_ffn_epilogue_backward(ctx, plan, load, dd)
        else:
            epilogue = gelu_epilogue_backward(plan, load)
            d_act, lin_grads[4:8] = _linear_grads(ctx, plan, load, 1, "down", dd, next(epilogue), off)
            du = epilogue.send(d_act)
            epilogue.close()
            del d_act
        del dd

        dx_up, lin_grads[0:4] = _linear_grads(ctx, plan, load, 0, "up", du, load.get("x_n2"), off)
        dx = dz2 + dx_up
        return (None, dx if need[1] else None, dln_w, dln_b, *lin_grads)


# -- fused GELU epilogue (intra_inter_full_fuse) ------------------------------------------------
#
# Same numerics as the intra_inter GELU epilogue, one pass each way over the (tokens, d_ff)
# tensors, built from the fused SwiGLU kernels' pieces (hyclora.ops.fused_swiglu: the in-kernel
# LoRA dot, the code packing shared with hyclora.quant, the launch/tile policy):
#
# * forward: reads the up projection's base output ``X W + bias``, its ``XA`` and ``lora_B``;
#   writes the packed codes of ``X W + bias`` (what ``hyclora.quant.quantize`` would write with
#   the same parameters) and ``F = GELU(X W + bias + s XA B^T)``, the down-projection input.
# * backward: reads the codes, ``XA``, ``lora_B`` and ``dF``; writes ``dU = dF * GELU'(U~)`` and
#   ``F~ = GELU(U~)`` (the down projection's LoRA-A gradient needs it).
#
# Everything between loads and stores is fp32 (the op-by-op path rounds U~ to the activation
# dtype first; with fp32 activations the two agree to rounding). Exact erf GELU or the tanh
# approximation, as the model's hidden_act says.

_ACT_CODE = {"gelu": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1}


def _gelu_fp32(u: torch.Tensor, act: str) -> torch.Tensor:
    return F.gelu(u, approximate="none" if _ACT_CODE[act] == 0 else "tanh")


def _gelu_deriv_fp32(u: torch.Tensor, act: str) -> torch.Tensor:
    return gelu_backward(torch.ones_like(u), u, act)


def gelu_lora_forward_torch(yw, xa, b, scale, lo, inv, bits, act="gelu", *, dot_dtype=None):
    """Reference of :func:`gelu_lora_forward` (same arguments, same results)."""
    codes = quantize_pack_torch(yw, lo, inv, bits)
    dot = dot_dtype or (torch.promote_types(xa.dtype, b.dtype) if xa is not None else None)
    u = fused_swiglu._rebuild(yw.float(), fused_swiglu._lora_term_torch(xa, b, dot), scale)
    return codes, _gelu_fp32(u, act).to(yw.dtype)


def gelu_lora_backward_torch(codes, lo, step, xa, b, scale, df, bits, act="gelu", *, dtype, need_f=True,
                             dot_dtype=None):
    """Reference of :func:`gelu_lora_backward` (same arguments, same results)."""
    n = df.shape[1]
    u = unpack_codes(codes, bits, n).float() * step + lo
    dot = dot_dtype or (torch.promote_types(xa.dtype, b.dtype) if xa is not None else None)
    u = fused_swiglu._rebuild(u, fused_swiglu._lora_term_torch(xa, b, dot), scale)
    out_dtype = torch.promote_types(df.dtype, dtype)
    du = (df.float() * _gelu_deriv_fp32(u, act)).to(out_dtype)
    f_hat = _gelu_fp32(u, act).to(dtype) if need_f else None
    return du, f_hat


if fused_swiglu.triton is not None:
    import triton
    import triton.language as tl

    # the code layout (quantise, pack, unpack) and the interpreter's bf16 rounding fix are shared
    # with the fused SwiGLU kernels: one codec for every fused kernel and hyclora.quant
    from .fused_swiglu import _cast_out, _pack, _quant_codes, _unpack

    @triton.jit
    def _load_lora_bt(b_ptr, cols, cmask, R, stride_bn, BLOCK_R: tl.constexpr):
        # PEFT's lora_B is (out_features, r): the B^T tile (BLOCK_R, BLOCK_N), rank zero-padded
        ks = tl.arange(0, BLOCK_R)
        return tl.load(b_ptr + ks[:, None] + cols[None, :] * stride_bn,
                       mask=(ks < R)[:, None] & cmask[None, :], other=0.0)

    @triton.jit
    def _gelu_lora_tile(xa_ptr, b_ptr, bt, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        DOT_FP32: tl.constexpr):
        """fp32 (BLOCK_M, BLOCK_N) tile of xa[rows, :R] @ B[cols, :R]^T."""
        if DOT_FP32:
            # IEEE fp32 products of already rounded operands (torch's fp32 matmul; the only
            # correct dot in the interpreter), over K chunks of 16 to bound register use
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, BLOCK_R, 16):
                ks = k0 + tl.arange(0, 16)
                a = tl.load(xa_ptr + rows[:, None] * stride_xm + ks[None, :],
                            mask=rmask[:, None] & (ks < R)[None, :], other=0.0)
                b = tl.load(b_ptr + ks[:, None] + cols[None, :] * stride_bn,
                            mask=(ks < R)[:, None] & cmask[None, :], other=0.0)
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            return acc
        else:
            # bf16/fp16 operands on tensor cores, fp32 accumulation; bt loaded once per program
            ks = tl.arange(0, BLOCK_R)
            a = tl.load(xa_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=rmask[:, None] & (ks < R)[None, :], other=0.0)
            return tl.dot(a, bt, out_dtype=tl.float32)

    @triton.jit
    def _gelu_and_deriv(u, ACT: tl.constexpr):
        """(GELU(u), GELU'(u)) in fp32; ACT 0: exact erf form, 1: tanh approximation."""
        if ACT == 0:
            cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
            pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
            return u * cdf, cdf + u * pdf
        else:
            c = 0.7978845608028654
            inner = c * (u + 0.044715 * u * u * u)
            e = tl.exp(-2.0 * tl.abs(inner))  # tanh without overflow: sign * (1 - e) / (1 + e)
            t = tl.where(inner < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
            return 0.5 * u * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * c * (1.0 + 0.134145 * u * u)

    @triton.jit
    def _gelu_fwd_kernel(
        y_ptr, xa_ptr, b_ptr, lo_ptr, inv_ptr, c_ptr, f_ptr,
        M, N, NB, R, stride_ym, stride_xm, stride_bn, stride_fm, scale,
        BITS: tl.constexpr, HAS_LORA: tl.constexpr, ACT: tl.constexpr, DOT_FP32: tl.constexpr,
        EMULATE_BF16_RNE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_ITERS: tl.constexpr,
    ):
        E: tl.constexpr = 8 // BITS
        BLOCK_B: tl.constexpr = BLOCK_N // E
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        bcols = pid_n * BLOCK_B + tl.arange(0, BLOCK_B)
        bmask = bcols < NB
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)[None, :]
        inv = tl.load(inv_ptr + cols, mask=cmask, other=0.0)[None, :]
        bt = _load_lora_bt(b_ptr, cols, cmask & HAS_LORA, R, stride_bn, BLOCK_R)
        for it in tl.static_range(ROW_ITERS):
            rows = ((pid_m * ROW_ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            packed = _pack(_quant_codes(y, lo, inv, mask, BITS), BLOCK_M, BLOCK_N, BITS)
            tl.store(c_ptr + rows[:, None] * NB + bcols[None, :], packed, mask=rmask[:, None] & bmask[None, :])
            u = y
            if HAS_LORA:
                u = y + _gelu_lora_tile(xa_ptr, b_ptr, bt, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                                        BLOCK_M, BLOCK_N, BLOCK_R, DOT_FP32) * scale
            f, _ = _gelu_and_deriv(u, ACT)
            tl.store(f_ptr + rows[:, None] * stride_fm + cols[None, :], _cast_out(f, f_ptr, EMULATE_BF16_RNE),
                     mask=mask)

    @triton.jit
    def _gelu_bwd_kernel(
        c_ptr, lo_ptr, step_ptr, xa_ptr, b_ptr, df_ptr, du_ptr, fh_ptr,
        M, N, NB, R, stride_dfm, stride_xm, stride_bn, stride_om, scale,
        BITS: tl.constexpr, HAS_LORA: tl.constexpr, ACT: tl.constexpr, DOT_FP32: tl.constexpr,
        NEED_F: tl.constexpr, EMULATE_BF16_RNE_GRAD: tl.constexpr, EMULATE_BF16_RNE_F: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ROW_ITERS: tl.constexpr,
    ):
        E: tl.constexpr = 8 // BITS
        BLOCK_B: tl.constexpr = BLOCK_N // E
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        bcols = pid_n * BLOCK_B + tl.arange(0, BLOCK_B)
        bmask = bcols < NB
        lo = tl.load(lo_ptr + cols, mask=cmask, other=0.0)[None, :]
        st = tl.load(step_ptr + cols, mask=cmask, other=0.0)[None, :]
        bt = _load_lora_bt(b_ptr, cols, cmask & HAS_LORA, R, stride_bn, BLOCK_R)
        for it in tl.static_range(ROW_ITERS):
            rows = ((pid_m * ROW_ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            codes = tl.load(c_ptr + rows[:, None] * NB + bcols[None, :], mask=rmask[:, None] & bmask[None, :], other=0)
            u = _unpack(codes, BLOCK_M, BLOCK_N, BITS) * st + lo
            if HAS_LORA:
                u = u + _gelu_lora_tile(xa_ptr, b_ptr, bt, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                                        BLOCK_M, BLOCK_N, BLOCK_R, DOT_FP32) * scale
            f, deriv = _gelu_and_deriv(u, ACT)
            dfv = tl.load(df_ptr + rows[:, None] * stride_dfm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            ooffs = rows[:, None] * stride_om + cols[None, :]
            tl.store(du_ptr + ooffs, _cast_out(dfv * deriv, du_ptr, EMULATE_BF16_RNE_GRAD), mask=mask)
            if NEED_F:
                tl.store(fh_ptr + ooffs, _cast_out(f, fh_ptr, EMULATE_BF16_RNE_F), mask=mask)


def _gelu_launch(kernel, m: int, n: int, args: tuple, consts: dict, config) -> None:
    """Fixed tiles (the fused SwiGLU autotune table is tuned for its own kernels): one
    ``(BLOCK_M, BLOCK_N, num_warps, ROW_ITERS)`` per launch, interpreter-friendly on the CPU."""
    if config is not None:
        bm, bn, warps, ri = tuple(config) + (1,) * (4 - len(config))
    elif fused_swiglu._INTERPRET:
        bm, bn, warps, ri = fused_swiglu._interpret_blocks(m, n)
    else:
        bm, bn, warps, ri = fused_swiglu._FIXED
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"fused GELU tile {bm}x{bn}: both must be powers of two >= 16 (tl.dot minimum).")
    grid = (triton.cdiv(m, bm * ri), triton.cdiv(n, bn))
    kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, ROW_ITERS=ri, **fused_swiglu._launch_opts(warps))


def _lora_operands(xa, b, dot_dtype):
    if xa is None:
        return None, None, 1, True
    dot_dtype = dot_dtype or torch.promote_types(xa.dtype, b.dtype)
    if dot_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hyclora fused GELU: dot dtype {dot_dtype} is not supported (fp32/bf16/fp16).")
    return (xa.to(dot_dtype).contiguous(), b.to(dot_dtype).contiguous(), xa.shape[1],
            dot_dtype == torch.float32 or fused_swiglu._INTERPRET)


def _check_gelu_args(yw_or_df, xa, b, lo, other, what):
    if yw_or_df.dim() != 2:
        raise ValueError(f"hyclora fused GELU: {what} has shape {tuple(yw_or_df.shape)}; reshape(-1, d_ff) first.")
    m, n = yw_or_df.shape
    if (xa is None) != (b is None):
        raise ValueError("hyclora fused GELU: pass both xa and lora_B, or neither (no LoRA).")
    if xa is not None and (xa.dim() != 2 or xa.shape[0] != m or b.shape != (n, xa.shape[1])):
        raise ValueError(f"hyclora fused GELU: xa {tuple(xa.shape)} / lora_B {tuple(b.shape)} do not fit "
                         f"({m}, r) / ({n}, r).")
    for t in (lo, other):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"hyclora fused GELU: per-channel parameters of shape {tuple(t.shape)}; expected ({n},).")


def gelu_lora_forward(yw: torch.Tensor, xa: Optional[torch.Tensor], b: Optional[torch.Tensor], scale: float,
                      lo: torch.Tensor, inv: torch.Tensor, bits: int, act: str = "gelu", *,
                      dot_dtype: Optional[torch.dtype] = None, backend: str = "auto", config=None):
    """Quantise the up projection's base output and compute ``F = GELU(yw + s xa B^T)`` in one pass.

    ``yw``: ``(M, N)``; ``xa``: ``(M, r)`` or ``None``; ``b``: PEFT ``lora_B`` ``(N, r)``;
    ``lo`` / ``inv``: ``(N,)`` fp32 (``lo``, ``1/step``). Returns ``(codes, F)``: packed uint8
    codes identical to :func:`hyclora.quant.quantize` with these parameters, ``F`` in ``yw.dtype``.
    """
    check_bits(bits)
    check_activation(act)
    _check_gelu_args(yw, xa, b, lo, inv, "yw")
    if resolve_backend(backend, yw.device) != "triton":
        return gelu_lora_forward_torch(yw, xa, b, scale, lo, inv, bits, act, dot_dtype=dot_dtype)
    fused_swiglu._check_triton_device(yw, xa)
    m, n = yw.shape
    yw = yw.contiguous()
    xa, b, r, dot_fp32 = _lora_operands(xa, b, dot_dtype)
    nb = packed_width(n, bits)
    codes = torch.empty((m, nb), dtype=torch.uint8, device=yw.device)
    f = torch.empty((m, n), dtype=yw.dtype, device=yw.device)
    args = (yw, xa if xa is not None else yw, b if b is not None else yw, lo.float().contiguous(),
            inv.float().contiguous(), codes, f, m, n, nb, r, yw.stride(0), r, r, f.stride(0), float(scale))
    consts = dict(BITS=bits, HAS_LORA=xa is not None, ACT=_ACT_CODE[act], DOT_FP32=dot_fp32,
                  EMULATE_BF16_RNE=fused_swiglu._INTERPRET and f.dtype == torch.bfloat16,
                  BLOCK_R=fused_swiglu._block_r(r))
    _gelu_launch(_gelu_fwd_kernel, m, n, args, consts, config)
    return codes, f


def gelu_lora_backward(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, xa: Optional[torch.Tensor],
                       b: Optional[torch.Tensor], scale: float, df: torch.Tensor, bits: int, act: str = "gelu", *,
                       dtype: torch.dtype, need_f: bool = True, dot_dtype: Optional[torch.dtype] = None,
                       backend: str = "auto", config=None):
    """Rebuild ``U~`` from its codes and LoRA term; return ``(dU, F~)`` (``F~`` ``None`` unless
    ``need_f``). ``dtype``: the forward activations' dtype (that of ``F~``; ``dU`` gets
    ``promote(df.dtype, dtype)``)."""
    check_bits(bits)
    check_activation(act)
    _check_gelu_args(df, xa, b, lo, step, "df")
    m, n = df.shape
    nb = packed_width(n, bits)
    if codes.dtype != torch.uint8 or codes.shape != (m, nb):
        raise ValueError(f"hyclora fused GELU: codes are {codes.dtype} {tuple(codes.shape)}; expected uint8 ({m}, {nb}).")
    if resolve_backend(backend, df.device) != "triton":
        return gelu_lora_backward_torch(codes, lo, step, xa, b, scale, df, bits, act, dtype=dtype,
                                        need_f=need_f, dot_dtype=dot_dtype)
    fused_swiglu._check_triton_device(codes, df, xa)
    df, codes = df.contiguous(), codes.contiguous()
    xa, b, r, dot_fp32 = _lora_operands(xa, b, dot_dtype)
    out_dtype = torch.promote_types(df.dtype, dtype)
    du = torch.empty((m, n), dtype=out_dtype, device=df.device)
    f_hat = torch.empty((m, n), dtype=dtype, device=df.device) if need_f else None
    args = (codes, lo.float().contiguous(), step.float().contiguous(), xa if xa is not None else df,
            b if b is not None else df, df, du, f_hat if f_hat is not None else du,
            m, n, nb, r, df.stride(0), r, r, du.stride(0), float(scale))
    consts = dict(BITS=bits, HAS_LORA=xa is not None, ACT=_ACT_CODE[act], DOT_FP32=dot_fp32, NEED_F=need_f,
                  EMULATE_BF16_RNE_GRAD=fused_swiglu._INTERPRET and out_dtype == torch.bfloat16,
                  EMULATE_BF16_RNE_F=fused_swiglu._INTERPRET and dtype == torch.bfloat16,
                  BLOCK_R=fused_swiglu._block_r(r))
    _gelu_launch(_gelu_bwd_kernel, m, n, args, consts, config)
    return du, f_hat


def _fused_gelu_epilogue_forward(plan: EncoderFFNPlan, store: TensorStore, u_out, lora_b) -> torch.Tensor:
    """Keep ``Q(X W + bias)`` of the up projection (codes from the fused kernel) and its ``XA``;
    return ``F = GELU(U)``. ``u_out`` comes from ``fused_swiglu.lora_base_forward``."""
    pol, meta = plan.policy, plan.linears[0]
    shape = u_out.y_w.shape
    n = shape[-1]
    y2d = u_out.y_w.detach().reshape(-1, n)
    params = fused_swiglu.quant_params_like_policy(pol, y2d, plan.stats.get("up"), plan.update, "up" in plan.replay)
    lo, step, inv = params[:3]
    if len(params) > 3 and params[3] is not None:  # (lo, step, inv[, outlier_idx])
        raise RuntimeError("hyclora internal error: the fused GELU kernel quantises U without outlier "
                           "channels, but its statistics have some.")
    xa = u_out.xa.reshape(-1, u_out.xa.shape[-1]) if meta.has_lora else None
    b = lora_b if meta.has_lora else None
    dot = fused_swiglu.dot_dtype_for(xa, b) if xa is not None else None
    with torch.no_grad():
        codes, f = gelu_lora_forward(y2d, xa, b, meta.scaling, lo, inv, pol.bits, plan.activation,
                                     dot_dtype=dot, backend=pol.backend)
    # same names and order as the op-by-op path (gelu_epilogue_forward)
    _keep_linear_extras(store, "up", meta, u_out)
    store.packed("up", "quant", QuantizedTensor(codes, lo, step, bits=pol.bits, shape=shape,
                                                              dtype=u_out.y_w.dtype))
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
    dot = fused_swiglu.dot_dtype_for(xa_u, b) if xa_u is not None else None
    with torch.no_grad():
        du, f_hat = gelu_lora_backward(q.codes, q.lo, q.step, xa_u, b, meta_u.scaling, d_act.reshape(-1, n), pol.bits,
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
    "gelu_forward",
    "gelu_backward",
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
    "gelu_lora_forward",
    "gelu_lora_backward",
    "gelu_lora_forward_torch",
    "gelu_lora_backward_torch",
]
