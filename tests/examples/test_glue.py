"""examples/glue.py and its pieces: GLUE TSV reading (the original formats, written here, and
the real files of ../shared/data/glue when present), the local metric modules, and 3-step
HF Trainer runs on a tiny random RoBERTa with and without hyclora."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hyclora.data.glue import GLUE_TASKS, build_glue_dataset, glue_task, load_glue_records, read_glue_tsv
from hyclora.eval.metrics import load_metric

from helpers.examples import glue_example
from helpers.repo import GLUE_DIR

needs_glue = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").is_file(),
                                reason=f"GLUE TSV files not found under {GLUE_DIR}")


# -- reading the original formats -------------------------------------------------------------


def _write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def test_tsv_formats_written_here(tmp_path):
    # MRPC: BOM in the header, a stray double quote inside a sentence (quoting must be off)
    mrpc = _write(tmp_path / "MRPC" / "train.tsv",
                  "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                  '1\t1\t2\tHe said "the pie\tThe pie business.\n'
                  "0\t3\t4\tA b.\tC d.\n", bom=True)
    recs = read_glue_tsv(glue_task("mrpc"), mrpc)
    assert recs == [{"text_a": 'He said "the pie', "text_b": "The pie business.", "label": 1},
                    {"text_a": "A b.", "text_b": "C d.", "label": 0}]
    # CoLA: no header, sentence in the 4th column
    cola = _write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode the.\n")
    assert [r["label"] for r in read_glue_tsv(glue_task("cola"), cola)] == [1, 0]
    assert read_glue_tsv(glue_task("cola"), cola)[0]["text_b"] is None
    # RTE / QNLI: label strings in the hub's id order
    rte = _write(tmp_path / "RTE" / "dev.tsv",
                 "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tnot_entailment\n1\tC.\tD.\tentailment\n")
    assert [r["label"] for r in load_glue_records("rte", str(tmp_path), "eval")] == [1, 0]
    # STS-B: regression score by header name among ten columns
    stsb = _write(tmp_path / "STS-B" / "train.tsv",
                  "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                  "0\tmain\tf\t2012\t1\tnone\tnone\tA plane.\tAn air plane.\t4.800\n")
    assert read_glue_tsv(glue_task("stsb"), stsb) == [{"text_a": "A plane.", "text_b": "An air plane.", "label": 4.8}]
    # the task folder itself works too
    assert len(load_glue_records("rte", str(tmp_path / "RTE"), "eval")) == 2


def test_tsv_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'mnlx'.*cola"):
        glue_task("mnlx")
    bad = _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tmaybe\n")
    with pytest.raises(ValueError, match=r"train.tsv:2: label 'maybe' is not one of"):
        read_glue_tsv(glue_task("rte"), bad)
    _write(tmp_path / "QNLI" / "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tQ?\tS.\tentailment\n")
    with pytest.raises(FileNotFoundError, match="QNLI/train.tsv is missing.*--train false"):
        load_glue_records("qnli", str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no MRPC/train.tsv"):
        load_glue_records("mrpc", str(tmp_path), "train")
    with pytest.raises(ValueError, match="split 'test'"):
        load_glue_records("rte", str(tmp_path), "test")


@needs_glue
def test_shared_glue_files_have_the_glue_row_counts():
    counts = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277),
              "stsb": (5749, 1500)}
    for name, (n_train, n_dev) in counts.items():
        assert len(load_glue_records(name, str(GLUE_DIR), "train")) == n_train, name
        assert len(load_glue_records(name, str(GLUE_DIR), "eval")) == n_dev, name
    qnli = load_glue_records("qnli", str(GLUE_DIR), "eval")
    assert len(qnli) == 5463 and {r["label"] for r in qnli} == {0, 1}
    stsb = load_glue_records("stsb", str(GLUE_DIR), "eval")
    assert all(0.0 <= r["label"] <= 5.0 for r in stsb)


def test_dataset_tokenises_pairs(tmp_path):
    from hyclora.data.tokenizer import build_bpe_tokenizer

    tok = build_bpe_tokenizer(["a plane is taking off", "an air plane"], vocab_size=300)
    recs = [{"text_a": "a plane is taking off", "text_b": "an air plane", "label": 3.5}]
    ds = build_glue_dataset(tok, "stsb", recs, max_length=6)
    assert len(ds[0]["input_ids"]) == 6 and ds[0]["labels"] == 3.5
    single = build_glue_dataset(tok, "sst2", [{"text_a": "a plane", "text_b": None, "label": 1}])
    assert single[0]["input_ids"][0] == tok.bos_token_id


# -- metrics ----------------------------------------------------------------------------------


def test_glue_metrics_offline(no_network):
    # hand-computed: 2 TP, 1 TN, 1 FP, 0 FN
    assert load_metric("glue_matthews").compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == {
        "matthews_correlation": pytest.approx(2 / math.sqrt(12))}
    assert load_metric("glue_matthews").compute(predictions=[1, 1, 1], references=[1, 0, 1]) == {
        "matthews_correlation": 0.0}  # a constant predictor
    assert load_metric("glue_matthews").compute(predictions=[0, 1, 0], references=[1, 0, 1]) == {
        "matthews_correlation": pytest.approx(-1.0)}
    assert load_metric("glue_accuracy_f1").compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == {
        "accuracy": 0.75, "f1": pytest.approx(0.8)}
    assert load_metric("glue_accuracy").compute(predictions=[2, 0, 1], references=[2, 1, 1]) == {
        "accuracy": pytest.approx(2 / 3)}
    # Spearman with a tie: ranks (1, 2, 3, 4) vs (1, 2.5, 2.5, 4) -> 4.5 / sqrt(5 * 4.5)
    scores = load_metric("glue_correlation").compute(predictions=[1.0, 2.0, 3.0, 3.5], references=[1.1, 2.0, 2.0, 4.0])
    assert scores["spearmanr"] == pytest.approx(4.5 / math.sqrt(22.5))
    import numpy as np

    assert scores["pearson"] == pytest.approx(np.corrcoef([1.0, 2.0, 3.0, 3.5], [1.1, 2.0, 2.0, 4.0])[0, 1])
    with pytest.raises(ValueError, match="binary"):
        load_metric("glue_accuracy_f1").compute(predictions=[2], references=[1])
    with pytest.raises(ValueError, match="no predictions"):
        load_metric("glue_accuracy").compute(predictions=[], references=[])


def test_every_task_has_a_shipped_metric():
    from hyclora.eval.metrics import AVAILABLE

    assert {t.metric for t in GLUE_TASKS.values()} <= set(AVAILABLE)
    example = glue_example()
    assert example.main_metric("cola") == "matthews_correlation"
    assert example.main_metric("stsb") == "pearson" and example.main_metric("mrpc") == "accuracy"


# -- the example, 3 steps ----------------------------------------------------------------------


def _args(example, tmp_path, task, **overrides):
    values = dict(task=task, data=str(GLUE_DIR), model_name_or_path="tiny-random-roberta",
                  output_dir=str(tmp_path / task), max_steps=3, per_device_train_batch_size=4,
                  per_device_eval_batch_size=16, max_train_samples=64, max_eval_samples=32, logging_steps=1,
                  max_length=64, use_hyclora=False, lora_r=4, lora_alpha=8)
    values.update(overrides)
    return example.parse_glue_args([], **values)


@needs_glue
@pytest.mark.parametrize("task,hy", [("rte", dict(use_hyclora=True, layer_type="intra_inter", q_bit=2)),
                                     ("cola", dict(use_hyclora=False)),
                                     ("stsb", dict(use_hyclora=True, layer_type="baseline"))])
def test_example_three_steps(tmp_path, no_network, task, hy):
    example = glue_example()
    metrics = example.run_glue(_args(example, tmp_path, task, **hy))
    assert [s for s, _ in metrics["loss_history"]] == [1, 2, 3]
    assert all(math.isfinite(v) for _, v in metrics["loss_history"])
    key = {"rte": "eval_accuracy", "cola": "eval_matthews_correlation", "stsb": "eval_pearson"}[task]
    assert math.isfinite(metrics[key]) and -1.0 <= metrics[key] <= 1.0
    if task == "stsb":
        assert "eval_spearmanr" in metrics
    assert metrics["n_train"] == 64 and metrics["n_eval"] == 32
    out = Path(metrics["output_dir"])
    assert (out / "adapter_config.json").is_file()
    assert (out / "hyclora_state.pt").is_file() == (hy["use_hyclora"] is True)
    saved = json.loads(Path(metrics["results_file"]).read_text())
    assert saved["metrics"][key] == pytest.approx(metrics[key])
    expected = (f"hyclora {hy['layer_type']} q_bit={hy.get('q_bit', 4)}" if hy["use_hyclora"]
                else "plain LoRA (hyclora off)")
    assert metrics["hyclora"] == expected


@needs_glue
def test_example_baseline_trains_exactly_like_plain_lora(tmp_path, no_network):
    # hyclora's baseline layer type is HF's training step (dropout included, CPU masks
    # reproduced): 3 steps give the same losses and the same evaluation as plain PEFT LoRA
    example = glue_example()
    plain = example.run_glue(_args(example, tmp_path / "a", "mrpc"))
    base = example.run_glue(_args(example, tmp_path / "b", "mrpc", use_hyclora=True, layer_type="baseline"))
    for (_, a), (_, b) in zip(plain["loss_history"], base["loss_history"]):
        assert b == pytest.approx(a, rel=1e-5)
    assert base["eval_accuracy"] == plain["eval_accuracy"] and base["eval_f1"] == plain["eval_f1"]


def test_example_arguments():
    example = glue_example()
    args = example.parse_glue_args(["--task", "mrpc", "--model_name_or_path", "x"])
    assert args.lora.lora_target_modules == "query,key,value,dense" and args.lora.lora_r == 16
    assert args.training.learning_rate == 3e-4 and args.training.per_device_train_batch_size == 32
    assert args.training.num_train_epochs == 10 and args.training.weight_decay == 0.01
    assert args.hyclora.layer_type == "intra_inter"
    with pytest.raises(ValueError, match="unknown GLUE task"):
        example.parse_glue_args(["--task", "squad"])
    with pytest.raises(ValueError, match="--load_as"):
        example.parse_glue_args(["--load_as", "gpt2"])
    with pytest.raises(ValueError, match="unknown argument"):
        example.parse_glue_args([], not_a_flag=1)
