"""Answer extraction on tricky strings, for the three protocols (lm-eval strict/flexible, the
paper's GSM8K reading, LLM-Adapters' numeric/letter)."""

import pytest

from hyclora.eval.extraction import (
    INVALID,
    choice_letter,
    exact_match,
    flexible_extract,
    last_number,
    normalize_exact_match,
    numbers_match,
    paper_gsm8k_answer,
    parse_number,
    strict_extract,
)


@pytest.mark.parametrize(
    "text,strict,flexible",
    [
        ("48 + 24 = 72\n#### 72", "72", "72"),
        ("so 1,000 + 234 = 1,234.\n#### 1,234", "1,234", "1,234"),
        ("The final answer is: $18", "18", "$18"),  # trigger + dollar ($ removed when compared)
        ("the final answer is -3", "-3", "-3"),  # lower-case trigger, negative
        ("The final answer is: 0.5 dollars", "0.5", "0.5"),
        ("It costs $5.", INVALID, "$5."),  # no trigger: strict fails; flexible keeps '$5.'
        ("First 12 then #### 7 and #### 9", "7", "9"),  # strict takes the first, flexible the last
        ("no number here", INVALID, INVALID),
        ("Temperature fell to -4", INVALID, "-4"),
        ("answer 42. Done...", INVALID, "..."),  # lm-eval's flexible quirk, kept on purpose
        ("", INVALID, INVALID),
    ],
)
def test_strict_and_flexible(text, strict, flexible):
    assert strict_extract(text) == strict
    assert flexible_extract(text) == flexible


@pytest.mark.parametrize(
    "prediction,reference,equal",
    [
        ("1,234", "Natalia ... #### 1234", True),  # commas and the '#### ' prefix ignored
        ("$18", "18", True),
        ("18.", "18", True),  # one trailing period removed
        ("18.0", "18", False),  # string equality, like lm-eval
        ("-3", "#### -3", True),
        (INVALID, "3", False),
    ],
)
def test_lm_eval_exact_match_normalisation(prediction, reference, equal):
    assert exact_match(prediction, reference) is equal


def test_normalisation_is_case_insensitive():
    assert normalize_exact_match("ABC, $1.") == "abc 1"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 + 4 = 7. The final answer is: 7", 7.0),
        ("The final answer is: 1,024 apples, not 3", 1024.0),  # first number after the trigger
        ("I think 5, no wait, 6", 6.0),  # no trigger: last number
        ("The final answer is: unknown, maybe 12 or 13", 12.0),
        ("The final answer is unclear", None),
        ("costs $2.50 per item", 2.5),
        ("-7 degrees", -7.0),
        ("nothing", None),
    ],
)
def test_paper_gsm8k_answer(text, expected):
    assert paper_gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A: 7 - 3 = 4 crayons. The answer is 4.", 4.0),
        ("The answer is 1,834.5 dollars", 1834.5),
        ("4 * 130 = 520", 520.0),
        ("There is no numeric answer", None),
        ("result: -0.25", -0.25),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_numbers_match_tolerance():
    assert numbers_match(1.8333, "1.8333333333333335")  # within 1e-3
    assert not numbers_match(1.83, "1.8333333333333335")
    assert numbers_match(576.0, "576.0")
    assert numbers_match(8.0, 8)
    assert not numbers_match(None, "8.0")
    assert numbers_match(7.0, "7", tol=0.0)
    with pytest.raises(ValueError, match="not a number"):
        numbers_match(1.0, "B")


def test_parse_number():
    assert parse_number("$1,234.") == 1234.0
    assert parse_number("-0.5") == -0.5
    assert parse_number("[invalid]") is None
    assert parse_number("inf") is None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Rationale: 1023.65 - 1000 = 23.65. The answer is (A).", "A"),
        ("A: first we compute ... so the answer is D", "D"),  # not the 'A' of 'A:'
        ("Options (B) and (C) look close; (C) fits.", "C"),  # last parenthesised letter
        ("E", "E"),
        ("Alice and Bob", None),  # capitals inside words are not choices
        ("the answer is (e)", None),  # letters are capitals
    ],
)
def test_choice_letter(text, expected):
    assert choice_letter(text) == expected
