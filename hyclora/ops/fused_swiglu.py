"""Block glue of the fused gated-MLP epilogue (``intra_inter_full_fuse``): what
:class:`hyclora.ops.blocks.MLPBlockFn` calls to keep gate/up through the one-pass kernels of
:mod:`hyclora.kernels.glu` and to run them backward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from hyclora.kernels.common import dot_dtype_for
from hyclora.kernels.glu import glu_lora_backward, glu_lora_forward
from hyclora.quant.core import QuantizedTensor

from .block_common import keep_linear_extras
from .lora import LinearOut, lora_linear_backward_input_first


_GATE_UP = ("gate", "up")


def gate_activation(plan) -> str:
    """The gate's activation, a transformers name (the plan's ``act``; SiLU for plans without one)."""
    return getattr(plan, "act", "silu")


def _lora_operands(meta_g, meta_u, xa_g, xa_u, b_g, b_u):
    """``(xa_g, xa_u, b_g, b_u, dot_dtype)`` for the kernels: 2-D ``xa``, ``None`` for a
    projection without LoRA, and the dtype of the LoRA dot (None without LoRA)."""
    xa_g = (xa_g if xa_g.dim() == 2 else xa_g.reshape(-1, xa_g.shape[-1])) if meta_g.has_lora else None
    xa_u = (xa_u if xa_u.dim() == 2 else xa_u.reshape(-1, xa_u.shape[-1])) if meta_u.has_lora else None
    b_g = b_g if meta_g.has_lora else None
    b_u = b_u if meta_u.has_lora else None
    ref = xa_g if xa_g is not None else xa_u
    dot = dot_dtype_for(ref, b_g if b_g is not None else b_u) if ref is not None else None
    return xa_g, xa_u, b_g, b_u, dot


def fused_gate_up_forward(plan, store, g_out: LinearOut, u_out: LinearOut, b_gate: Optional[Tensor],
                          b_up: Optional[Tensor]) -> Tensor:
    """Keep ``Q(Y_W)`` of gate/up (codes from the fused kernel) and their ``XA`` in ``store``;
    return ``D = act(G) * U`` of shape ``y_w.shape`` (``act``: the plan's, SiLU unless it says
    otherwise). ``g_out``/``u_out`` come from :func:`hyclora.ops.lora.lora_base_forward`."""
    pol = plan.policy
    for name in _GATE_UP:  # the kernel writes plain per-channel codes, as keep() must
        if pol.spec(name).row_outliers or pol.spec(name).grouped:
            raise RuntimeError(f"hyclora internal error: the fused SwiGLU kernel keeps {name!r} per channel "
                               "without exact rows, but the storage policy keeps it otherwise.")
    bits = tuple(pol.bits_for(name) for name in _GATE_UP)
    meta_g, meta_u = plan.linears[0], plan.linears[1]
    shape = g_out.y_w.shape
    n = shape[-1]
    yw_g = g_out.y_w.reshape(-1, n)
    yw_u = u_out.y_w.reshape(-1, n)
    params = []
    for name, y2d in zip(_GATE_UP, (yw_g, yw_u)):
        lo, step, inv, idx = pol.quant_params(y2d, plan.stats.get(name), plan.update, name in plan.replay,
                                              name=name)
        if idx is not None:
            raise RuntimeError(
                "hyclora internal error: the fused SwiGLU kernel quantises gate/up without outlier "
                "channels, but their statistics have some."
            )
        params.append((lo, step, inv))
    (lo_g, step_g, inv_g), (lo_u, step_u, inv_u) = params
    xa_g, xa_u, bg, bu, dot = _lora_operands(meta_g, meta_u, g_out.xa, u_out.xa, b_gate, b_up)
    with torch.no_grad():
        codes_g, codes_u, d = glu_lora_forward(
            yw_g, yw_u, xa_g, xa_u, bg, bu, meta_g.scaling, meta_u.scaling,
            lo_g, inv_g, lo_u, inv_u, bits, act=gate_activation(plan), dot_dtype=dot, backend=pol.backend)
    # same names and order as the op-by-op path (blocks.swiglu_epilogue_forward)
    for name, meta, out, codes, lo, step, b in ((("gate", meta_g, g_out, codes_g, lo_g, step_g, bits[0])),
                                                (("up", meta_u, u_out, codes_u, lo_u, step_u, bits[1]))):
        keep_linear_extras(store, name, meta, out)
        qt = QuantizedTensor(codes, lo, step, bits=b, shape=shape, dtype=out.y_w.dtype)
        store.packed(name, "quant", qt)
    return d.view(shape)


def fused_mlp_epilogue_backward(plan, load, dy: Tensor, params: Sequence[Sequence[Optional[Tensor]]],
                                need_down: Sequence[bool]):
    """down_proj backward + the fused gated-MLP backward (the plan's activation).

    ``params``: ``(W, bias, A, B)`` of gate, up, down; ``need_down``: ``needs_input_grad`` of
    down's ``(W, bias, A, B)``. Order (the op-by-op path rebuilds ``D~`` first): ``dD`` needs no
    activation, so it is computed first; then one kernel writes ``dG``, ``dU`` and ``D~``; then
    down's LoRA-A gradient reads ``D~``. Returns ``((None, dbias, dA, dB) of down, dG, dU)``.
    """
    pol = plan.policy
    meta_g, meta_u, meta_d = plan.linears
    (_, _, _, b_g), (_, _, _, b_u), (w_d, bias_d, a_d, b_d) = params
    q_g, q_u = load.get_quantized("gate"), load.get_quantized("up")
    for q in (q_g, q_u):
        if not isinstance(q, QuantizedTensor) or q.num_outliers or q.group_size is not None:
            raise RuntimeError("hyclora internal error: fused SwiGLU expects per-channel codes "
                               "without outlier columns for gate/up.")
    need_da = bool(need_down[2]) and meta_d.has_lora
    dd, dbias, db, grad_a = lora_linear_backward_input_first(
        meta_d, dy, load.get("xa_down"), w_d, bias_d, a_d, b_d, rng_state=load.get("rng_down"),
        need_da=need_da, need_db=bool(need_down[3]), need_dbias=bool(need_down[1]), fused=pol.fused_lora)

    shape = q_g.shape
    n = shape[-1]
    xa_g, xa_u, bg, bu, dot = _lora_operands(meta_g, meta_u, load.get("xa_gate") if meta_g.has_lora else None,
                                             load.get("xa_up") if meta_u.has_lora else None, b_g, b_u)
    with torch.no_grad():
        dg, du, d_hat = glu_lora_backward(
            q_g.codes, q_u.codes, q_g.lo, q_g.step, q_u.lo, q_u.step, xa_g, xa_u, bg, bu,
            meta_g.scaling, meta_u.scaling, dd.reshape(-1, n), (q_g.bits, q_u.bits), dtype=q_g.dtype,
            act=gate_activation(plan), need_d=need_da, dot_dtype=dot, backend=pol.backend)
    del dd
    da = grad_a(None if d_hat is None else d_hat.view(shape))
    return (None, dbias, da, db), dg.view(shape), du.view(shape)


__all__ = ["fused_gate_up_forward", "fused_mlp_epilogue_backward", "gate_activation"]
