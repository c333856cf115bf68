"""Long documents for long-context fine-tuning and evaluation (LongLoRA-style data).

Sources (``sources`` is one string or a list; each entry is resolved in this order):

1. an existing local path:
   * a folder: every file inside (recursively, sorted) whose suffix is in ``suffixes``;
   * a text file (``.txt``, ``.md``, ``.lean``, ...): one document;
   * a ``.jsonl`` file: one document per line, text in ``text_field``;
   * ``.bin`` (LongLoRA's pre-tokenised uint16 memmap) or ``.npy``: token ids, used as they are;
2. otherwise a hub dataset name, streamed with ``datasets.load_dataset(name, split=..., streaming=True)``
   (online only; e.g. ``togethercomputer/RedPajama-Data-1T-Sample``).

Tokenisation: each document becomes ``[bos] + tokens + [eos]`` (BOS only if the tokenizer has one
and ``add_bos``; LongLoRA joins documents with EOS). A local file is tokenised in one call (so
SentencePiece sees the text exactly once, with no artificial chunk boundaries) and the result is
cached as ``.npy`` in ``cache_dir``, keyed by the file's content hash, the tokenizer fingerprint and
the options: a second run, or the evaluation of the same file, does not tokenise again.

Packing (:func:`pack_tokens`): the stream is cut into rows of ``seq_len`` tokens; the tail is
dropped (default, LongLoRA reshapes to a multiple of the context) or padded with ``labels=-100``
and ``attention_mask=0``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".tex", ".lean", ".jsonl")
TOKEN_SUFFIXES = (".bin", ".npy")
_CACHE_VERSION = "longdocs-v1"
IGNORE_INDEX = -100

PathLike = Union[str, os.PathLike]


# -- documents ---------------------------------------------------------------------------------------
def local_files(path: PathLike, suffixes: Sequence[str] = TEXT_SUFFIXES + TOKEN_SUFFIXES) -> List[Path]:
    """The files a local source stands for (a folder: matching files, sorted; a file: itself)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise ValueError(
                f"{path}: no document files found (looked for suffixes {', '.join(suffixes)})."
            )
        return files
    raise FileNotFoundError(f"{path} does not exist")


def read_jsonl_texts(path: PathLike, text_field: str = "text") -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{lineno}: no field {text_field!r} (found {keys}); pass --text_field."
                )
            yield str(record[text_field])


def hub_texts(name: str, split: str = "train", text_field: str = "text", max_documents: Optional[int] = None) -> Iterator[str]:
    """Stream documents from a hub dataset (online only)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise RuntimeError(
            f"{name!r} is not a local path and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): "
            "pass local text/JSONL files or a folder instead."
        )
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:
        raise RuntimeError(
            f"could not load hub dataset {name!r} (split {split!r}): {err}. Pass local text/JSONL "
            "files or a folder if this machine is offline or the name is wrong."
        ) from err
    for i, record in enumerate(stream):
        if max_documents is not None and i >= max_documents:
            break
        if text_field not in record:
            raise ValueError(f"hub dataset {name!r} has no field {text_field!r} (found {sorted(record)}).")
        yield str(record[text_field])


# -- tokenisation and cache ---------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """Stable id of a tokenizer: class, name, vocabulary size, special ids and a probe encoding."""
    probe = "Hello world, 1234 ∑ λx. café\n\n  tabs\tand spaces"
    parts = [
        type(tokenizer).__name__,
        str(getattr(tokenizer, "name_or_path", "")),
        str(len(tokenizer)),
        str(getattr(tokenizer, "bos_token_id", None)),
        str(getattr(tokenizer, "eos_token_id", None)),
        json.dumps(tokenizer(probe, add_special_tokens=False)["input_ids"]),
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _specials(tokenizer, add_bos: Optional[bool], add_eos: bool) -> Tuple[List[int], List[int]]:
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_bos is None:
        add_bos = bos is not None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id.")
    if add_eos and eos is None:
        raise ValueError(
            "the tokenizer has no eos_token_id, which separates packed documents; set one "
            "(tokenizer.eos_token = ...) or pass add_eos=False."
        )
    return ([bos] if add_bos else []), ([eos] if add_eos else [])


def tokenize_documents(texts: Iterable[str], tokenizer, *, add_bos: Optional[bool] = None, add_eos: bool = True) -> np.ndarray:
    """Concatenate ``[bos] + tokens + [eos]`` of every text into one array."""
    head, tail = _specials(tokenizer, add_bos, add_eos)
    dtype = _token_dtype(tokenizer)
    pieces = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        pieces.append(np.asarray(head + list(ids) + tail, dtype=np.int64))
    if not pieces:
        return np.zeros(0, dtype=dtype)
    out = np.concatenate(pieces)
    if out.size and out.max() > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(out.max())} does not fit {dtype}; tokenizer length is {len(tokenizer)}.")
    return out.astype(dtype)


def tokenize_file(
    path: PathLike,
    tokenizer=None,
    *,
    cache_dir: Optional[PathLike] = None,
    text_field: str = "text",
    add_bos: Optional[bool] = None,
    add_eos: bool = True,
) -> np.ndarray:
    """Token ids of one local file (text: one document; JSONL: one per line; .bin/.npy: as stored).

    With ``cache_dir`` the ids are cached as ``<stem>-<key>.npy`` and memory-mapped on later calls.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".bin":  # LongLoRA / nanoGPT memmap of uint16 ids
        return np.memmap(path, dtype=np.uint16, mode="r")
    if suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if tokenizer is None:
        raise ValueError(f"{path}: a tokenizer is needed to tokenise text files.")
    cache_file = None
    if cache_dir is not None:
        key_text = "|".join([
            _CACHE_VERSION, _file_digest(path), tokenizer_fingerprint(tokenizer),
            suffix, text_field if suffix == ".jsonl" else "", str(add_bos), str(add_eos),
        ])
        key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
        cache_file = Path(cache_dir) / f"{path.stem}-{key}.npy"
        if cache_file.is_file():
            return np.load(cache_file, mmap_mode="r")
    if suffix == ".jsonl":
        texts: Iterable[str] = read_jsonl_texts(path, text_field)
    else:
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    tokens = tokenize_documents(texts, tokenizer, add_bos=add_bos, add_eos=add_eos)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, tokens)
        os.replace(tmp, cache_file)  # atomic: concurrent readers never see half a file
    return tokens


def load_token_stream(
    sources: Union[PathLike, Sequence[PathLike]],
    tokenizer=None,
    *,
    cache_dir: Optional[PathLike] = None,
    text_field: str = "text",
    split: str = "train",
    max_documents: Optional[int] = None,
    add_bos: Optional[bool] = None,
    add_eos: bool = True,
    suffixes: Sequence[str] = TEXT_SUFFIXES + TOKEN_SUFFIXES,
) -> np.ndarray:
    """All documents of ``sources`` tokenised and concatenated (see the module docstring)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given")
    parts = []
    for source in sources:
        if Path(source).exists():
            files = local_files(source, suffixes)
            if max_documents is not None:
                files = files[:max_documents]
            for f in files:
                parts.append(np.asarray(tokenize_file(
                    f, tokenizer, cache_dir=cache_dir, text_field=text_field, add_bos=add_bos, add_eos=add_eos
                )))
        else:
            if tokenizer is None:
                raise ValueError(f"{source!r}: a tokenizer is needed for hub datasets.")
            texts = hub_texts(str(source), split=split, text_field=text_field, max_documents=max_documents)
            parts.append(tokenize_documents(texts, tokenizer, add_bos=add_bos, add_eos=add_eos))
    dtype = np.result_type(*[p.dtype for p in parts])
    return np.concatenate([p.astype(dtype, copy=False) for p in parts])


# -- packing -------------------------------------------------------------------------------------------
def pack_tokens(tokens: np.ndarray, seq_len: int, *, drop_last: bool = True, pad_id: int = 0) -> Tuple[np.ndarray, int]:
    """Cut a token stream into ``(rows, seq_len)``; returns ``(rows, n_pad)`` (padding of the last row)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: expected an integer >= 2.")
    tokens = np.asarray(tokens)
    n_full = tokens.size // seq_len
    rest = tokens.size - n_full * seq_len
    if drop_last or rest == 0:
        if n_full == 0:
            raise ValueError(
                f"only {tokens.size} tokens, fewer than one row of seq_len={seq_len}: add data, lower "
                "--seq_len, or keep the partial row (drop_last=False)."
            )
        return tokens[: n_full * seq_len].reshape(n_full, seq_len), 0
    pad = seq_len - rest
    padded = np.concatenate([tokens, np.full(pad, pad_id, dtype=tokens.dtype)])
    return padded.reshape(n_full + 1, seq_len), pad


def document_position_ids(row: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids restarting after every EOS, so transformers masks attention per document."""
    starts = torch.zeros_like(row, dtype=torch.bool)
    starts[0] = True
    starts[1:] = row[:-1] == eos_id
    idx = torch.arange(row.numel())
    last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    return idx - last_start


class PackedRows(torch.utils.data.Dataset):
    """Fixed-length rows for causal-LM training: ``input_ids``, ``labels`` (+ ``attention_mask`` if
    the last row is padded, + ``position_ids`` restarting per document if ``eos_id`` is given)."""

    def __init__(self, rows: np.ndarray, n_pad: int = 0, eos_id: Optional[int] = None) -> None:
        self.rows = rows
        self.n_pad = n_pad
        self.eos_id = eos_id

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.rows[i], dtype=np.int64))
        item = {"input_ids": ids, "labels": ids.clone()}
        if self.n_pad:
            mask = torch.ones_like(ids)
            if i == len(self) - 1:
                mask[-self.n_pad:] = 0
                item["labels"][-self.n_pad:] = IGNORE_INDEX
            item["attention_mask"] = mask
        if self.eos_id is not None:
            item["position_ids"] = document_position_ids(ids, self.eos_id)
        return item


def build_packed_dataset(
    sources: Union[PathLike, Sequence[PathLike]],
    tokenizer,
    seq_len: int,
    *,
    cache_dir: Optional[PathLike] = None,
    text_field: str = "text",
    split: str = "train",
    max_documents: Optional[int] = None,
    drop_last: bool = True,
    separate_documents: bool = False,
    add_bos: Optional[bool] = None,
) -> PackedRows:
    """Documents joined with EOS and packed into rows of ``seq_len`` tokens.

    ``separate_documents`` adds position ids restarting at each document, so attention does not
    cross documents (LongLoRA's recipe lets it; both are supported).
    """
    tokens = load_token_stream(
        sources, tokenizer, cache_dir=cache_dir, text_field=text_field, split=split,
        max_documents=max_documents, add_bos=add_bos,
    )
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else tokenizer.eos_token_id
    rows, n_pad = pack_tokens(tokens, seq_len, drop_last=drop_last, pad_id=pad_id or 0)
    return PackedRows(rows, n_pad, eos_id=tokenizer.eos_token_id if separate_documents else None)


__all__ = [
    "IGNORE_INDEX",
    "PackedRows",
    "TEXT_SUFFIXES",
    "build_packed_dataset",
    "document_position_ids",
    "hub_texts",
    "load_token_stream",
    "local_files",
    "pack_tokens",
    "read_jsonl_texts",
    "tokenize_documents",
    "tokenize_file",
    "tokenizer_fingerprint",
]
