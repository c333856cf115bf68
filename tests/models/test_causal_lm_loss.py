"""HyCLoRAConfig.lm_loss: the causal-LM training loss in chunks through the LM head, inside the
model's own forward (hyclora.models.causal_lm_loss), against the model's own loss."""

import copy
import pickle

import pytest
import torch

from helpers.models import lora_model, tiny_model

from hyclora import HyCLoRAConfig, apply_hyclora, revert_hyclora
from hyclora.models.causal_lm_loss import ChunkedLossForward, uses_chunked_loss

pytest.importorskip("peft")

BASELINE = dict(layer_type="baseline")


def _batch(seed=3, b=3, s=13, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _pair(make=tiny_model, **config):
    """The same LoRA model twice: hyclora with the model's own loss and with ``lm_loss='auto'``."""
    own = apply_hyclora(lora_model(make()), HyCLoRAConfig(lm_loss="model", **{**BASELINE, **config}))
    chunked = apply_hyclora(lora_model(make()), HyCLoRAConfig(**{**BASELINE, **config}))
    return own, chunked


def _step(model, **batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(a, b, batch, rtol=2e-5, atol=1e-7):
    out_a, grads_a = _step(a, **batch)
    out_b, grads_b = _step(b, **batch)
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol, msg=name)
    return out_a, out_b


def test_default_is_chunked_and_matches_the_models_loss():
    own, chunked = _pair()
    assert HyCLoRAConfig().lm_loss == "auto"
    assert uses_chunked_loss(chunked) and not uses_chunked_loss(own)
    out_own, out_chunked = _assert_same_step(own, chunked, _batch())
    assert out_chunked.logits is None and out_own.logits is not None  # no full logits in training


@pytest.mark.parametrize("count", [7, "tensor"])
def test_num_items_in_batch_sums_and_divides_as_transformers(count):
    own, chunked = _pair()
    count = torch.tensor(11) if count == "tensor" else count
    _assert_same_step(own, chunked, {**_batch(), "num_items_in_batch": count})


def test_shift_labels_and_ignore_index_follow_transformers():
    own, chunked = _pair()
    batch = _batch()
    shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
    shifted[0, :5] = -100  # e.g. a prompt not trained on
    _assert_same_step(own, chunked, {**batch, "shift_labels": shifted})
    labels = batch["labels"].masked_fill(batch["labels"] < 10, -7)
    _assert_same_step(own, chunked, {**batch, "labels": labels, "ignore_index": -7})


def test_compressed_layers_with_chunked_loss_match_the_models_loss():
    own, chunked = _pair(layer_type="intra_inter", q_bit=8)
    # the same quantised layers under both losses: only the loss's rounding differs
    _assert_same_step(own, chunked, _batch(), rtol=1e-4, atol=1e-6)


def test_gemma_final_soft_capping():
    from test_gemma import tiny_gemma  # the Gemma tests' model (this folder is on sys.path)

    def make():
        return tiny_gemma("gemma3", final_logit_softcapping=2.0)

    own, chunked = _pair(make)
    assert uses_chunked_loss(chunked)
    _assert_same_step(own, chunked, _batch())


def test_other_calls_run_the_models_own_forward_unchanged():
    own, chunked = _pair()
    batch = _batch()
    # evaluation, no labels, logits_to_keep, tuple outputs: the class's forward, bit for bit
    for model in (own, chunked):
        model.eval()
    with torch.no_grad():
        a, b = own(**batch), chunked(**batch)
    assert b.logits is not None and torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    for model in (own, chunked):
        model.train()
    torch.testing.assert_close(chunked(input_ids=batch["input_ids"]).logits, own(input_ids=batch["input_ids"]).logits)
    kept = chunked(input_ids=batch["input_ids"], logits_to_keep=1)
    assert kept.logits is not None and kept.logits.shape[1] == 1
    with torch.no_grad():  # no gradient: the model's own forward
        assert chunked(**batch).logits is not None
    base = chunked.get_base_model()
    assert isinstance(base(batch["input_ids"], None, None, None, None, batch["labels"]).loss, torch.Tensor)
    assert base(batch["input_ids"], labels=batch["labels"]).logits is None  # positional input_ids bind by name


def test_forward_shows_the_models_signature():
    """transformers' Trainer keeps the dataset columns the forward names and passes
    num_items_in_batch to a forward with **kwargs: both read inspect.signature(model.forward)."""
    import inspect

    own, chunked = _pair()
    assert inspect.signature(chunked.get_base_model().forward) == inspect.signature(own.get_base_model().forward)


def test_sharded_head_falls_back_to_the_models_forward():
    _, chunked = _pair()
    head = chunked.get_base_model().lm_head
    head.weight.ds_id = 0  # as DeepSpeed ZeRO-3 marks its parameters: only lm_head.forward gathers it
    try:
        assert chunked(**_batch()).logits is not None
    finally:
        del head.weight.ds_id


def test_revert_and_model_loss_leave_the_class_forward():
    own, chunked = _pair()
    assert "forward" not in own.get_base_model().__dict__
    revert_hyclora(chunked)
    assert "forward" not in chunked.get_base_model().__dict__
    chunked.train()
    assert chunked(**_batch()).logits is not None


def test_patched_model_pickles_and_deep_copies():
    _, chunked = _pair()
    for clone in (copy.deepcopy(chunked), pickle.loads(pickle.dumps(chunked))):
        forward = clone.get_base_model().__dict__["forward"]
        assert isinstance(forward, ChunkedLossForward) and forward.model is clone.get_base_model()
        clone.train()
        assert clone(**_batch()).logits is None


def test_lora_on_the_lm_head_auto_keeps_the_models_loss_chunked_refuses(caplog):
    def make():
        return lora_model(tiny_model(), targets=("q_proj", "v_proj", "lm_head"))

    with caplog.at_level("INFO", logger="hyclora.models.api"):
        model = apply_hyclora(make(), HyCLoRAConfig(**BASELINE))
    assert not uses_chunked_loss(model)
    assert "keeps the model's own LM loss: The LM head carries a PEFT adapter" in caplog.text
    model.train()
    assert model(**_batch()).logits is not None
    fresh = make()
    with pytest.raises(ValueError, match="lm_loss='model'"):
        apply_hyclora(fresh, HyCLoRAConfig(lm_loss="chunked", **BASELINE))
    assert not any("_hyclora_patch" in m.__dict__ for m in fresh.modules())  # refused before patching


def test_a_head_with_its_own_forward_keeps_the_models_loss():
    class ScaledHead(torch.nn.Linear):  # e.g. a quantised Linear: weight @ hidden is not its output
        def forward(self, x):
            return super().forward(x) * 2.0

    model = lora_model(tiny_model())
    old = model.get_base_model().lm_head
    head = ScaledHead(old.in_features, old.out_features, bias=False)
    head.weight = old.weight
    model.get_base_model().lm_head = head
    assert not uses_chunked_loss(apply_hyclora(model, HyCLoRAConfig(**BASELINE)))


def test_encoder_keeps_its_loss_and_chunked_is_refused_by_name():
    from helpers.encoders import tiny_encoder
    from peft import LoraConfig, get_peft_model

    def make():
        return get_peft_model(tiny_encoder("roberta"), LoraConfig(r=4, target_modules=["query", "value"]))

    assert not uses_chunked_loss(apply_hyclora(make(), HyCLoRAConfig(**BASELINE)))
    with pytest.raises(ValueError, match="not a causal LM"):
        apply_hyclora(make(), HyCLoRAConfig(lm_loss="chunked", **BASELINE))


def test_config_refuses_an_unknown_lm_loss():
    with pytest.raises(ValueError, match="lm_loss='fused' is invalid: expected one of auto, chunked, model"):
        HyCLoRAConfig(lm_loss="fused")
