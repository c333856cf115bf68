"""Shared pieces of the example-pipeline tests: one BPE tokenizer per process (building one costs
~1.5 s), the skip for runs that need hyclora's operators, and examples/glue.py as a module."""

import functools

import pytest

from hyclora.data import build_bpe_tokenizer
from hyclora.training import hyclora_api

from helpers.repo import REPO, load_script

APPLY, WHY_NOT = hyclora_api()
needs_hyclora = pytest.mark.skipif(APPLY is None, reason=f"hyclora operators unavailable: {WHY_NOT}")


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_bpe_tokenizer()


def glue_example():
    """examples/glue.py loaded by path (examples/ is not a package), once per process."""
    return load_script("hyclora_example_glue", REPO / "examples" / "glue.py")
