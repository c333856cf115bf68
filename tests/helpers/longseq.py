"""Shared pieces of the long-sequence tests: data paths, a tokenizer, a tiny Llama config, and runs
of launch/longseq.py in a subprocess.

The tokenizer is the real TinyStories Llama SentencePiece tokenizer from ../shared/data when
sentencepiece/protobuf are installed, and otherwise a byte-level BPE learnt in about a second from
the long documents themselves, so the long-sequence tests do not skip for lack of sentencepiece.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers.repo import REPO, SHARED_DATA, TINYLLAMA, pythonpath

LONG_DOCS = SHARED_DATA / "long-docs"
SCRIPT = REPO / "launch" / "longseq.py"
TRAIN_DOC = LONG_DOCS / "pg19-books" / "43790_book_of_cats_ross.txt"
EVAL_DOC = LONG_DOCS / "proofpile-like-mathlib" / "topology_metric_space_basic.lean"


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

    if TINYLLAMA.is_dir() and _sentencepiece_available():
        tok = AutoTokenizer.from_pretrained(str(TINYLLAMA))
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


def script_env(**extra):
    """The environment of a launch/longseq.py subprocess: offline, one thread, the checkout importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
        PYTHONPATH=pythonpath(),
    )
    env.update(extra)
    return env


def run_checked(cmd, env, timeout=300):
    """Run ``cmd`` in the checkout; a non-zero exit raises with the ends of its output."""
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def common_args(tmp_path, vocab):
    """launch/longseq.py arguments of a tiny random-weight run (plain LoRA; tokenizer and config under ``tmp_path``)."""
    tok_dir = save_test_tokenizer(tmp_path / "tok")
    cfg_dir = tiny_llama_config_file(tmp_path / "cfg", vocab_size=vocab, max_position_embeddings=64)
    return [
        "--config_name", str(cfg_dir), "--tokenizer_name", str(tok_dir), "--dataset", str(TRAIN_DOC),
        "--seq_len", "128", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
        "--warmup_steps", "1", "--use_hyclora", "false", "--cache_dir", str(tmp_path / "cache"),
    ]


def read_metrics(out):
    """The per-step records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
