"""Pearson and Spearman correlation of predicted and gold scores (GLUE STS-B). Spearman is the
Pearson correlation of the ranks, ties sharing their average rank (as scipy.stats.spearmanr).
A local ``evaluate`` module, loaded by path with no network."""

import math

import datasets
import evaluate

_DESCRIPTION = "Pearson and Spearman correlation of predicted and gold similarity scores (GLUE STS-B)."
_KWARGS = """
Args:
    predictions: predicted scores (float).
    references: gold scores (float).
Returns:
    dict with pearson and spearmanr in [-1, 1] (0 when either side is constant).
"""
_CITATION = """
@inproceedings{cer2017semeval, title={SemEval-2017 Task 1: Semantic Textual Similarity}, author={Cer,
      Daniel and others}, booktitle={SemEval}, year={2017}}
"""


def pearson(x, y):
    if len(x) != len(y):
        raise ValueError(f"glue_correlation: {len(x)} predictions but {len(y)} references")
    if len(x) < 2:
        raise ValueError("glue_correlation: need at least two predictions")
    mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def average_ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    return pearson(average_ranks(list(x)), average_ranks(list(y)))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GlueCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        x = [float(v) for v in predictions]
        y = [float(v) for v in references]
        return {"pearson": pearson(x, y), "spearmanr": spearman(x, y)}
