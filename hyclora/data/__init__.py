"""Dataset builders for the examples: GSM8K, WikiText-2, the arithmetic multitask, and an
embedded synthetic word-problem generator; prompts, tokenisation, the padding collator and the
packed (padding-free) batches of :mod:`.packing`.

``--data`` accepts a hub name (online), a local file or folder in the formats of
``../shared/data`` (gsm8k jsonl, WikiText raw/tokens txt, LLM-Adapters math json), or
``synthetic[:N]``.
"""

from .gsm8k import GSM8K_HUB, build_gsm8k_dataset, gsm8k_prompts_and_targets, load_gsm8k_records
from .math import (
    ALL_EVAL_SETS,
    PAPER_EVAL_SETS,
    answer_type,
    build_math_dataset,
    load_math_eval_sets,
    load_math_train_records,
    math_prompts_and_targets,
    resolve_math_eval_dir,
)
from .packing import PackedBatchCollator, max_documents, pack_examples
from .prompts import alpaca_prompt, gsm8k_gold, gsm8k_prompt, gsm8k_target
from .sft import IGNORE_INDEX, CausalLMCollator, tokenize_blocks, tokenize_supervised
from .sources import read_records
from .synthetic import arithmetic_word_problems
from .tokenizer import build_bpe_tokenizer
from .wikitext import (
    build_wikitext_dataset,
    load_wikitext_lines,
    resolve_wikitext_files,
    wikitext_splits,
)

__all__ = [
    "GSM8K_HUB",
    "load_gsm8k_records",
    "gsm8k_prompts_and_targets",
    "build_gsm8k_dataset",
    "ALL_EVAL_SETS",
    "PAPER_EVAL_SETS",
    "answer_type",
    "build_math_dataset",
    "load_math_eval_sets",
    "load_math_train_records",
    "math_prompts_and_targets",
    "resolve_math_eval_dir",
    "alpaca_prompt",
    "gsm8k_gold",
    "gsm8k_prompt",
    "gsm8k_target",
    "IGNORE_INDEX",
    "CausalLMCollator",
    "PackedBatchCollator",
    "max_documents",
    "pack_examples",
    "tokenize_blocks",
    "tokenize_supervised",
    "read_records",
    "arithmetic_word_problems",
    "build_bpe_tokenizer",
    "build_wikitext_dataset",
    "load_wikitext_lines",
    "resolve_wikitext_files",
    "wikitext_splits",
]
