"""Batched greedy generation with left padding, and perplexity over token blocks."""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _padding_side(tokenizer, side: str):
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = old


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def _model_device(model) -> torch.device:
    return next(p.device for p in model.parameters())


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
    desc: str = "generate",
) -> List[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens removed), in input order.

    Prompts are tokenised exactly as in training (``tokenizer(prompt)`` with its special
    tokens), left-padded (so every row's continuation starts at the same column) and batched by
    length, longest first, so padding is small and an out-of-memory shows up in the first batch.
    Generation stops at EOS; ``stop_strings`` additionally truncate the decoded text.
    """
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size}, max_new_tokens={max_new_tokens}: expected >= 1")
    prompts = list(prompts)
    if not prompts:
        return []
    pad_id = _pad_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: List[Optional[str]] = [None] * len(prompts)
    device = _model_device(model)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with _eval_mode(model), _padding_side(tokenizer, "left"):
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            generated = model.generate(**enc, generation_config=config)
            new_tokens = generated[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = truncate_at_stops(text, stop_strings)
    return outputs  # type: ignore[return-value]


@torch.no_grad()
def perplexity(
    model, dataset, *, batch_size: int = 4, pad_token_id: int = 0, progress: bool = True,
    desc: str = "perplexity",
) -> Dict[str, float]:
    """Token-weighted mean negative log-likelihood and its exponential over ``dataset`` (rows
    with ``input_ids`` and optional ``labels``; -100 labels are not scored).

    Token-weighted: every scored token counts once, whatever batch it lands in (the mean of
    per-batch means that ``Trainer.evaluate`` reports differs when batches have unequal
    numbers of scored tokens).
    """
    from hyclora.data.sft import CausalLMCollator

    collate = CausalLMCollator(pad_token_id=pad_token_id)
    device = _model_device(model)
    total_nll = 0.0
    total_tokens = 0
    rows = list(range(len(dataset)))
    with _eval_mode(model):
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = collate([dataset[i] for i in rows[start : start + batch_size]])
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            labels = batch["labels"].to(device)
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1)
            total_nll += torch.nn.functional.cross_entropy(
                shift_logits, shift_labels, ignore_index=-100, reduction="sum"
            ).item()
            total_tokens += int((shift_labels != -100).sum())
    if total_tokens == 0:
        raise ValueError("perplexity: the dataset has no scored token")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}


__all__ = ["generate_greedy", "perplexity", "truncate_at_stops"]
