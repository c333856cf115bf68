"""Bad data files end in errors that name the file, the record (and its line) and the fix, not in
an IndexError from the tokenizer or a bare KeyError from the middle of a list (issue 20, item 5)."""

import json

import pytest

from hyclora.data import (
    arithmetic_word_problems,
    load_gsm8k_records,
    load_math_eval_sets,
    load_math_train_records,
    read_records,
    wikitext_splits,
)
from hyclora.data.glue import glue_task, read_glue_tsv


def _jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("name,content", [("train.jsonl", ""), ("train.jsonl", "\n \n"), ("train.json", ""),
                                          ("train.json", "[]"), ("train.json", '{"data": []}'), ("train.csv", "")])
def test_empty_data_file_has_no_records(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=f"data file {path} has no records"):
        read_records(path)
    # the example loaders: before, an empty file reached the tokenizer and raised IndexError
    with pytest.raises(ValueError, match=f"data file {path} has no records"):
        load_gsm8k_records(str(path), "train")
    if path.suffix != ".csv":  # a GSM8K folder holds train.jsonl / train.json / parquet
        with pytest.raises(ValueError, match=f"data file {path} has no records"):
            load_gsm8k_records(str(tmp_path), "train")


def test_empty_text_and_tsv_files(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n")
    (tmp_path / "test.txt").write_text("some text\n")
    with pytest.raises(ValueError, match=f"data file {tmp_path / 'train.txt'} has no records"):
        wikitext_splits(str(tmp_path))
    for content, why in (("", "it is empty"), ("#1 ID\t#2 ID\t#1 String\t#2 String\tQuality\n", "only a header")):
        (tmp_path / "train.tsv").write_text(content)
        with pytest.raises(ValueError, match=f"data file {tmp_path / 'train.tsv'} has no records \\({why}\\)"):
            read_glue_tsv(glue_task("mrpc"), tmp_path / "train.tsv")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\tyes\n")
    with pytest.raises(ValueError, match=r"train.tsv:2: label 'yes' is not an integer"):
        read_glue_tsv(glue_task("sst2"), tmp_path / "train.tsv")


def test_missing_field_in_a_later_record_names_file_line_and_field(tmp_path):
    rows = arithmetic_word_problems("train", 4)
    rows[2] = {"question": rows[2]["question"]}  # the 3rd record, on line 4 (a blank line after the 1st)
    path = _jsonl(tmp_path / "train.jsonl", rows, blank_after_first=True)
    # before: the first record was checked, then KeyError: 'answer'
    with pytest.raises(ValueError, match=rf"{path}:4 \(record 3\): missing field 'answer' \(the record has "
                                         r"\['question'\]\); GSM8K records need 'question' and 'answer'"):
        load_gsm8k_records(str(tmp_path), "train")
    rows[2] = {"question": rows[2]["question"], "answer": None}
    (tmp_path / "test.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'test.json'}, record 3: field 'answer' is null"):
        load_gsm8k_records(str(tmp_path), "test")
    rows[2] = {"question": 7, "answer": "#### 7"}
    (tmp_path / "test.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"record 3: field 'question' is a int, expected text"):
        load_gsm8k_records(str(tmp_path / "test.json"), "test")
    (tmp_path / "test.json").write_text(json.dumps([rows[0], ["not", "an", "object"]]))
    with pytest.raises(ValueError, match=r"record 2: expected an object with fields \['question', 'answer'\], "
                                         "found a list"):
        load_gsm8k_records(str(tmp_path / "test.json"), "test")


def test_math_records_are_all_checked(tmp_path):
    good = {"instruction": "1 + 1?", "input": "", "output": "2. The answer is 2.", "answer": "2"}
    train = tmp_path / "math_data.json"
    train.write_text(json.dumps([good, good, {"instruction": "2 + 2?", "output": "4"}]))
    with pytest.raises(ValueError, match=rf"{train}, record 3: missing field 'answer'.*"
                                         "instruction/input/output/answer"):
        load_math_train_records(str(train))
    train.write_text(json.dumps([good, dict(good, output=4)]))
    with pytest.raises(ValueError, match="record 2: field 'output' is a int, expected text"):
        load_math_train_records(str(train))
    (tmp_path / "dataset" / "SVAMP").mkdir(parents=True)
    (tmp_path / "dataset" / "SVAMP" / "test.json").write_text(json.dumps([good, {"answer": "3"}]))
    with pytest.raises(ValueError, match=r"SVAMP/test.json, record 2: missing field 'instruction'"):
        load_math_eval_sets(tmp_path / "dataset", ["SVAMP"])
    (tmp_path / "dataset" / "SVAMP" / "test.json").write_text("")
    with pytest.raises(ValueError, match=r"SVAMP/test.json has no records"):
        load_math_eval_sets(tmp_path / "dataset", ["SVAMP"])
    # numeric answers stay accepted (the harness compares str(answer))
    train.write_text(json.dumps([good, dict(good, answer=2.0)]))
    assert len(load_math_train_records(str(train))) == 2


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "train.json").write_text('[{"question": "a", "answer": "b"},')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'train.json'}: not valid JSON"):
        read_records(tmp_path / "train.json")
