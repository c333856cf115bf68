"""GLUE tasks for sequence classification: records from the original TSV files or the HF hub,
tokenised for an encoder, and which metric scores each task.

``--data`` for GLUE is a local folder (the GLUE layout: ``<root>/<Task>/{train,dev}.tsv``, or
the task folder itself; MNLI's evaluation file is ``dev_matched.tsv``), or a hub dataset name
(``nyu-mll/glue``, online) whose configuration is the task. The TSVs are read with quoting off
(MRPC/QNLI sentences contain stray quotes) and a BOM-tolerant decoder (MRPC's header has one);
columns are found by header name, except CoLA which has no header.

Labels follow the HF ``glue`` dataset (so hub and local runs are interchangeable):
RTE/QNLI ``entailment`` = 0, ``not_entailment`` = 1; MNLI entailment 0, neutral 1,
contradiction 2; STS-B is a regression on the 0-5 score.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

GLUE_HUB = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is read and scored.

    Attributes:
        name: canonical lower-case name (``cola``, ``sst2``, ...), also the hub configuration.
        folder: the task folder of the original GLUE distribution (``CoLA``, ``SST-2``, ...).
        text_keys: the hub columns holding the one or two input texts.
        tsv_text: the TSV header names of the same texts (CoLA: column positions).
        tsv_label: the TSV header name (or position) of the label.
        label_names: the TSV label strings in hub id order; empty when labels are already ids.
        num_labels: classifier outputs (1 = regression).
        metric: the hyclora metric module (``hyclora.eval.metrics``) that scores the task.
        eval_split: the hub split / TSV stem used for evaluation.
    """

    name: str
    folder: str
    text_keys: Tuple[str, ...]
    tsv_text: Tuple[object, ...]
    tsv_label: object
    label_names: Tuple[str, ...] = ()
    num_labels: int = 2
    metric: str = "glue_accuracy"
    eval_split: str = "validation"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def eval_file(self) -> str:
        return "dev_matched" if self.name == "mnli" else "dev"


GLUE_TASKS: Dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "CoLA", ("sentence",), (3,), 1, metric="glue_matthews"),
        GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label"),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                 metric="glue_accuracy_f1"),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 label_names=("entailment", "not_entailment")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score",
                 num_labels=1, metric="glue_correlation"),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                 label_names=("entailment", "not_entailment")),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                 label_names=("entailment", "neutral", "contradiction"), num_labels=3,
                 eval_split="validation_matched"),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                 metric="glue_accuracy_f1"),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label"),
    )
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli_matched": "mnli"}


def glue_task(name: str) -> GlueTask:
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}: expected one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# -- reading -----------------------------------------------------------------------------------

Record = Dict[str, object]  # {"text_a": str, "text_b": str | None, "label": int | float}


def _read_tsv(path: Path) -> List[List[str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _column(header: Sequence[str], key, path: Path) -> int:
    if isinstance(key, int):
        return key
    try:
        return list(header).index(key)
    except ValueError:
        raise ValueError(f"{path}: no column {key!r} in the header {list(header)}") from None


def _label(task: GlueTask, raw: str, where: str):
    raw = raw.strip()
    if task.label_names and not task.is_regression:
        if raw not in task.label_names:
            raise ValueError(f"{where}: label {raw!r} is not one of {task.label_names}")
        return task.label_names.index(raw)
    try:
        value = float(raw) if task.is_regression else int(raw)
    except ValueError:
        raise ValueError(f"{where}: label {raw!r} is not a{' number' if task.is_regression else 'n integer'}") from None
    if task.is_regression:
        return value
    if not 0 <= value < task.num_labels:
        raise ValueError(f"{where}: label {value} outside [0, {task.num_labels})")
    return value


def read_glue_tsv(task: GlueTask, path: str | os.PathLike) -> List[Record]:
    """Records of one GLUE TSV file (train or dev) in the original format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {task.name}: {str(path)!r} does not exist")
    rows = _read_tsv(path)
    if not any(row and any(c.strip() for c in row) for row in rows):
        raise ValueError(f"data file {path} has no records (it is empty)")
    has_header = task.name != "cola"
    header, body = (rows[0], rows[1:]) if has_header else ([], rows)
    text_cols = [_column(header, k, path) for k in task.tsv_text]
    label_col = _column(header, task.tsv_label, path)
    width = max(text_cols + [label_col]) + 1
    records: List[Record] = []
    for lineno, row in enumerate(body, 2 if has_header else 1):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}:{lineno}"
        if len(row) < width:
            raise ValueError(f"{where}: {len(row)} columns, expected at least {width}")
        records.append({
            "text_a": row[text_cols[0]],
            "text_b": row[text_cols[1]] if len(text_cols) > 1 else None,
            "label": _label(task, row[label_col], where),
        })
    if not records:
        raise ValueError(f"data file {path} has no records (only a header)")
    return records


def _task_folder(task: GlueTask, data: str) -> Optional[Path]:
    root = Path(data)
    for candidate in (root / task.folder, root / task.name, root):
        if candidate.is_dir() and any((candidate / f"{s}.tsv").is_file() for s in ("train", task.eval_file)):
            return candidate
    return None


def load_glue_records(task: str | GlueTask, data: Optional[str], split: str) -> List[Record]:
    """``split``: ``train`` or ``eval`` (dev / validation; MNLI matched).

    ``data``: a local GLUE folder (root or task folder), or a hub name (default ``nyu-mll/glue``)."""
    task = glue_task(task) if isinstance(task, str) else task
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r}: expected 'train' or 'eval'")
    data = data or GLUE_HUB
    if os.path.exists(data):
        folder = _task_folder(task, data)
        if folder is None:
            raise FileNotFoundError(
                f"GLUE {task.name}: no {task.folder}/train.tsv or {task.folder}/{task.eval_file}.tsv "
                f"under {data!r} (expected the original GLUE layout, e.g. ../shared/data/glue)"
            )
        stem = "train" if split == "train" else task.eval_file
        path = folder / f"{stem}.tsv"
        if not path.is_file():
            raise FileNotFoundError(
                f"GLUE {task.name}: {path} is missing; this folder has no {split} data for the task "
                "(pass --train false to only evaluate, or give the hub name online)"
            )
        return read_glue_tsv(task, path)
    from .sources import load_hub_records

    hub_split = "train" if split == "train" else task.eval_split
    rows = load_hub_records(data, task.name, hub_split)
    keys = task.text_keys
    return [{"text_a": r[keys[0]], "text_b": r[keys[1]] if len(keys) > 1 else None,
             "label": float(r["label"]) if task.is_regression else int(r["label"])} for r in rows]


# -- tokenising --------------------------------------------------------------------------------


def build_glue_dataset(tokenizer, task: str | GlueTask, records: Sequence[Record], max_length: int = 128):
    """A ``datasets.Dataset`` of ``input_ids`` / ``attention_mask`` (/ ``token_type_ids`` when
    the tokenizer makes them) / ``labels``, truncated to ``max_length``, not padded (pad per
    batch with ``transformers.DataCollatorWithPadding``)."""
    import datasets

    task = glue_task(task) if isinstance(task, str) else task
    if not records:
        raise ValueError(f"GLUE {task.name}: no examples to tokenise")
    a = [str(r["text_a"]) for r in records]
    b = [str(r["text_b"]) for r in records] if task.text_keys[1:] else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    columns = {k: list(v) for k, v in enc.items()}
    columns["labels"] = [r["label"] for r in records]
    return datasets.Dataset.from_dict(columns)


def glue_texts(records: Sequence[Record]) -> List[str]:
    """Every text of ``records`` (for building a tokenizer vocabulary in smoke tests)."""
    out: List[str] = []
    for r in records:
        out.append(str(r["text_a"]))
        if r.get("text_b") is not None:
            out.append(str(r["text_b"]))
    return out


__all__ = ["GLUE_HUB", "GLUE_TASKS", "GlueTask", "glue_task", "read_glue_tsv", "load_glue_records",
           "build_glue_dataset", "glue_texts"]
