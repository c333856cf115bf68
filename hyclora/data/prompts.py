"""Prompt and target formats of the paper's experiments (hyclora-method.md section 7).

Kept in one place so that training, evaluation and the command-line evaluator build exactly the
same prompt for the same example: a prompt that differs by one character between training and
evaluation silently costs accuracy.
"""

from __future__ import annotations

import re

# GSM8K (run_gsm8k, from LoftQ): the question, then this instruction; the target is the reference
# solution with its "#### 72" line rewritten as "The final answer is: 72".
GSM8K_INSTRUCTION = (
    "\nAnswer the above question. First think step by step and then answer the final number.\n"
)
GSM8K_ANSWER_TRIGGER = "The final answer is: "

# Arithmetic multitask (run_multitask, from LLM-Adapters / pyreft): Alpaca templates.
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")
_HASHES = re.compile(r"####\s*")


def gsm8k_prompt(question: str) -> str:
    return question.strip() + GSM8K_INSTRUCTION


def gsm8k_target(answer: str, *, strip_calc_annotations: bool = False) -> str:
    """The training target: the solution with ``#### X`` turned into ``The final answer is: X``.

    The reference replaces the four hashes only, which leaves a double space before the number
    ("is:  72"); we also swallow the whitespace after the hashes so the trigger reads the same in
    training and in extraction. GSM8K's calculator annotations (``<<48/2=24>>``) are kept by
    default, as in the reference; ``strip_calc_annotations`` removes them (shorter targets).
    """
    if "####" not in answer:
        raise ValueError(
            "GSM8K answer has no '#### <number>' line; expected the openai/gsm8k 'answer' "
            f"format, got: {answer[-80:]!r}"
        )
    if strip_calc_annotations:
        answer = _CALC_ANNOTATION.sub("", answer)
    return _HASHES.sub(GSM8K_ANSWER_TRIGGER, answer.strip())


def gsm8k_gold(answer: str) -> str:
    """The reference number of a GSM8K answer: the text after ``####``, commas removed."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the field's name
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return ALPACA_NO_INPUT.format(instruction=instruction.strip())


__all__ = [
    "GSM8K_INSTRUCTION",
    "GSM8K_ANSWER_TRIGGER",
    "ALPACA_NO_INPUT",
    "ALPACA_WITH_INPUT",
    "gsm8k_prompt",
    "gsm8k_target",
    "gsm8k_gold",
    "alpaca_prompt",
]
