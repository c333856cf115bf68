"""Matthews correlation coefficient (GLUE CoLA). Multi-class form (Gorodkin's R_K), which
reduces to (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) for two classes; 0 when a
denominator factor is 0 (a constant predictor), as scikit-learn does. A local ``evaluate``
module, loaded by path with no network."""

import math
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "Matthews correlation coefficient of predicted class ids (GLUE CoLA)."
_KWARGS = """
Args:
    predictions: predicted class ids (int).
    references: gold class ids (int).
Returns:
    dict with matthews_correlation in [-1, 1].
"""
_CITATION = """
@article{matthews1975, title={Comparison of the predicted and observed secondary structure of T4
      phage lysozyme}, author={Matthews, Brian W.}, journal={Biochim. Biophys. Acta}, year={1975}}
"""


def matthews(predictions, references):
    if len(predictions) == 0:
        raise ValueError("glue_matthews: no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"glue_matthews: {len(predictions)} predictions but {len(references)} references")
    preds = [int(p) for p in predictions]
    refs = [int(r) for r in references]
    s = len(preds)
    c = sum(p == r for p, r in zip(preds, refs))
    p_k, t_k = Counter(preds), Counter(refs)
    classes = set(p_k) | set(t_k)
    cov = c * s - sum(p_k[k] * t_k[k] for k in classes)
    denom = (s * s - sum(v * v for v in p_k.values())) * (s * s - sum(v * v for v in t_k.values()))
    return cov / math.sqrt(denom) if denom > 0 else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GlueMatthews(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"matthews_correlation": matthews(predictions, references)}
