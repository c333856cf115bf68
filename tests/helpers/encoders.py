"""Tiny random RoBERTa/BERT sequence classifiers wrapped with PEFT LoRA, their batches, one
training step's gradients and the comparison of a patched model with HF+PEFT."""

from __future__ import annotations

import copy

import torch

import hyclora.models.roberta  # noqa: F401  (registers bert/roberta even without the package import)
from hyclora.config import HyCLoRAConfig
from hyclora.models import apply_hyclora, buffered_tensors

from helpers.models import draw_lora_b

ENCODER_TARGETS = ("query", "key", "value", "dense")


def tiny_encoder(kind: str = "roberta", impl: str = "eager", dropout: float = 0.0, dtype=torch.float32,
                 seed: int = 0, sharpen: float = 1.0, num_labels: int = 3, **overrides):
    """A 2-layer random RoBERTa/BERT sequence classifier (hidden 64, 4 heads, FFN 128).

    ``sharpen`` multiplies the query weights: random initialisation gives nearly uniform
    attention, unlike a trained encoder; compression tests use sharper maps."""
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    values = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=40, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, num_labels=num_labels,
                  pad_token_id=1 if kind == "roberta" else 0)
    values.update(overrides)
    torch.manual_seed(seed)
    if kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**values))
    elif kind == "bert":
        model = BertForSequenceClassification(BertConfig(**values))
    else:
        raise ValueError(kind)
    model.set_attn_implementation(impl)
    if sharpen != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("attention.self.query.weight"):
                    p.mul_(sharpen)
    return model.to(dtype)


def lora_encoder(model, targets=ENCODER_TARGETS, r: int = 4, alpha: int = 8, dropout: float = 0.0,
                 b_std: float = 0.05, seed: int = 1, train_layernorm: bool = False, train_embeddings: bool = False):
    """PEFT SEQ_CLS LoRA (the classification head is trainable, outside the layers), lora_B
    drawn non-zero so that lora_A gets gradients."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                          lora_dropout=dropout, task_type="SEQ_CLS"))
    draw_lora_b(pm, b_std, seed)
    for name, p in pm.named_parameters():
        if (train_layernorm and "encoder" in name and "LayerNorm" in name) or (
                train_embeddings and "word_embeddings" in name):
            p.requires_grad_(True)
    return pm


def encoder_batch(kind: str = "roberta", seed: int = 3, b: int = 3, s: int = 13, vocab: int = 100, num_labels: int = 3):
    gen = torch.Generator().manual_seed(seed)
    pad = 1 if kind == "roberta" else 0
    ids = torch.randint(3, vocab, (b, s), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    mask[-1, -7:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": torch.randint(0, num_labels, (b,), generator=gen)}
    if kind == "bert":  # sentence pairs
        batch["token_type_ids"] = (torch.arange(s) >= s // 2).long().expand(b, s).clone()
    return batch


def grads_of(model, batch, seed: int = 123):
    """One training step (global generator seeded first); returns (loss, {name: grad})."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.item(), grads


def compare_with_hf(model, batch, config, seed: int = 123):
    """Gradients of the unpatched copy and of the patched model, same seed."""
    ref = copy.deepcopy(model)
    loss_ref, g_ref = grads_of(ref, batch, seed)
    apply_hyclora(model, config)
    loss, g = grads_of(model, batch, seed)
    assert any(buffered_tensors(model).values()), "the compressed path was not taken"
    return loss, g, loss_ref, g_ref


BASELINE = HyCLoRAConfig(layer_type="baseline")
