"""GSM8K exact match, strict and flexible as in lm-eval, plus the HyC-LoRA paper's accuracy.

A local ``evaluate`` module: load it by path (``hyclora.eval.metrics.load_metric``), which needs
no network. The extraction logic lives in ``hyclora.eval.extraction`` (plain Python, unit-tested).
"""

import datasets
import evaluate

from hyclora.eval.extraction import (
    exact_match,
    flexible_extract,
    numbers_match,
    paper_gsm8k_answer,
    strict_extract,
)

_DESCRIPTION = """
GSM8K answer scoring of generated text against reference answers.

- exact_match_strict: the number after '#### ' or 'The final answer is:' (lm-eval strict-match,
  extended with the paper's trigger), compared as strings after lm-eval's normalisation
  (commas, '$', a trailing '.', everything up to '#### ' removed; case-folded).
- exact_match_flexible: the last number-like span of the text (lm-eval flexible-extract), same
  normalisation.
- accuracy: the paper's reading (first number after 'The final answer is', else the last
  number), compared as floats.
All three are fractions in [0, 1].
"""

_KWARGS = """
Args:
    predictions: generated texts (the continuation after the prompt).
    references: gold answers: either the full GSM8K answer ('... #### 72') or the number.
Returns:
    dict with exact_match_strict, exact_match_flexible, accuracy.
Example:
    >>> metric = hyclora.eval.metrics.load_metric("gsm8k_exact_match")
    >>> metric.compute(predictions=["2 + 3 = 5. The final answer is: 5"], references=["#### 5"])
    {'exact_match_strict': 1.0, 'exact_match_flexible': 1.0, 'accuracy': 1.0}
"""

_CITATION = """
@misc{eval-harness, title={A framework for few-shot language model evaluation},
      author={Gao, Leo and others}, year={2024}, publisher={Zenodo}}
@inproceedings{hyclora2025, title={HyC-LoRA: Memory Efficient LoRA Fine-tuning with Hybrid
      Activation Compression}, author={Wang, Yujin and others}, booktitle={MLSys}, year={2025}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Gsm8kExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("gsm8k_exact_match: no predictions to score")
        n = len(predictions)
        strict = sum(exact_match(strict_extract(p), r) for p, r in zip(predictions, references))
        flexible = sum(exact_match(flexible_extract(p), r) for p, r in zip(predictions, references))
        gold = [r.split("####")[-1] for r in references]
        paper = sum(numbers_match(paper_gsm8k_answer(p), g, tol=0.0) for p, g in zip(predictions, gold))
        return {
            "exact_match_strict": strict / n,
            "exact_match_flexible": flexible / n,
            "accuracy": paper / n,
        }
