"""Arithmetic-reasoning accuracy as in LLM-Adapters / pyreft: the last number of the generated
text within a tolerance (default 1e-3) of the gold answer, or, for multiple choice (AQuA), the
answer letter. A local ``evaluate`` module, loaded by path with no network."""

import datasets
import evaluate

from hyclora.eval.extraction import choice_letter, last_number, numbers_match

_DESCRIPTION = """
Accuracy of generated answers to arithmetic word problems.
answer_type='numeric' (default): correct when |last number of the prediction - reference| <= tolerance.
answer_type='letter': correct when the extracted choice letter (A-E) equals the reference letter.
"""

_KWARGS = """
Args:
    predictions: generated texts.
    references: gold answers ('17.0', '1.8333333333333335', or a letter 'A'-'E').
    answer_type: 'numeric' or 'letter'.
    tolerance: absolute tolerance for numeric answers (1e-3).
Returns:
    dict with accuracy (fraction in [0, 1]).
"""

_CITATION = """
@inproceedings{hu2023llmadapters, title={LLM-Adapters: An Adapter Family for Parameter-Efficient
      Fine-Tuning of Large Language Models}, author={Hu, Zhiqiang and others}, booktitle={EMNLP}, year={2023}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MathAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, answer_type="numeric", tolerance=1e-3):
        if len(predictions) == 0:
            raise ValueError("math_accuracy: no predictions to score")
        if answer_type == "numeric":
            hits = [numbers_match(last_number(p), r, tol=tolerance) for p, r in zip(predictions, references)]
        elif answer_type == "letter":
            hits = [choice_letter(p) == r.strip().upper() for p, r in zip(predictions, references)]
        else:
            raise ValueError(f"answer_type={answer_type!r}: expected 'numeric' or 'letter'")
        return {"accuracy": sum(hits) / len(hits)}
