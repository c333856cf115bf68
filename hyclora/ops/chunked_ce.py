"""LM-head cross-entropy computed in chunks of tokens, so the full logits never exist at once.

At long context the logits dominate memory: 32k tokens x 32k vocabulary in fp32 is 4 GiB, and
autograd keeps them (plus their softmax) for the backward. :func:`chunked_cross_entropy` takes the
final hidden states and the LM-head weight instead of logits. The forward computes, chunk by
chunk, ``logits = hidden @ W.T (+ b)``, upcasts to fp32 (as HF's loss does), and keeps only the
per-token log-sum-exp (4 bytes per token). The backward recomputes each chunk's logits, forms
``softmax - onehot`` scaled by the incoming gradient, and accumulates ``d hidden`` and (only when
the weight is trainable) ``d W`` / ``d b`` in fp32. Peak extra memory is one chunk of logits.

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

# Auto chunk: about 2**26 logits (256 MiB in fp32) per chunk.
_AUTO_CHUNK_ELEMENTS = 1 << 26
REDUCTIONS = ("mean", "sum", "none")


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so one chunk of fp32 logits is about 256 MiB."""
    return max(1, _AUTO_CHUNK_ELEMENTS // max(1, int(vocab_size)))


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


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, reduction, softcap=None):
        n = hidden.shape[0]
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        losses = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:end], weight, bias, softcap)
            lse_c = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe_labels[start:end, None]).squeeze(1)
            lse[start:end] = lse_c
            losses[start:end] = lse_c - target
            del logits
        losses = losses.masked_fill(~valid, 0.0)
        n_valid = valid.sum()

        ctx.save_for_backward(hidden, safe_labels, valid, lse, n_valid)
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
        hidden, labels, valid, lse, n_valid = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if weight.numel() == 0:
            raise RuntimeError(
                "chunked_cross_entropy backward found an empty LM-head weight: under DeepSpeed ZeRO-3 "
                "the weight must be gathered (register it as an external parameter of the module "
                "that calls the loss; see hyclora.integrations.longseq.CausalLMChunkedLoss)."
            )
        n = hidden.shape[0]
        acc = lse.dtype
        grad_out = grad_out.to(acc)
        if ctx.reduction == "mean":
            scale = (grad_out / n_valid).expand(n)
        elif ctx.reduction == "sum":
            scale = grad_out.expand(n)
        else:
            scale = grad_out
        scale = scale * valid

        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            h = hidden[start:end]
            logits, t = _chunk_logits(h, weight, bias, ctx.softcap, keep_tanh=True)
            # softmax - onehot, scaled per token; in place to keep one chunk-sized buffer.
            g = logits.sub_(lse[start:end, None]).exp_()
            g[torch.arange(end - start, device=g.device), labels[start:end]] -= 1.0
            g.mul_(scale[start:end, None])
            if t is not None:  # through the soft-capping, autograd's ops in the input dtype
                g = torch.ops.aten.tanh_backward(g.to(hidden.dtype) * ctx.softcap, t) / ctx.softcap
                del t
                if need_b:
                    grad_bias += g.to(acc).sum(0)
            elif need_b:
                grad_bias += g.sum(0)
            g = g.to(hidden.dtype)
            if need_h:
                grad_hidden[start:end] = g @ weight.to(hidden.dtype)
            if need_w:
                grad_weight += (g.t() @ h).to(acc)
            del logits, g
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        if need_b:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


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
        chunk_size: tokens per chunk (default: about 256 MiB of fp32 logits per chunk).
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
    if bool(bad.any()):
        raise ValueError(
            f"chunked_cross_entropy: label ids must be in [0, {weight.shape[0]}) or ignore_index "
            f"({ignore_index}); found {flat_y[bad][:5].tolist()}."
        )
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
