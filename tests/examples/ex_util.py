"""Shared pieces of the example-pipeline tests: the repository root, one BPE tokenizer per
process (building one costs ~1.5 s) and the skip for runs that need hyclora's operators."""

import functools
from pathlib import Path

import pytest

from hyclora.data import build_bpe_tokenizer
from hyclora.training import hyclora_api

REPO = Path(__file__).resolve().parents[2]
APPLY, WHY_NOT = hyclora_api()
needs_hyclora = pytest.mark.skipif(APPLY is None, reason=f"hyclora operators unavailable: {WHY_NOT}")


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_bpe_tokenizer()
