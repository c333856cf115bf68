"""Batched left-padded greedy generation, perplexity, and the harness's tables and JSON."""

import functools
import json
import math

import pytest
import torch

from hyclora.data import CausalLMCollator, build_bpe_tokenizer, load_gsm8k_records
from hyclora.eval import harness
from hyclora.eval.generation import generate_greedy, perplexity, truncate_at_stops
from hyclora.training.model import build_tiny_llama


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_bpe_tokenizer()


@functools.lru_cache(maxsize=1)
def model():
    torch.manual_seed(0)
    return build_tiny_llama(tokenizer()).eval()


PROMPTS = [
    "Tom has 3 apples.",
    "Ava shares 36 marbles equally among 4 friends and keeps none for herself.",
    "Hi",
    "Max buys 7 boxes of pens.",
]


def test_batched_left_padded_generation_matches_one_by_one():
    m, tok = model(), tokenizer()
    batched = generate_greedy(m, tok, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    single = [generate_greedy(m, tok, [p], max_new_tokens=10, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(text) > 0 for text in batched)
    # uneven batches come back in input order too
    assert generate_greedy(m, tok, PROMPTS, max_new_tokens=10, batch_size=3, progress=False) == single
    assert tok.padding_side == "right" and m.training is False  # restored


def test_generation_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_size"):
        generate_greedy(model(), tokenizer(), ["x"], batch_size=0)
    assert generate_greedy(model(), tokenizer(), [], progress=False) == []


def test_truncate_at_stops():
    assert truncate_at_stops("42\nQuestion: next", ["Question:"]) == "42\n"
    assert truncate_at_stops("a### Instruction:b</s>", ["</s>", "### Instruction:"]) == "a"
    assert truncate_at_stops("plain", ["", "zzz"]) == "plain"


def test_perplexity_is_token_weighted_and_matches_hf_loss():
    m, tok = model(), tokenizer()
    rows = [tok(t)["input_ids"] for t in ("Tom has 3 apples and 4 pears.", "Hi there")]
    dataset = [{"input_ids": r, "labels": list(r)} for r in rows]
    out = perplexity(m, dataset, batch_size=2, pad_token_id=tok.pad_token_id, progress=False)
    # reference: HF's mean loss per row (no padding), weighted by each row's scored tokens
    with torch.no_grad():
        nll = [m(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss.item() * (len(r) - 1) for r in rows]
    tokens = sum(len(r) - 1 for r in rows)
    assert out["tokens"] == tokens
    assert out["loss"] == pytest.approx(sum(nll) / tokens, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-9)
    # masked labels are not scored
    masked = [{"input_ids": rows[0], "labels": [-100] * 4 + rows[0][4:]}]
    assert perplexity(m, masked, pad_token_id=0, progress=False)["tokens"] == len(rows[0]) - 4


def test_evaluate_gsm8k_wiring(monkeypatch):
    records = load_gsm8k_records("synthetic:3", "train")
    golds = [r["answer"].split("####")[-1].strip() for r in records]
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen["prompts"], seen["kwargs"] = prompts, kwargs
        return [f"The final answer is: {golds[0]}", "I have no idea", f"so {golds[2]}"]

    monkeypatch.setattr(harness, "generate_greedy", fake_generate)
    results, preds = harness.evaluate_gsm8k(None, tokenizer(), records, max_new_tokens=7, batch_size=2)
    assert seen["prompts"][0].startswith(records[0]["question"])
    assert seen["kwargs"]["max_new_tokens"] == 7 and seen["kwargs"]["batch_size"] == 2
    assert results["gsm8k"]["n"] == 3
    assert results["gsm8k"]["exact_match_strict"] == pytest.approx(1 / 3)
    assert results["gsm8k"]["exact_match_flexible"] == pytest.approx(2 / 3)
    assert [p["gold"] for p in preds] == golds


def test_evaluate_math_sets_average(monkeypatch):
    sets = {
        "gsm8k": [{"instruction": "1+1?", "answer": "2.0"}, {"instruction": "2+2?", "answer": "4.0"}],
        "AQuA": [{"instruction": "Pick", "answer": "B"}],
    }
    outputs = iter([["The answer is 2.", "The answer is 5."], ["The answer is (B)."]])
    monkeypatch.setattr(harness, "generate_greedy", lambda *a, **k: next(outputs))
    results, preds = harness.evaluate_math_sets(None, None, sets)
    assert results["gsm8k"]["accuracy"] == 0.5 and results["AQuA"]["accuracy"] == 1.0
    assert results["average"]["accuracy"] == pytest.approx(0.75)  # mean over sets, as in the paper
    assert [p["dataset"] for p in preds] == ["gsm8k", "gsm8k", "AQuA"]


def test_table_and_results_file(tmp_path):
    results = {"gsm8k": {"exact_match_strict": 0.125, "accuracy": 0.25, "n": 8},
               "wikitext2": {"loss": 2.0, "perplexity": math.exp(2.0), "n": 3}}
    table = harness.format_table(results, title="demo")
    lines = table.splitlines()
    assert lines[0] == "demo" and "accuracy %" in lines[1]
    assert "12.50" in table and "25.00" in table and "7.3891" in table
    path = tmp_path / "sub" / "results.json"
    harness.write_results(str(path), {"results": results}, [{"prediction": "7"}])
    assert json.loads(path.read_text())["results"]["gsm8k"]["n"] == 8
    assert (tmp_path / "sub" / "results.predictions.jsonl").read_text() == '{"prediction": "7"}\n'


def test_collator_is_what_perplexity_uses():
    # perplexity pads with CausalLMCollator: padded positions must carry label -100
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["labels"][1].tolist() == [4, -100, -100]
