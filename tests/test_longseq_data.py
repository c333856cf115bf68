"""Long-document loading, tokenisation cache and packing (hyclora.data.longdocs)."""

import json

import numpy as np
import pytest
import torch

from hyclora.data.longdocs import (
    IGNORE_INDEX,
    PackedRows,
    build_packed_dataset,
    document_position_ids,
    hub_texts,
    load_token_stream,
    local_files,
    pack_tokens,
    tokenize_documents,
    tokenize_file,
)
from helpers.longseq import long_docs_or_skip, test_tokenizer


class CountingTokenizer:
    """Wraps a tokenizer and counts encode calls (to prove the cache is used)."""

    def __init__(self, tok):
        self.tok = tok
        self.calls = 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.tok(*a, **k)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)


def test_pack_tokens_rows_and_tail():
    tokens = np.arange(23)
    rows, pad = pack_tokens(tokens, 5)
    assert rows.shape == (4, 5) and pad == 0 and rows[-1].tolist() == [15, 16, 17, 18, 19]
    rows, pad = pack_tokens(tokens, 5, drop_last=False, pad_id=-1)
    assert rows.shape == (5, 5) and pad == 2 and rows[-1].tolist() == [20, 21, 22, -1, -1]
    assert np.array_equal(rows.reshape(-1)[:23], tokens)
    with pytest.raises(ValueError, match="fewer than one row"):
        pack_tokens(np.arange(3), 5)
    with pytest.raises(ValueError, match="seq_len"):
        pack_tokens(tokens, 1)


def test_packed_rows_labels_mask_and_document_positions():
    eos = 2
    stream = np.array([5, 6, eos, 7, 8, 9, eos, 4, 4, eos, 3], dtype=np.uint16)
    rows, pad = pack_tokens(stream, 4, drop_last=False, pad_id=0)
    ds = PackedRows(rows, pad, eos_id=eos)
    assert len(ds) == 3
    first, last = ds[0], ds[2]
    assert first["input_ids"].tolist() == [5, 6, eos, 7] and first["labels"].tolist() == [5, 6, eos, 7]
    assert first["attention_mask"].tolist() == [1, 1, 1, 1]
    assert first["position_ids"].tolist() == [0, 1, 2, 0]  # a new document starts after EOS
    assert pad == 1 and last["input_ids"].tolist() == [4, eos, 3, 0]
    assert last["labels"].tolist() == [4, eos, 3, IGNORE_INDEX]
    assert last["attention_mask"].tolist() == [1, 1, 1, 0]
    assert last["position_ids"].tolist() == [0, 1, 0, 1]
    # documents [1, eos] [3, eos] [eos] [5]
    assert document_position_ids(torch.tensor([1, 2, 3, 2, 2, 5]), 2).tolist() == [0, 1, 0, 1, 0, 0]
    # Without padding or separate documents, only input_ids/labels (the S²-Attn fast path).
    plain = PackedRows(pack_tokens(stream, 4)[0])[0]
    assert set(plain) == {"input_ids", "labels"}
    assert plain["input_ids"].dtype == torch.int64


def test_documents_joined_with_bos_and_eos():
    tok = test_tokenizer()
    a, b = "Call me Ishmael.", "It was the best of times."
    stream = tokenize_documents([a, b], tok)
    ids_a = tok(a, add_special_tokens=False)["input_ids"]
    ids_b = tok(b, add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert stream.tolist() == [bos, *ids_a, eos, bos, *ids_b, eos]
    assert stream.dtype == np.uint16
    assert tokenize_documents([a], tok, add_bos=False, add_eos=False).tolist() == ids_a


def test_file_cache_is_used_and_invalidated(tmp_path):
    tok = CountingTokenizer(test_tokenizer())
    doc = tmp_path / "book.txt"
    doc.write_text("The cat sat on the mat. " * 50)
    cache = tmp_path / "cache"
    first = tokenize_file(doc, tok, cache_dir=cache)
    assert tok.calls == 2  # the fingerprint probe + the document
    assert len(list(cache.glob("book-*.npy"))) == 1
    second = tokenize_file(doc, tok, cache_dir=cache)
    assert tok.calls == 3  # the probe only: the document came from the cache
    assert np.array_equal(first, second) and isinstance(second, np.memmap)
    doc.write_text("A different book entirely. " * 50)  # new content -> new key, tokenised again
    third = tokenize_file(doc, tok, cache_dir=cache)
    assert tok.calls == 5
    assert not np.array_equal(first, third) and len(list(cache.glob("book-*.npy"))) == 2


def test_jsonl_bin_npy_and_folders(tmp_path):
    tok = test_tokenizer()
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in ["one doc", "another doc"]) + "\n\n")
    stream = tokenize_file(jl, tok, text_field="body")
    assert stream.tolist() == tokenize_documents(["one doc", "another doc"], tok).tolist()
    with pytest.raises(ValueError, match="no field 'text'"):
        tokenize_file(jl, tok)
    bin_path = tmp_path / "tokens.bin"
    np.arange(10, dtype=np.uint16).tofile(bin_path)
    assert tokenize_file(bin_path).tolist() == list(range(10))  # LongLoRA's pre-tokenised format
    np.save(tmp_path / "more.npy", np.arange(3, dtype=np.uint16))
    folder_stream = load_token_stream(tmp_path, tok, text_field="body")
    # sorted: docs.jsonl, more.npy, tokens.bin
    assert folder_stream.tolist() == stream.tolist() + [0, 1, 2] + list(range(10))
    with pytest.raises(FileNotFoundError):
        local_files(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no document files"):
        local_files(empty)


def test_hub_name_offline_raises_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="local text/JSONL"):
        next(hub_texts("togethercomputer/RedPajama-Data-1T-Sample"))
    with pytest.raises(RuntimeError, match="offline"):
        load_token_stream("no/such-local-path-or-hub-name", test_tokenizer())


def test_build_packed_dataset_on_real_books(tmp_path):
    docs = long_docs_or_skip()
    tok = test_tokenizer()
    books = sorted((docs / "pg19-books").glob("*.txt"), key=lambda p: p.stat().st_size)[:2]  # the small ones
    ds = build_packed_dataset([str(b) for b in books], tok, 256, cache_dir=tmp_path)
    stream = np.concatenate([tokenize_file(b, tok, cache_dir=tmp_path) for b in books])
    assert len(ds) == stream.size // 256
    assert torch.equal(ds[3]["input_ids"], torch.from_numpy(stream[768:1024].astype(np.int64)))
    # Every document ends with EOS and starts with BOS, so each book contributes exactly one of each.
    assert int((stream == tok.eos_token_id).sum()) == 2 and stream[0] == tok.bos_token_id
    # The metadata CSV / LICENSE next to the books are not documents.
    assert all(p.suffix in (".txt", ".lean") for p in local_files(docs))
