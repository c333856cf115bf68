"""Sliding-window perplexity over long token streams (PG19 books, proof-pile-like text).

Two window schemes, both over one concatenated token stream:

* ``mode="longlora"`` (default; LongLoRA's ``eval.py`` and the HyC-LoRA long-sequence table):
  windows of ``context_length`` input tokens starting every ``stride`` tokens,
  ``x = t[i : i + L]``, ``y = t[i + 1 : i + L + 1]``; the loss of a window is the mean NLL over
  all its ``L`` targets, and ``ppl = exp(mean over windows)``. Overlapping windows score a token
  several times, and tokens early in a window see little context. We keep every window
  ``i <= N - L - 1`` (LongLoRA's script also drops the last one, which changes nothing material).
* ``mode="strided"`` (the transformers documentation's scheme): windows of at most ``L`` tokens
  every ``stride`` tokens, but each target token is scored exactly once, in the first window that
  contains it after the previous window's end, so it sees at least ``L - stride`` tokens of
  context; ``ppl = exp(sum NLL / number of targets)``.

Models run in eval mode (S²-Attn falls back to full attention there) and the loss goes through the
chunked LM-head cross-entropy, so ``L x vocab`` logits are never materialised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

MODES = ("longlora", "strided")


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float          # mean NLL: over windows (longlora) or over tokens (strided)
    n_windows: int
    n_tokens: int       # target tokens scored (counting repeats in longlora mode)
    context_length: int
    stride: int
    mode: str

    def to_dict(self) -> dict:
        return asdict(self)


def window_plan(n_tokens: int, context_length: int, stride: int, mode: str = "longlora") -> List[Tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: inputs ``t[begin:end]`` predict ``t[begin+1:end+1]``,
    and targets at stream positions ``>= first_scored`` (and ``<= end``) are scored."""
    if mode not in MODES:
        raise ValueError(f"perplexity mode={mode!r}; expected one of {MODES}.")
    if context_length < 1 or stride < 1:
        raise ValueError(f"context_length ({context_length}) and stride ({stride}) must be >= 1.")
    if mode == "longlora":
        if n_tokens < context_length + 1:
            raise ValueError(
                f"{n_tokens} tokens are fewer than one window of context_length={context_length} + 1."
            )
        return [(i, i + context_length, i + 1) for i in range(0, n_tokens - context_length, stride)]
    if stride > context_length:
        raise ValueError(
            f"strided perplexity needs stride ({stride}) <= context_length ({context_length}), "
            "otherwise tokens between windows are never scored."
        )
    if n_tokens < 2:
        raise ValueError("need at least 2 tokens to score one")
    plan, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + context_length, n_tokens - 1)
        plan.append((begin, end, prev_end + 1))
        if end == n_tokens - 1:
            return plan
        prev_end = end
        begin += stride


@torch.no_grad()
def sliding_window_perplexity(
    model: nn.Module,
    tokens: Union[np.ndarray, torch.Tensor, Sequence[int]],
    *,
    context_length: int,
    stride: int = 256,
    mode: str = "longlora",
    batch_size: int = 1,
    max_windows: Optional[int] = None,
    chunk_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens``.

    ``model``: a transformers causal LM (PEFT-wrapped or not), or the
    :class:`~hyclora.integrations.longseq.CausalLMChunkedLoss` used in training (under DeepSpeed
    ZeRO-3 pass that one: its LM-head gather is already registered; its own chunk size is used).
    """
    from hyclora.integrations.longseq import CausalLMChunkedLoss

    if isinstance(model, CausalLMChunkedLoss):  # keeps its own chunk_size
        loss_fn, model = model, model.model
    else:
        loss_fn = CausalLMChunkedLoss(model, chunk_size=chunk_size)

    stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    plan = window_plan(stream.numel(), context_length, stride, mode)
    if max_windows is not None:
        plan = plan[:max_windows]
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    window_nll: List[float] = []
    total_nll, total_count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc=f"ppl {mode} L={context_length} stride={stride}")
    try:
        i = 0
        while i < len(plan):
            # Batch consecutive windows of equal length (only the last strided window is shorter).
            length = plan[i][1] - plan[i][0]
            batch = [plan[i]]
            while len(batch) < batch_size and i + len(batch) < len(plan) and plan[i + len(batch)][1] - plan[i + len(batch)][0] == length:
                batch.append(plan[i + len(batch)])
            x = torch.stack([stream[b:e] for b, e, _ in batch]).to(device)
            y = torch.stack([stream[b + 1:e + 1] for b, e, _ in batch]).clone()
            for row, (b, e, first) in enumerate(batch):
                skip = first - (b + 1)  # targets before `first` were scored by an earlier window
                if skip > 0:
                    y[row, :skip] = -100
            y = y.to(device)
            nll = loss_fn(x, labels=y, shift_labels=False, reduction="none").double()
            scored = (y != -100)
            for row in range(len(batch)):
                s, c = nll[row][scored[row]].sum().item(), int(scored[row].sum())
                window_nll.append(s / c)
                total_nll += s
                total_count += c
            i += len(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    mean = float(np.mean(window_nll)) if mode == "longlora" else total_nll / total_count
    return PerplexityResult(
        perplexity=math.exp(mean), nll=mean, n_windows=len(window_nll), n_tokens=total_count,
        context_length=context_length, stride=stride, mode=mode,
    )


def file_perplexity(
    model: nn.Module,
    tokenizer,
    paths,
    *,
    cache_dir=None,
    context_length: int,
    stride: int = 256,
    mode: str = "longlora",
    add_bos: Optional[bool] = None,
    **kwargs,
) -> PerplexityResult:
    """Tokenise (cached) and concatenate ``paths`` (text/JSONL/.bin/.npy), then
    :func:`sliding_window_perplexity`."""
    from hyclora.data.longdocs import load_token_stream

    tokens = load_token_stream(paths, tokenizer, cache_dir=cache_dir, add_bos=add_bos)
    return sliding_window_perplexity(model, tokens, context_length=context_length, stride=stride, mode=mode, **kwargs)


__all__ = ["MODES", "PerplexityResult", "file_perplexity", "sliding_window_perplexity", "window_plan"]
