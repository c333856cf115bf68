"""GLUE accuracy (SST-2, RTE, QNLI, MNLI, WNLI): the fraction of predicted class ids equal to
the reference ids. A local ``evaluate`` module, loaded by path with no network."""

import datasets
import evaluate

_DESCRIPTION = "Accuracy of predicted class ids (GLUE SST-2, RTE, QNLI, MNLI, WNLI)."
_KWARGS = """
Args:
    predictions: predicted class ids (int).
    references: gold class ids (int).
Returns:
    dict with accuracy (fraction in [0, 1]).
"""
_CITATION = """
@inproceedings{wang2019glue, title={GLUE: A Multi-Task Benchmark and Analysis Platform for Natural
      Language Understanding}, author={Wang, Alex and others}, booktitle={ICLR}, year={2019}}
"""


def accuracy(predictions, references):
    if len(predictions) == 0:
        raise ValueError("glue_accuracy: no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"glue_accuracy: {len(predictions)} predictions but {len(references)} references")
    return sum(int(p) == int(r) for p, r in zip(predictions, references)) / len(predictions)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GlueAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": accuracy(predictions, references)}
