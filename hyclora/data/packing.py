"""Packed, padding-free SFT batches: documents concatenated into rows of a fixed token budget.

:func:`pack_examples` assigns the tokenised examples to rows of ``tokens_per_row`` tokens with TRL's
best-fit-decreasing packer (``trl.pack_dataset(strategy="bfd")``: documents are never cut, each row
records its documents' lengths in ``seq_lengths``). :class:`PackedBatchCollator` turns rows into a
batch of one fixed shape, ``(rows, tokens_per_row)``:

* ``position_ids`` restart at 0 in every document (RoPE positions as if each were alone);
* ``labels``: -100 on each document's first token, so the shifted loss never predicts a document
  from the one before it, and on the padding at the end of a row;
* ``cu_seq_lens_q`` / ``cu_seq_lens_k``: the document starts over the flattened tokens in a buffer of
  fixed capacity (``rows * (max_documents + 1) + 1``, the unused entries repeat the total: empty
  documents), so every micro-batch has one shape and CUDA graphs replay it; the padding at the end
  of a row is a document of its own. ``max_length_q`` / ``max_length_k`` are ``tokens_per_row`` (a
  static bound);
* no ``attention_mask``: hyclora's layers attend inside the documents (``hyclora.ops.attention``:
  varlen flash attention on CUDA, the exact block-diagonal mask elsewhere), as transformers'
  flash-attention path does with these keys.

Why not ``transformers.DataCollatorWithFlattening`` or TRL's padding-free collator: both flatten a
batch into one row whose length (and number of documents) changes with every batch; a graph replays
one shape only. They do work with hyclora as they are (the layers read their ``cu_seq_lens_q``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .sft import IGNORE_INDEX

logger = logging.getLogger(__name__)

PACKED_COLUMNS = ("input_ids", "labels")
# what a packed batch hands the model besides input_ids/labels/position_ids (the layers' documents)
PACKED_BATCH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def pack_examples(dataset, tokens_per_row: int):
    """Rows of at most ``tokens_per_row`` tokens holding whole examples (``input_ids``, ``labels``
    and ``seq_lengths``), packed by TRL's best-fit decreasing. An example longer than a row is
    refused (the packer would cut it)."""
    try:
        from trl import pack_dataset
    except ImportError as exc:
        raise ImportError("hyclora: --packing uses TRL's pack_dataset; install it: pip install 'hyclora[trl]' "
                          "(or trl>=1.16)") from exc
    _check_budget(tokens_per_row)
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"hyclora: pack_examples needs an input_ids column, got {dataset.column_names}")
    columns = [c for c in PACKED_COLUMNS if c in dataset.column_names]
    dataset = dataset.select_columns(columns)
    longest = max((len(ids) for ids in dataset["input_ids"]), default=0)
    if longest > tokens_per_row:
        raise ValueError(f"hyclora: an example has {longest} tokens, more than --tokens_per_batch {tokens_per_row}; "
                         "raise --tokens_per_batch to at least --max_length")
    packed = pack_dataset(dataset, tokens_per_row, strategy="bfd")
    logger.info("packed %d examples into %d rows of %d tokens", len(dataset), len(packed), tokens_per_row)
    return packed


def max_documents(packed) -> int:
    """The most documents any row of a :func:`pack_examples` dataset holds (the collator's capacity)."""
    return max((len(n) for n in packed["seq_lengths"]), default=1)


def _check_budget(tokens_per_row) -> None:
    if isinstance(tokens_per_row, bool) or not isinstance(tokens_per_row, int) or tokens_per_row < 2:
        raise ValueError(f"hyclora: tokens_per_batch={tokens_per_row!r}: expected an integer >= 2 (tokens per packed row)")


@dataclass
class PackedBatchCollator:
    """Packed rows -> a ``(rows, tokens_per_row)`` batch (see the module docstring).

    Features: rows of :func:`pack_examples` (``input_ids``, optional ``labels``, ``seq_lengths``), or
    single examples (one document each). ``max_documents``: documents per row at most (the capacity
    of ``cu_seq_lens``; :func:`max_documents` of the packed dataset). ``rows``: pad every batch to
    this many rows with empty (all-padding) rows, so the last, shorter batch keeps the shape too
    (None: as many rows as features). ``padded``: the collator of batches of unpacked examples (no
    ``seq_lengths``: evaluation sets), None to pack them one document per row as well."""

    tokens_per_row: int
    pad_token_id: int
    max_documents: int = 1
    rows: Optional[int] = None
    padded: Optional[Callable] = None

    def __post_init__(self) -> None:
        _check_budget(self.tokens_per_row)
        if isinstance(self.max_documents, bool) or not isinstance(self.max_documents, int) or self.max_documents < 1:
            raise ValueError(f"hyclora: PackedBatchCollator max_documents={self.max_documents!r}: expected an int >= 1")
        if self.rows is not None and (isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1):
            raise ValueError(f"hyclora: PackedBatchCollator rows={self.rows!r}: expected an int >= 1 or None")

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not features:
            raise ValueError("PackedBatchCollator got an empty batch")
        if self.padded is not None and "seq_lengths" not in features[0]:
            return self.padded(features)
        n_rows = len(features) if self.rows is None else self.rows
        if len(features) > n_rows:
            raise ValueError(f"PackedBatchCollator: {len(features)} rows in a batch of rows={self.rows}")
        width = self.tokens_per_row
        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        starts: List[int] = []
        for row in range(n_rows):
            lengths = self._lengths(features[row], row) if row < len(features) else []
            used = sum(lengths)
            if row < len(features):
                f = features[row]
                ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
                lab = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
                if lab.shape != ids.shape or ids.numel() != used:
                    raise ValueError(f"PackedBatchCollator: row {row} has {ids.numel()} input_ids, {lab.numel()} labels "
                                     f"and seq_lengths summing to {used}")
                input_ids[row, :used] = ids
                labels[row, :used] = lab
            offset = 0
            for n in lengths + ([width - used] if used < width else []):  # the padding: a document of its own
                position_ids[row, offset:offset + n] = torch.arange(n)
                starts.append(row * width + offset)
                offset += n
        labels[position_ids == 0] = IGNORE_INDEX  # no document is predicted from the one before it
        capacity = n_rows * (self.max_documents + 1) + 1
        cu = torch.full((capacity,), n_rows * width, dtype=torch.int32)
        cu[:len(starts)] = torch.tensor(starts, dtype=torch.int32)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}

    def _lengths(self, feature: Dict[str, Any], row: int) -> List[int]:
        lengths = [int(n) for n in feature.get("seq_lengths", [len(feature["input_ids"])])]
        if any(n < 1 for n in lengths) or sum(lengths) > self.tokens_per_row:
            raise ValueError(f"PackedBatchCollator: row {row} has documents of {lengths} tokens; expected positive "
                             f"lengths summing to at most tokens_per_row={self.tokens_per_row}")
        if len(lengths) > self.max_documents:
            raise ValueError(f"PackedBatchCollator: row {row} holds {len(lengths)} documents, more than "
                             f"max_documents={self.max_documents}; pass max_documents=hyclora.data.packing."
                             "max_documents(packed_dataset)")
        return lengths


__all__ = ["PACKED_BATCH_KEYS", "PACKED_COLUMNS", "PackedBatchCollator", "max_documents", "pack_examples"]
