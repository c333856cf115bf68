"""The local evaluate modules load by path with no network, and score as documented."""

import pytest

from hyclora.eval.metrics import AVAILABLE, load_metric, metric_path


def test_metrics_are_shipped():
    assert set(AVAILABLE) >= {"gsm8k_exact_match", "math_accuracy"}
    with pytest.raises(ValueError, match="unknown hyclora metric"):
        metric_path("exact_match")


def test_gsm8k_exact_match_offline(no_network):
    metric = load_metric("gsm8k_exact_match")
    predictions = [
        "24 + 48 = 72. The final answer is: 72",  # all three count it
        "She pays 18 dollars in total.",  # no trigger: only flexible and the paper's reading
        "The final answer is: 18.0",  # floats equal, strings differ
        "The final answer is: 5, then 6",  # strict: 5 wrong; flexible: 6 right; paper: 5 wrong
    ]
    references = ["... #### 72", "#### 18", "#### 18", "#### 6"]
    scores = metric.compute(predictions=predictions, references=references)
    assert scores == {
        "exact_match_strict": 1 / 4,
        "exact_match_flexible": 3 / 4,
        "accuracy": 3 / 4,
    }


def test_math_accuracy_offline(no_network):
    metric = load_metric("math_accuracy")
    numeric = metric.compute(
        predictions=["The answer is 1.8334.", "The answer is 17.", "I don't know"],
        references=["1.8333333333333335", "17.5", "3"],
    )
    assert numeric == {"accuracy": 1 / 3}
    loose = metric.compute(predictions=["The answer is 17."], references=["17.5"], tolerance=0.5)
    assert loose == {"accuracy": 1.0}
    letters = metric.compute(
        predictions=["The answer is (B).", "so the answer is C", "(A) or (E)?"],
        references=["B", "D", "E"], answer_type="letter",
    )
    assert letters == {"accuracy": 2 / 3}
    with pytest.raises(ValueError, match="answer_type"):
        metric.compute(predictions=["1"], references=["1"], answer_type="words")


def test_empty_predictions_raise(no_network):
    with pytest.raises(ValueError):
        load_metric("gsm8k_exact_match").compute(predictions=[], references=[])
