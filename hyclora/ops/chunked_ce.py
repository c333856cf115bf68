"""LM-head cross-entropy computed in chunks of tokens, so the full logits never exist at once.

At long context the logits dominate memory: 32k tokens x 32k vocabulary in fp32 is 4 GiB, and
autograd keeps them (plus their softmax) for the backward. :func:`chunked_cross_entropy` takes the
final hidden states and the LM-head weight instead of logits. The forward computes, chunk by
chunk, ``logits = hidden @ W.T (+ b)``, upcasts to fp32 (as HF's loss does), and keeps only the
per-token log-sum-exp (4 bytes per token). For a scalar loss (``mean``/``sum``) the forward also
forms each chunk's ``softmax - onehot`` while its logits exist and accumulates ``d hidden`` and
(only when the weight is trainable) ``d W`` / ``d b`` in fp32; the backward multiplies them by the
incoming gradient, so the logits are computed once. Per-token losses (``none``) recompute each
chunk's logits in the backward instead. Peak extra memory is one chunk of logits.

Numerics follow the plain path ``F.cross_entropy(F.linear(h, W, b).float(), y)``: the matmul runs
in the input dtype, softmax/log-sum-exp in fp32, and the logits gradient is cast back to the input
dtype before the matmuls of the backward, as autograd would. The weight gradient is accumulated
over chunks in fp32 (autograd computes it in one matmul), so bf16 results can differ from the
plain path by bf16 rounding only.

Final-logit soft-capping (Gemma 2/3's ``final_logit_softcapping``, ``softcap``): each chunk's
logits become ``softcap * tanh(logits / softcap)`` in the input dtype before the fp32 upcast, the
order of transformers' ``Gemma2ForCausalLM``; the backward recomputes the tanh from the
recomputed logits and runs autograd's ops in the same order (``* softcap``, ``tanh_backward``,
``/ softcap`` in the input dtype), so nothing more is kept.

The LM-head Parameter objects are kept on ``ctx`` (not copies or views made in forward), so a
ZeRO-3 engine that re-gathers the weight for the backward is seen by our backward.
This module imports torch only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Auto chunk: about 2**24 logits (64 MiB in fp32) per chunk, small beside a short batch's full logits,
# and at least 256 tokens, since each chunk reads the whole LM-head weight twice.
_AUTO_CHUNK_ELEMENTS = 1 << 24
_MIN_CHUNK_TOKENS = 256
REDUCTIONS = ("mean", "sum", "none")


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so one chunk of fp32 logits is about 64 MiB, and at least 256 tokens."""
    return max(_MIN_CHUNK_TOKENS, _AUTO_CHUNK_ELEMENTS // max(1, int(vocab_size)))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  softcap: Optional[float] = None, keep_tanh: bool = False):
    """The chunk's (soft-capped) logits upcast for the softmax; with ``keep_tanh``, ``(logits,
    tanh(raw / softcap))`` (the tanh in the input dtype, None without soft-capping)."""
    # The matmul runs in the hidden states' dtype (the caller already applied any autocast dtype).
    dt = hidden.dtype
    logits = F.linear(hidden, weight.to(dt), None if bias is None else bias.to(dt))
    t = None
    if softcap is not None:  # in the input dtype, before the upcast (transformers' order)
        t = torch.tanh(logits / softcap)
        logits = t * softcap
    # fp32 softmax as in HF's loss; fp64 inputs stay fp64 (never downcast).
    logits = logits.to(torch.promote_types(dt, torch.float32))
    return (logits, t) if keep_tanh else logits


def _chunk_grad(logits, t, lse, labels, weights, dtype, softcap):
    """``d loss / d raw logits`` of one chunk, ``(softmax - onehot) * weights`` per token (the
    weights are 0 at ignored tokens), through the soft-capping when there is one (then in
    ``dtype``). ``logits`` is overwritten."""
    g = logits.sub_(lse[:, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), labels] -= 1.0
    g.mul_(weights[:, None])
    if t is not None:  # through the soft-capping, autograd's ops in the input dtype
        g = torch.ops.aten.tanh_backward(g.to(dtype) * softcap, t) / softcap
    return g


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """For the scalar reductions the gradients are computed in the forward, chunk by chunk, while
    the chunk's logits exist (the backward only scales them by the incoming gradient), so the
    logits are computed once per step instead of again in the backward. ``reduction="none"``
    (a per-token incoming gradient) keeps the per-token log-sum-exp and recomputes in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, reduction, softcap=None):
        n = hidden.shape[0]
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        acc = torch.promote_types(hidden.dtype, torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ahead = reduction != "none" and (need_h or need_w or need_b)
        n_valid = valid.sum()
        # the gradient for an incoming 1 (what a training loss gets), scaled before the cast to the
        # input dtype as autograd's mean would; the backward multiplies by the actual incoming gradient
        unit = valid.to(acc) / n_valid if reduction == "mean" else valid.to(acc)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        losses = torch.empty(n, dtype=acc, device=hidden.device)
        grads = _empty_grads(hidden, weight, bias, acc, need_h, need_w, need_b) if ahead else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits, t = _chunk_logits(hidden[start:end], weight, bias, softcap, keep_tanh=True)
            lse_c = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe_labels[start:end, None]).squeeze(1)
            lse[start:end] = lse_c
            losses[start:end] = lse_c - target
            if ahead:
                g = _chunk_grad(logits, t, lse_c, safe_labels[start:end], unit[start:end], hidden.dtype, softcap)
                _accumulate(grads, g, hidden[start:end], weight, start, end, acc)
            del logits, t
        losses = losses.masked_fill(~valid, 0.0)

        if ahead:
            ctx.grads = _finish_grads(grads, weight, bias)
        else:
            ctx.save_for_backward(hidden, safe_labels, valid, lse, n_valid)
        ctx.ahead = ahead
        # Keep the Parameter objects themselves (see module docstring: ZeRO-3 re-gathers them).
        ctx.weight = weight
        ctx.bias = bias
        ctx.chunk_size = chunk_size
        ctx.reduction = reduction
        ctx.softcap = softcap
        if reduction == "mean":
            # 0/0 -> nan when every label is ignored, like F.cross_entropy.
            return losses.sum() / n_valid
        if reduction == "sum":
            return losses.sum()
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.ahead:
            grads, ctx.grads = ctx.grads, None
            if grads is None:  # scaled in place and handed out by the first backward
                raise RuntimeError(
                    "chunked_cross_entropy: a second backward through the same loss (retain_graph=True) is not "
                    "supported: its gradients were computed in the forward and the first backward used them. "
                    "Compute the loss again, or use the model's own loss (HyCLoRAConfig(lm_loss='model')).")
            out = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
            return (*out, None, None, None, None, None)
        hidden, labels, valid, lse, n_valid = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if weight.numel() == 0:
            raise RuntimeError(
                "chunked_cross_entropy backward found an empty LM-head weight: under DeepSpeed ZeRO-3 "
                "the weight must be gathered (register it as an external parameter of the module "
                "that calls the loss; see hyclora.integrations.longseq.CausalLMChunkedLoss)."
            )
        acc = lse.dtype
        scale = grad_out.to(acc) * valid  # reduction "none": one incoming gradient per token
        grads = _empty_grads(hidden, weight, bias, acc, need_h, need_w, need_b)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            logits, t = _chunk_logits(hidden[start:end], weight, bias, ctx.softcap, keep_tanh=True)
            g = _chunk_grad(logits, t, lse[start:end], labels[start:end], scale[start:end], hidden.dtype,
                            ctx.softcap)
            _accumulate(grads, g, hidden[start:end], weight, start, end, acc)
            del logits, t, g
        return (*_finish_grads(grads, weight, bias), None, None, None, None, None)


def _empty_grads(hidden, weight, bias, acc, need_h, need_w, need_b):
    """(d hidden, d W in fp32, d b in fp32) buffers, None where no gradient is needed."""
    return [torch.empty_like(hidden) if need_h else None,
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None,
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None]


def _accumulate(grads, g, h, weight, start, end, acc):
    """Add one chunk's logits gradient ``g`` to the buffers (matmuls in the input dtype, as autograd)."""
    grad_h, grad_w, grad_b = grads
    if grad_b is not None:
        grad_b += g.to(acc).sum(0)
    g = g.to(h.dtype)
    if grad_h is not None:
        grad_h[start:end] = g @ weight.to(h.dtype)
    if grad_w is not None:
        grad_w += (g.t() @ h).to(acc)


def _finish_grads(grads, weight, bias):
    grad_h, grad_w, grad_b = grads
    return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``labels``, chunked over tokens.

    Args:
        hidden: ``(..., d)`` final hidden states (any leading shape; flattened).
        weight: ``(vocab, d)`` LM-head weight. bias: optional ``(vocab,)``.
        labels: ``(...)`` target ids matching hidden's leading shape; ``ignore_index`` is skipped.
            Labels are NOT shifted here: for causal LM pass ``labels[t] = input_ids[t + 1]``.
        chunk_size: tokens per chunk (default: about 64 MiB of fp32 logits per chunk, at least
            256 tokens).
        reduction: ``mean`` over non-ignored tokens (nan if none), ``sum``, or ``none``
            (per-token losses, 0 at ignored positions).
        softcap: final-logit soft-capping (Gemma's ``final_logit_softcapping``): the logits are
            ``softcap * tanh(logits / softcap)``, computed in the input dtype as transformers does.

    Returns the loss in fp32 (fp64 for fp64 inputs). Equal to
    ``F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), labels.flatten(), ...)``
    to rounding, in value and in gradients.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"chunked_cross_entropy: reduction={reduction!r}; expected one of {REDUCTIONS}.")
    if hidden.dim() < 1 or hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"chunked_cross_entropy: hidden {tuple(hidden.shape)} needs labels of shape "
            f"{tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}."
        )
    if weight.numel() == 0:
        raise ValueError(
            f"chunked_cross_entropy: the LM-head weight is empty {tuple(weight.shape)}: a DeepSpeed ZeRO-3 "
            "partitioned parameter that was not gathered. Register it as an external parameter of the "
            "module calling the loss (CausalLMChunkedLoss.register_zero3())."
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"chunked_cross_entropy: weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}."
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"chunked_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}.")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"chunked_cross_entropy: labels must be int64/int32, got {labels.dtype}.")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
            raise ValueError(f"chunked_cross_entropy: softcap={softcap!r}; expected None or a positive number.")
        softcap = float(softcap)
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size={chunk_size!r}; expected an integer >= 1.")
    lead = labels.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).long()
    bad = (flat_y != ignore_index) & ((flat_y < 0) | (flat_y >= weight.shape[0]))
    # checked on the device: reading the flag on the host would stall every training step
    torch._assert_async(torch.logical_not(bad.any()), f"chunked_cross_entropy: label ids must be in [0, "
                        f"{weight.shape[0]}) or ignore_index ({ignore_index})")
    device_type = flat_h.device.type
    if torch.is_autocast_enabled(device_type):
        # Resolve autocast once here: the Function runs without it, so forward and the recomputing
        # backward use the same dtype.
        flat_h = flat_h.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type=device_type, enabled=False):
        out = _ChunkedLinearCrossEntropy.apply(flat_h, weight, bias, flat_y, chunk_size, ignore_index, reduction,
                                               softcap)
    if reduction == "none":
        out = out.view(lead)
    return out


__all__ = ["chunked_cross_entropy", "auto_chunk_size"]
