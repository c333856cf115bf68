"""Shared helpers of the long-sequence tests (data paths, a tokenizer, a tiny Llama config).

The tokenizer is the real TinyStories Llama SentencePiece tokenizer from ../shared/data when
sentencepiece/protobuf are installed, and otherwise a byte-level BPE learnt in about a second from
the long documents themselves, so the long-sequence tests do not skip for lack of sentencepiece.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LONG_DOCS = SHARED / "long-docs"
TINY_LLAMA = SHARED / "tinyllamas-stories260K" / "hf"
REPO = Path(__file__).resolve().parents[1]


def long_docs_or_skip() -> Path:
    if not (LONG_DOCS / "pg19-books").is_dir():
        pytest.skip("../shared/data/long-docs is absent")
    return LONG_DOCS


def _sentencepiece_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("sentencepiece", "google.protobuf"))


@functools.lru_cache(maxsize=1)
def test_tokenizer():
    """A tokenizer with BOS/EOS/PAD (see module docstring)."""
    from transformers import AutoTokenizer

    if TINY_LLAMA.is_dir() and _sentencepiece_available():
        tok = AutoTokenizer.from_pretrained(str(TINY_LLAMA))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    from hyclora.data.tokenizer import build_bpe_tokenizer

    docs = long_docs_or_skip()
    texts = [p.read_text(encoding="utf-8")[:60_000] for p in sorted((docs / "pg19-books").glob("*.txt"))]
    return build_bpe_tokenizer(texts, vocab_size=512)


test_tokenizer.__test__ = False  # a helper, not a test


def save_test_tokenizer(folder: Path) -> Path:
    test_tokenizer().save_pretrained(str(folder))
    return folder


def tiny_llama_config_file(folder: Path, vocab_size: int, max_position_embeddings: int = 64) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads / 2 KV heads) config.json for random-weight runs."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_helpers_give_a_usable_tokenizer():
    long_docs_or_skip()
    tok = test_tokenizer()
    assert tok.eos_token_id is not None and tok.bos_token_id is not None
    ids = tok("Call me Ishmael.", add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) < 20 and tok.decode(ids).strip() == "Call me Ishmael."
