"""GLUE accuracy and F1 of the positive class (MRPC, QQP), as the GLUE leaderboard reports
them (F1 with positive label 1, i.e. "paraphrase" / "duplicate"). A local ``evaluate`` module,
loaded by path with no network."""

import datasets
import evaluate

_DESCRIPTION = "Accuracy and binary F1 (positive class 1) of predicted class ids (GLUE MRPC, QQP)."
_KWARGS = """
Args:
    predictions: predicted class ids (0/1).
    references: gold class ids (0/1).
Returns:
    dict with accuracy and f1 (fractions in [0, 1]; f1 is 0 when there is no true or predicted positive).
"""
_CITATION = """
@inproceedings{wang2019glue, title={GLUE: A Multi-Task Benchmark and Analysis Platform for Natural
      Language Understanding}, author={Wang, Alex and others}, booktitle={ICLR}, year={2019}}
"""


def accuracy_f1(predictions, references):
    if len(predictions) == 0:
        raise ValueError("glue_accuracy_f1: no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"glue_accuracy_f1: {len(predictions)} predictions but {len(references)} references")
    pairs = [(int(p), int(r)) for p, r in zip(predictions, references)]
    if any(v not in (0, 1) for pair in pairs for v in pair):
        raise ValueError("glue_accuracy_f1: binary task, expected class ids 0 or 1")
    tp = sum(p == 1 and r == 1 for p, r in pairs)
    fp = sum(p == 1 and r == 0 for p, r in pairs)
    fn = sum(p == 0 and r == 1 for p, r in pairs)
    acc = sum(p == r for p, r in pairs) / len(pairs)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return acc, f1


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GlueAccuracyF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        acc, f1 = accuracy_f1(predictions, references)
        return {"accuracy": acc, "f1": f1}
