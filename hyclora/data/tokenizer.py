"""A small byte-level BPE tokenizer built from text in about a second, with no download.

For tests and the demo: a real ``PreTrainedTokenizerFast`` (batching, padding, decoding and
``save_pretrained`` all behave as with a hub tokenizer) whose vocabulary is learnt from the
synthetic arithmetic problems, so no test has to skip for lack of a tokenizer file. Digits are
split one per token, which makes arithmetic learnable for a tiny model.
"""

from __future__ import annotations

from typing import Iterable, Optional

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def build_bpe_tokenizer(texts: Optional[Iterable[str]] = None, vocab_size: int = 512):
    """Train a byte-level BPE of ``vocab_size`` tokens (>= 260) on ``texts``.

    ``texts`` defaults to 2,000 synthetic GSM8K-format problems (prompts and targets). Any text
    can be encoded: unseen characters fall back to their bytes. The tokenizer adds ``<s>`` in
    front of every sequence (as Llama's does); ``</s>`` is EOS and ``<pad>`` is padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 260 tokens")
    if texts is None:
        from .prompts import gsm8k_prompt, gsm8k_target
        from .synthetic import arithmetic_word_problems

        problems = arithmetic_word_problems("train", 2000)
        texts = [gsm8k_prompt(p["question"]) + gsm8k_target(p["answer"]) for p in problems]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4096,
    )


__all__ = ["build_bpe_tokenizer", "SPECIAL_TOKENS"]
