"""Answer extraction and comparison for generated math answers. Pure Python, no dependencies.

Three protocols, because published numbers use different ones:

* lm-eval's GSM8K filters (``strict_extract``, ``flexible_extract``) followed by its
  ``exact_match`` normalisation (``normalize_exact_match``): string equality after removing
  commas, dollar signs, anything up to ``#### `` and one trailing period, case-folded. We copy
  lm-eval's regexes on purpose, quirks included (see ``flexible_extract``), so our flexible
  number is comparable with theirs; the strict filter additionally accepts the paper's trigger
  "The final answer is:" because that is the format our GSM8K fine-tuning teaches.
* the paper's GSM8K accuracy (``paper_gsm8k_answer``): the first number after
  "The final answer is", else the last number; equality of floats.
* LLM-Adapters' arithmetic sets (``last_number``, ``numbers_match``, ``choice_letter``): the
  last number within 1e-3 of the gold answer; AQuA by letter.
"""

from __future__ import annotations

import math
import re
from typing import Optional

INVALID = "[invalid]"

# lm-eval gsm8k.yaml, strict-match: "#### (\-?[0-9\.\,]+)"; we also accept the paper's trigger
# and an optional "$" (it is removed by the normalisation anyway).
_STRICT = re.compile(r"(?:#### |[Tt]he final answer is:? ?)\$?(\-?[0-9\.\,]+)")
# lm-eval gsm8k.yaml, flexible-extract, group_select -1 (the last match).
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# lm-eval exact_match regexes_to_ignore for GSM8K, applied in this order.
_IGNORE = [re.compile(r","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$")]
# A decimal number, as LLM-Adapters / LoftQ find them (after commas are removed).
_NUMBER = re.compile(r"-?\d+\.?\d*")
_TRIGGER = re.compile(r"[Tt]he final answer is")


def strict_extract(text: str) -> str:
    """The first number written after ``#### `` or "The final answer is:", else ``[invalid]``."""
    match = _STRICT.search(text)
    return match.group(1).strip() if match else INVALID


def flexible_extract(text: str) -> str:
    """lm-eval's flexible filter: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``.

    Faithful to lm-eval, so it inherits its quirks: a run of two or more of ``$ . ,`` with no
    digit counts as a "number" (an ellipsis after the answer, "42. Done...", yields ``...``),
    and "5-3" yields ``-3``. Use ``paper_gsm8k_answer`` for a digit-only reading.
    """
    matches = _FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    last = matches[-1]
    return next(group for group in last if group).strip()


def normalize_exact_match(text: str) -> str:
    """lm-eval/HF ``exact_match`` preprocessing for GSM8K (ignore_case=True)."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_exact_match(prediction) == normalize_exact_match(reference)


def parse_number(text: str) -> Optional[float]:
    """A float from a number string (commas, ``$`` and a trailing period allowed), else None."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def last_number(text: str) -> Optional[float]:
    """The last number in ``text`` (commas removed first, so 1,234 is one number), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def paper_gsm8k_answer(text: str) -> Optional[float]:
    """The paper's GSM8K reading (LoftQ): the first number after "The final answer is", or,
    when that phrase is absent or has no number after it, the last number of the text."""
    flat = text.replace(",", "")
    parts = _TRIGGER.split(flat, maxsplit=1)
    if len(parts) > 1:
        found = _NUMBER.findall(parts[1])
        if found:
            return float(found[0])
    return last_number(flat)


def numbers_match(prediction: Optional[float], reference: float | str, tol: float = 1e-3) -> bool:
    """|prediction - reference| <= tol; a missing prediction never matches."""
    if prediction is None:
        return False
    ref = parse_number(reference) if isinstance(reference, str) else float(reference)
    if ref is None:
        raise ValueError(f"reference answer {reference!r} is not a number")
    return abs(prediction - ref) <= tol


_LETTER_PHRASE = re.compile(r"answer(?: choice)? is:?\s*\(?([A-E])\b")
_LETTER_PAREN = re.compile(r"\(([A-E])\)")
_LETTER_WORD = re.compile(r"\b([A-E])\b")


def choice_letter(text: str) -> Optional[str]:
    """The multiple-choice letter (A-E) of an AQuA answer, or None.

    In order: the letter after "answer is" (the training rationales end "The answer is (D)."),
    else the last parenthesised letter, else the first standalone capital A-E. LLM-Adapters takes
    the first capital A-E anywhere, which also matches the "A" of "A: ..." or of "Alice".
    """
    for pattern, pick in ((_LETTER_PHRASE, -1), (_LETTER_PAREN, -1), (_LETTER_WORD, 0)):
        found = pattern.findall(text)
        if found:
            return found[pick]
    return None


__all__ = [
    "INVALID",
    "strict_extract",
    "flexible_extract",
    "normalize_exact_match",
    "exact_match",
    "parse_number",
    "last_number",
    "paper_gsm8k_answer",
    "numbers_match",
    "choice_letter",
]
