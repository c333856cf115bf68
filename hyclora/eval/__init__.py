"""Evaluation harness: answer extraction, local ``evaluate`` metrics, batched greedy
generation, perplexity, result tables and JSON. Command line: ``python -m hyclora.eval``."""

from .extraction import (
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
from .generation import generate_greedy, perplexity, truncate_at_stops
from .harness import (
    evaluate_gsm8k,
    evaluate_math_sets,
    evaluate_perplexity,
    format_table,
    write_results,
)
from .metrics import AVAILABLE as AVAILABLE_METRICS
from .metrics import load_metric, metric_path

__all__ = [
    "INVALID",
    "choice_letter",
    "exact_match",
    "flexible_extract",
    "last_number",
    "normalize_exact_match",
    "numbers_match",
    "paper_gsm8k_answer",
    "parse_number",
    "strict_extract",
    "generate_greedy",
    "perplexity",
    "truncate_at_stops",
    "evaluate_gsm8k",
    "evaluate_math_sets",
    "evaluate_perplexity",
    "format_table",
    "write_results",
    "AVAILABLE_METRICS",
    "load_metric",
    "metric_path",
]
