"""Tokenisation into training examples, and the padding collator.

Supervised examples are ``prompt + target + EOS`` with the prompt's labels set to -100, so the
loss counts only the answer. The prompt and the target are tokenised separately and the ids
concatenated: the prompt's ids are then exactly what generation will be fed at evaluation time
(tokenising the joined string can merge tokens across the boundary and shift it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _require_eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) so the model "
            "learns where an answer ends"
        )
    return int(tokenizer.eos_token_id)


def tokenize_supervised(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_length: int,
    *,
    mask_prompt: bool = True,
) -> "datasets.Dataset":  # noqa: F821
    """A ``datasets.Dataset`` with ``input_ids`` and ``labels`` (prompt masked with -100).

    Examples longer than ``max_length`` lose the end of their target (as in the reference);
    examples whose prompt alone fills ``max_length`` are dropped, since they would carry no
    supervised token (a batch of only such examples has an undefined mean loss).
    """
    import datasets

    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: expected at least 2 tokens")
    eos = _require_eos(tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    input_ids: List[List[int]] = []
    labels: List[List[int]] = []
    dropped = truncated = 0
    for p, t in zip(prompt_ids, target_ids):
        t = list(t) + [eos]
        if len(p) >= max_length:
            dropped += 1
            continue
        if len(p) + len(t) > max_length:
            truncated += 1
            t = t[: max_length - len(p)]
        input_ids.append(list(p) + t)
        labels.append(([IGNORE_INDEX] * len(p) if mask_prompt else list(p)) + t)
    if dropped or truncated:
        logger.warning(
            "tokenize_supervised: %d of %d examples truncated to max_length=%d, %d dropped "
            "(prompt alone too long)", truncated, len(prompt_ids), max_length, dropped,
        )
    if not input_ids:
        raise ValueError(
            f"no example fits in max_length={max_length}; raise --max_length"
        )
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def tokenize_blocks(
    tokenizer, texts: Iterable[str], block_size: int, *, chunk_chars: int = 1 << 20
) -> "datasets.Dataset":  # noqa: F821
    """Concatenate ``texts`` (joined with newlines) and cut the token stream into
    ``block_size``-token blocks, as HF ``run_clm`` does; the incomplete last block is dropped.

    The text is tokenised in pieces of about ``chunk_chars`` characters cut at line breaks,
    without special tokens: one BOS per line (what ``run_clm`` gets from a Llama tokenizer)
    would put thousands of spurious BOS tokens in the middle of the text.
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size={block_size}: expected at least 2 tokens")
    ids: List[int] = []
    piece: List[str] = []
    size = 0

    def flush() -> None:
        nonlocal piece, size
        if piece:
            ids.extend(tokenizer("\n".join(piece) + "\n", add_special_tokens=False)["input_ids"])
        piece, size = [], 0

    for line in texts:
        piece.append(line.rstrip("\n"))
        size += len(line) + 1
        if size >= chunk_chars:
            flush()
    flush()
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than one block of {block_size}; "
            "use more text or a smaller --max_length"
        )
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})


@dataclass
class CausalLMCollator:
    """Pads ``input_ids`` with ``pad_token_id`` and ``labels`` with -100, builds the attention
    mask, optionally rounds the length up to ``pad_to_multiple_of`` (fused kernels want
    multiples of 32; tensor cores like multiples of 8)."""

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={self.padding_side!r}: expected 'right' or 'left'")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of}: expected >= 1")

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CausalLMCollator got an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        if m:
            longest = -(-longest // m) * m
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, longest), dtype=torch.long)
        for row, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            lab = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            if lab.shape != ids.shape:
                raise ValueError(
                    f"example {row}: {ids.numel()} input_ids but {lab.numel()} labels"
                )
            n = ids.numel()
            span = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            input_ids[row, span] = ids
            labels[row, span] = lab
            attention[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


__all__ = ["IGNORE_INDEX", "tokenize_supervised", "tokenize_blocks", "CausalLMCollator"]
