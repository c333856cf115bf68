"""Sliding-window perplexity (hyclora.eval.sliding_ppl) against direct computation on a tiny model."""

import math

import numpy as np
import pytest
import torch

from hyclora.eval.sliding_ppl import file_perplexity, sliding_window_perplexity, window_plan
from hyclora.integrations.longseq import enable_s2attn

from helpers.longseq import LONG_DOCS, test_tokenizer

transformers = pytest.importorskip("transformers")


def tiny_model(vocab=512):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def stream(n=700):
    """Real text tokens when the long documents are present, random ids otherwise."""
    book = LONG_DOCS / "pg19-books" / "43790_book_of_cats_ross.txt"
    if book.is_file():
        tok = test_tokenizer()
        ids = tok(book.read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"]
        assert len(ids) >= n
        return np.asarray(ids[:n])
    return np.random.default_rng(0).integers(0, 512, n)


def direct_nll(model, x, y):
    """Per-token NLL from full logits, the plain way."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(x)[None]).logits[0]
    return -torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(y)[:, None])[:, 0]


def test_window_plans():
    assert window_plan(10, 4, 2) == [(0, 4, 1), (2, 6, 3), (4, 8, 5)]
    assert window_plan(10, 4, 2, "strided") == [(0, 4, 1), (2, 6, 5), (4, 8, 7), (6, 9, 9)]
    # strided: every target 1..N-1 is scored exactly once, with at least L - stride context.
    rng = np.random.default_rng(1)
    for _ in range(50):
        n, ctx = int(rng.integers(2, 200)), int(rng.integers(1, 40))
        stride = int(rng.integers(1, ctx + 1))
        scored = []
        for b, e, first in window_plan(n, ctx, stride, "strided"):
            assert 0 <= b < e <= n - 1 and e - b <= ctx
            targets = list(range(max(first, b + 1), e + 1))
            scored += targets
            assert all(j - b >= min(ctx - stride, j) for j in targets)
        assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="fewer than one window"):
        window_plan(4, 4, 1)
    with pytest.raises(ValueError, match="stride"):
        window_plan(100, 4, 8, "strided")
    with pytest.raises(ValueError, match="mode"):
        window_plan(100, 4, 2, "hf")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_longlora_mode_equals_direct_computation(batch_size):
    model = tiny_model()
    t = stream()
    ctx, stride = 128, 96
    result = sliding_window_perplexity(model, t, context_length=ctx, stride=stride, batch_size=batch_size, chunk_size=50)
    losses = [direct_nll(model, t[i:i + ctx], t[i + 1:i + ctx + 1]).mean().item() for i in range(0, len(t) - ctx, stride)]
    assert result.n_windows == len(losses) == 6 and result.n_tokens == 6 * ctx
    assert result.perplexity == pytest.approx(math.exp(np.mean(losses)), rel=1e-10)
    assert 100 < result.perplexity < 5000  # a random model on a 512-token vocabulary: about uniform


def test_strided_mode_equals_direct_computation():
    model = tiny_model()
    t = stream(500)
    ctx, stride = 128, 48
    result = sliding_window_perplexity(model, t, context_length=ctx, stride=stride, mode="strided", batch_size=2)
    total, count, prev_end, begin = 0.0, 0, 0, 0
    while True:  # the transformers-docs scheme, written out with full logits
        end = min(begin + ctx, len(t) - 1)
        nll = direct_nll(model, t[begin:end], t[begin + 1:end + 1])
        new = end - prev_end
        total += nll[-new:].sum().item()
        count += new
        if end == len(t) - 1:
            break
        prev_end, begin = end, begin + stride
    assert result.n_tokens == count == len(t) - 1
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-10)
    # One window covering everything = the mean NLL of a single full forward.
    whole = sliding_window_perplexity(model, t[:200], context_length=512, stride=512, mode="strided")
    assert whole.nll == pytest.approx(direct_nll(model, t[:199], t[1:200]).mean().item(), rel=1e-10)


def test_eval_uses_full_attention_and_restores_training_mode():
    model = tiny_model()
    plain = sliding_window_perplexity(model, stream(400), context_length=128, stride=128)
    enable_s2attn(model)
    model.train()
    s2 = sliding_window_perplexity(model, stream(400), context_length=128, stride=128)
    assert model.training
    assert s2.perplexity == pytest.approx(plain.perplexity, rel=1e-12)


def test_file_perplexity_with_cache(tmp_path):
    if not LONG_DOCS.is_dir():
        pytest.skip("../shared/data/long-docs is absent")
    tok = test_tokenizer()
    model = tiny_model(vocab=max(512, len(tok)))
    path = LONG_DOCS / "proofpile-like-mathlib" / "topology_metric_space_basic.lean"
    result = file_perplexity(model, tok, [str(path)], cache_dir=tmp_path, context_length=64, stride=64, max_windows=5)
    assert len(list(tmp_path.glob("topology_metric_space_basic-*.npy"))) == 1
    again = file_perplexity(model, tok, [str(path)], cache_dir=tmp_path, context_length=64, stride=64, max_windows=5)
    assert again.perplexity == result.perplexity and result.n_windows == 5
    assert result.to_dict()["mode"] == "longlora"
