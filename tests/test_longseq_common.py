"""The long-sequence tests' shared pieces (tests/helpers/longseq.py) give a usable tokenizer."""

from helpers.longseq import long_docs_or_skip, test_tokenizer


def test_helpers_give_a_usable_tokenizer():
    long_docs_or_skip()
    tok = test_tokenizer()
    assert tok.eos_token_id is not None and tok.bos_token_id is not None
    ids = tok("Call me Ishmael.", add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) < 20 and tok.decode(ids).strip() == "Call me Ishmael."
