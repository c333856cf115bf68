"""Data builders: the synthetic generator, GSM8K / WikiText-2 / multitask loaders (on generated
files always, on ../shared/data when present), tokenisation with prompt masking, the collator."""

import ast
import functools
import json
import operator
import re

import pytest
import torch

from hyclora.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    arithmetic_word_problems,
    build_bpe_tokenizer,
    build_gsm8k_dataset,
    build_math_dataset,
    gsm8k_gold,
    gsm8k_prompt,
    gsm8k_prompts_and_targets,
    gsm8k_target,
    load_gsm8k_records,
    load_math_eval_sets,
    load_math_train_records,
    load_wikitext_lines,
    read_records,
    resolve_math_eval_dir,
    resolve_wikitext_files,
    tokenize_blocks,
    tokenize_supervised,
    wikitext_splits,
)
from hyclora.data import sources

from helpers.repo import SHARED_DATA


def shared(*parts):
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_bpe_tokenizer()


# -- synthetic generator -------------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _calc(expr: str) -> float:
    def ev(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise AssertionError(f"unexpected expression {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


def test_synthetic_problems_are_correct_and_deterministic():
    problems = arithmetic_word_problems("train", 300, seed=3)
    assert problems == arithmetic_word_problems("train", 300, seed=3)
    assert problems != arithmetic_word_problems("train", 300, seed=4)
    assert len({p["question"] for p in problems}) == 300
    for p in problems:
        steps = re.findall(r"<<([^=<>]+)=([^<>]+)>>", p["answer"])
        assert steps, p
        for expr, result in steps:
            assert _calc(expr) == float(result), (expr, result)
        # the final answer is the result of the last step, a non-negative integer
        assert gsm8k_gold(p["answer"]) == steps[-1][1]
        assert int(steps[-1][1]) >= 0


def test_synthetic_splits_are_disjoint_and_prefix_stable():
    train = arithmetic_word_problems("train", 500)
    test = arithmetic_word_problems("test", 60)
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert arithmetic_word_problems("train", 100) == train[:100]


@pytest.mark.parametrize("kwargs", [dict(split="dev"), dict(n=0), dict(test_fraction=1.0)])
def test_synthetic_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        arithmetic_word_problems(**{"split": "train", "n": 5, **kwargs})


def test_data_spec_synthetic_sizes():
    assert len(load_gsm8k_records("synthetic:37", "train")) == 37
    assert len(load_gsm8k_records("synthetic", "test")) == 200
    with pytest.raises(ValueError, match="synthetic:<number"):
        load_gsm8k_records("synthetic:many", "train")


# -- prompts and supervised tokenisation ---------------------------------------------------------
def test_gsm8k_prompt_and_target_format():
    answer = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024"
    assert gsm8k_prompt(" How many? ") == (
        "How many?\nAnswer the above question. First think step by step and then answer the final number.\n"
    )
    assert gsm8k_target(answer).endswith("clips.\nThe final answer is: 1,024")
    assert "<<" not in gsm8k_target(answer, strip_calc_annotations=True)
    assert gsm8k_gold(answer) == "1024"
    with pytest.raises(ValueError, match="####"):
        gsm8k_target("no final line")


def test_prompt_tokens_are_masked_and_target_ends_with_eos():
    tok = tokenizer()
    records = load_gsm8k_records("synthetic:20", "train")
    prompts, targets, _ = gsm8k_prompts_and_targets(records)
    ds = build_gsm8k_dataset(tok, records, max_length=512)
    assert len(ds) == 20
    for row, prompt, target in zip(ds, prompts, targets):
        prompt_ids = tok(prompt)["input_ids"]
        n = len(prompt_ids)
        assert row["input_ids"][:n] == prompt_ids
        assert row["labels"][:n] == [IGNORE_INDEX] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert row["labels"][-1] == tok.eos_token_id
        assert tok.decode(row["labels"][n:-1]) == target


def test_supervised_truncation_and_dropping():
    tok = tokenizer()
    long_prompt = "word " * 50
    ds = tokenize_supervised(tok, [long_prompt, "Q?"], ["A" * 200, "yes"], max_length=30)
    # the first prompt alone exceeds 30 tokens: dropped; the second fits whole
    assert len(ds) == 1
    assert tok.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX]) == "yes</s>"
    cut = tokenize_supervised(tok, ["Q?"], ["1 2 3 4 5 6 7 8 9 " * 5], max_length=12)
    assert len(cut[0]["input_ids"]) == 12
    with pytest.raises(ValueError, match="max_length"):
        tokenize_supervised(tok, [long_prompt], ["x"], max_length=10)
    with pytest.raises(ValueError, match="prompts"):
        tokenize_supervised(tok, ["a"], ["b", "c"], max_length=10)


# -- collator ------------------------------------------------------------------------------------
def test_collator_pads_labels_and_mask():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=4)(feats)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    left = CausalLMCollator(pad_token_id=0, padding_side="left")(feats)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].dtype == torch.long
    with pytest.raises(ValueError, match="labels"):
        CausalLMCollator(0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError):
        CausalLMCollator(0, padding_side="middle")


# -- WikiText ------------------------------------------------------------------------------------
def test_lm_blocks_are_a_contiguous_token_stream():
    tok = tokenizer()
    lines = [x for i in range(30) for x in (f" = Section {i} = ", f"Line {i} has {i * 7} words .")]
    ds = tokenize_blocks(tok, lines, block_size=16, chunk_chars=100)
    stream = tok("\n".join(lines) + "\n", add_special_tokens=False)["input_ids"]
    flat = [t for row in ds["input_ids"] for t in row]
    assert all(len(r) == 16 for r in ds["input_ids"])
    assert len(ds) == len(stream) // 16
    # pieces are cut at line breaks; byte-level BPE tokenises them identically to the whole text
    assert flat == stream[: len(flat)]
    assert ds["labels"] == ds["input_ids"]
    with pytest.raises(ValueError, match="fewer than one block"):
        tokenize_blocks(tok, ["short"], block_size=512)


def test_wikitext_folder_layouts(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "tokens").mkdir()
    for split in ("valid", "test"):
        (tmp_path / "tokens" / f"{split}.txt").write_text(f"{split} tokens\n")
    (tmp_path / "raw" / "wiki.test.raw").write_text("raw test\n")
    files = resolve_wikitext_files(tmp_path)
    # the variant with the most splits wins, so train and eval text are formatted alike
    assert files == {"validation": tmp_path / "tokens" / "valid.txt", "test": tmp_path / "tokens" / "test.txt"}
    train, evaluation, note = wikitext_splits(str(tmp_path))
    assert (train, evaluation) == (["valid tokens"], ["test tokens"])
    assert "VALIDATION" in note
    assert load_wikitext_lines(str(tmp_path), "test") == ["test tokens"]
    with pytest.raises(FileNotFoundError, match="train"):
        load_wikitext_lines(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no WikiText files"):
        resolve_wikitext_files(tmp_path / "nothing")


def test_wikitext_on_shared_data():
    folder = shared("wikitext-2")
    train, evaluation, note = wikitext_splits(str(folder))
    assert "no train split" in note and len(train) > 3000 and len(evaluation) > 4000
    assert any(line.startswith(" = ") for line in train)


# -- GSM8K files ---------------------------------------------------------------------------------
def test_gsm8k_local_folder_and_file(tmp_path):
    rows = arithmetic_word_problems("train", 5)
    with open(tmp_path / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (tmp_path / "test.json").write_text(json.dumps({"data": rows[:2]}))
    assert load_gsm8k_records(str(tmp_path), "train") == rows
    assert load_gsm8k_records(str(tmp_path), "test") == rows[:2]
    assert load_gsm8k_records(str(tmp_path / "train.jsonl"), "test") == rows
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_gsm8k_records(str(tmp_path / "bad"), "train")
    (tmp_path / "bad" / "train.jsonl").write_text('{"q": 1}\n')
    with pytest.raises(ValueError, match="question"):
        load_gsm8k_records(str(tmp_path / "bad"), "train")


def test_hub_failure_names_the_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="--data"):
        load_gsm8k_records("openai/gsm8k", "train")


def test_read_records_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    (tmp_path / "b.json").write_text('[{"x": 3}]')
    (tmp_path / "c.txt").write_text("x")
    (tmp_path / "d.jsonl").write_text('{"x": 1}\nnot json\n')
    assert read_records(tmp_path / "a.jsonl") == [{"x": 1}, {"x": 2}]
    assert read_records(tmp_path / "b.json") == [{"x": 3}]
    with pytest.raises(ValueError, match="unsupported"):
        read_records(tmp_path / "c.txt")
    with pytest.raises(ValueError, match="d.jsonl:2"):
        read_records(tmp_path / "d.jsonl")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.json")
    assert sources.synthetic_size("synthetic:12", 5) == 12


def test_gsm8k_on_shared_data():
    folder = shared("gsm8k")
    train = load_gsm8k_records(str(folder), "train")
    test = load_gsm8k_records(str(folder), "test")
    assert (len(train), len(test)) == (7473, 1319)
    ds = build_gsm8k_dataset(tokenizer(), test[:16], max_length=2048)  # byte-heavy BPE on real text
    assert len(ds) == 16
    assert all(row["labels"][-1] == tokenizer().eos_token_id for row in ds)


# -- arithmetic multitask ------------------------------------------------------------------------
def _llm_adapters_layout(root):
    problems = arithmetic_word_problems("train", 6)
    records = [
        {"instruction": p["question"], "input": "", "output": f"A: {p['answer'].splitlines()[0]} The answer is {gsm8k_gold(p['answer'])}.",
         "answer": gsm8k_gold(p["answer"]) + ".0"}
        for p in problems
    ]
    (root / "ft-training_set").mkdir(parents=True)
    (root / "ft-training_set" / "math_data.json").write_text(json.dumps(records + [dict(records[0], output="")]))
    for name, recs in (("gsm8k", records[:3]), ("AQuA", [dict(records[0], answer="C")])):
        (root / "dataset" / name).mkdir(parents=True)
        (root / "dataset" / name / "test.json").write_text(json.dumps(recs))
    return records


def test_math_layout(tmp_path):
    records = _llm_adapters_layout(tmp_path)
    train_file = tmp_path / "ft-training_set" / "math_data.json"
    assert load_math_train_records(str(tmp_path))[:6] == records  # folder -> its training file
    ds = build_math_dataset(tokenizer(), load_math_train_records(str(train_file)), max_length=256)
    assert len(ds) == 6  # the record without an output rationale is skipped
    eval_dir = resolve_math_eval_dir(str(train_file), None)
    assert eval_dir == tmp_path / "dataset"
    sets = load_math_eval_sets(eval_dir, ["gsm8k", "AQuA"], max_samples=2)
    assert [len(v) for v in sets.values()] == [2, 1]
    with pytest.raises(FileNotFoundError, match="SVAMP"):
        load_math_eval_sets(eval_dir, ["SVAMP"])
    with pytest.raises(FileNotFoundError, match="--eval_data"):
        resolve_math_eval_dir(str(tmp_path / "dataset" / "AQuA" / "test.json"), str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--data is required"):
        load_math_train_records(None)


def test_math_on_shared_data():
    root = shared("llm-adapters-math")
    train = load_math_train_records(str(root / "ft-training_set" / "math_data.json"))
    assert len(train) == 3260
    sets = load_math_eval_sets(resolve_math_eval_dir(str(root / "ft-training_set" / "math_data.json"), None))
    assert {k: len(v) for k, v in sets.items()} == {
        "gsm8k": 1319, "SVAMP": 1000, "mawps": 238, "AQuA": 254, "AddSub": 395,
        "MultiArith": 600, "SingleEq": 508,
    }


# -- tokenizers ----------------------------------------------------------------------------------
def test_bpe_tokenizer_roundtrip_and_determinism():
    tok = tokenizer()
    text = "Zoë paid $1,234.50 (−3 °C)\n#### 42 😀"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # digits are single tokens: arithmetic stays learnable for a tiny model
    assert [tok.decode([i]) for i in tok("2024", add_special_tokens=False)["input_ids"]] == list("2024")
    assert build_bpe_tokenizer().get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="260"):
        build_bpe_tokenizer(["x"], vocab_size=100)


def test_shared_llama_tokenizer_builds_gsm8k_examples():
    pytest.importorskip("sentencepiece", reason="the Llama SentencePiece tokenizer needs sentencepiece")
    pytest.importorskip("google.protobuf", reason="converting the SentencePiece tokenizer needs protobuf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared("tinyllamas-stories260K", "hf")))
    records = load_gsm8k_records("synthetic:4", "train")
    ds = build_gsm8k_dataset(tok, records, max_length=512)
    prompts, targets, _ = gsm8k_prompts_and_targets(records)
    for row, prompt in zip(ds, prompts):
        n = len(tok(prompt)["input_ids"])
        assert row["labels"][:n] == [IGNORE_INDEX] * n and row["labels"][-1] == tok.eos_token_id
