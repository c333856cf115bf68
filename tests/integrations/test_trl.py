"""hyclora under TRL's SFTTrainer, the way most LoRA users fine-tune (tiny random Llama, CPU).

* (a) the user applies PEFT and hyclora, then hands the model to SFTTrainer; (b) SFTTrainer applies
  PEFT itself (``peft_config=``) and ``HyCLoRACallback`` (or ``apply_hyclora(trainer.model)``
  after construction) patches the result. With compression off (``layer_type="baseline"``: hyclora's
  own backward, nothing compressed) the per-step losses and LoRA gradients equal the unpatched
  SFTTrainer run to fp32 rounding; a compressed run (intra_inter, 8 bits) stays close while its
  gradients really differ, its layers are patched and their compressed forward ran once per step.
* packing (BFD: padding-free rows with restarting position_ids) and padding_free, sdpa and eager:
  transformers builds a block-diagonal mask from the position_ids; hyclora's path gives the same
  losses and gradients as the unpatched run.
* TRL's default gradient checkpointing (``SFTConfig.gradient_checkpointing`` defaults to True):
  hyclora's decoder layers are recomputed in the backward (checkpointing is really on).

The gradients are read at ``on_pre_optimizer_step`` and the optimizer is plain SGD: Adam divides
by the gradient's running RMS, which would turn rounding-level differences of near-zero entries
into lr-sized ones and make a tight comparison of later steps meaningless.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Dict, List

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hyclora import HyCLoRAConfig, apply_hyclora  # noqa: E402
from hyclora.data import build_bpe_tokenizer  # noqa: E402
from hyclora.integrations.trainer import HyCLoRACallback  # noqa: E402
from hyclora.models.api import is_patched, patched_layers  # noqa: E402
from hyclora.training import build_tiny_llama  # noqa: E402

from helpers.repo import REPO  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3
LAYERS = 2  # build_tiny_llama
BASELINE = dict(layer_type="baseline")
COMPRESSED = dict(layer_type="intra_inter", q_bit=8)
# documents of 10-60 tokens: padded batches, and several documents per packed row of 64 tokens
TEXTS = [
    f"Tom has {i} apples and buys {i + 3} more. Now he has {2 * i + 3} apples." * (1 + i % 3)
    for i in range(16)
]


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_bpe_tokenizer()


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


class GradRecorder(TrainerCallback):
    """The LoRA gradients of every optimizer step (after clipping, before the update)."""

    def __init__(self):
        self.grads: List[Dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if "lora_" in n and p.grad is not None})


@dataclass
class Run:
    losses: List[float]
    grads: List[Dict[str, torch.Tensor]]
    trainer: SFTTrainer = field(repr=False)


def train(tmp_path, hyclora=None, *, how="callback", impl="sdpa", callbacks=(), late_callbacks=(), **config) -> Run:
    """SFTTrainer on TEXTS for STEPS steps: ``how`` is ``callback`` (peft_config= and
    HyCLoRACallback), ``apply`` (peft_config=, then apply_hyclora(trainer.model)),
    ``add_callback`` (trainer.add_callback after construction: applied at on_train_begin) or
    ``user_peft`` (get_peft_model + apply_hyclora before SFTTrainer). ``hyclora``: a dict of
    HyCLoRAConfig fields, None for the unpatched run. ``late_callbacks`` are added after that."""
    values = dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4,
                  learning_rate=5e-2, optim="sgd", logging_steps=1, report_to="none", bf16=False,
                  save_strategy="no", max_length=64, disable_tqdm=True, use_cpu=True, seed=0)
    values.update(config)
    args = SFTConfig(**values)
    tok = tokenizer()
    torch.manual_seed(0)
    model = build_tiny_llama(tok, attn_implementation=impl)
    cfg = None if hyclora is None else HyCLoRAConfig(**hyclora)
    recorder = GradRecorder()
    callbacks = [recorder, *callbacks]
    peft_config = lora_config()
    if how == "user_peft":
        torch.manual_seed(1)  # lora_A's initialisation
        model = get_peft_model(model, peft_config)
        peft_config = None
        if cfg is not None:
            apply_hyclora(model, cfg)
    elif how == "callback" and cfg is not None:
        callbacks.append(HyCLoRACallback(cfg))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tok, peft_config=peft_config, callbacks=callbacks)
    if cfg is not None and how == "apply":
        apply_hyclora(trainer.model, cfg)
    elif cfg is not None and how == "add_callback":
        trainer.add_callback(HyCLoRACallback(cfg))
    for callback in late_callbacks:
        trainer.add_callback(callback)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == STEPS and len(recorder.grads) == STEPS
    return Run(losses, recorder.grads, trainer)


_REFERENCES: Dict[tuple, Run] = {}


def reference(tmp_path, how="callback", impl="sdpa", **config) -> Run:
    """The unpatched run (cached: several tests compare against the same one)."""
    key = (how == "user_peft", impl, tuple(sorted(config.items())))
    if key not in _REFERENCES:
        run = train(tmp_path, None, how=how, impl=impl, **config)
        assert not is_patched(run.trainer.model)
        for step in run.grads[1:]:  # lora_B starts at zero: lora_A has gradients from step 2
            assert all(g.abs().max() > 0 for g in step.values())
        run.trainer = None
        _REFERENCES[key] = run
    return _REFERENCES[key]


def assert_same_run(got: Run, ref: Run):
    """Losses and LoRA gradients of every step equal to fp32 rounding."""
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    for step, (g_step, r_step) in enumerate(zip(got.grads, ref.grads), 1):
        assert g_step.keys() == r_step.keys() and len(r_step) == 7 * 2 * LAYERS
        for name, r in r_step.items():
            torch.testing.assert_close(g_step[name], r, rtol=1e-4, atol=1e-5 * float(r.abs().max()) + 1e-12,
                                       msg=lambda m: f"step {step} {name}: {m}")


def assert_hyclora_ran(run: Run, compresses: bool):
    """Every decoder layer patched, and hyclora's training forward counted once per step."""
    layers = [(n, m) for n, m in patched_layers(run.trainer.model) if "hyclora_state" in m._modules]
    assert len(layers) == LAYERS
    for name, layer in layers:
        assert int(layer.hyclora_state.forward_count) == STEPS, name
        assert bool(len(layer.hyclora_state.stats)) == compresses, name


def max_rel_diff(got: Run, ref: Run) -> float:
    return max(float((g[n] - r[n]).abs().max() / r[n].abs().max().clamp_min(1e-30))
               for g, r in zip(got.grads, ref.grads) for n in r)


def cosine(got: Run, ref: Run) -> float:
    a = torch.cat([g[n].flatten() for g in got.grads for n in sorted(g)]).double()
    b = torch.cat([r[n].flatten() for r in ref.grads for n in sorted(r)]).double()
    return float(a @ b / (a.norm() * b.norm()))


# -- (a) user PEFT + apply_hyclora, (b) peft_config= + callback / apply after construction -----------
@pytest.mark.parametrize("how", ["user_peft", "callback", "apply", "add_callback"])
def test_baseline_equals_unpatched_sft(tmp_path, how):
    run = train(tmp_path, BASELINE, how=how)
    assert_hyclora_ran(run, compresses=False)
    assert_same_run(run, reference(tmp_path, how=how))
    # TRL's fused LM head computes SFT's loss without logits in every order: lm_loss="auto" leaves
    # a forward TRL replaced alone, and TRL's wrapper bypasses ours when hyclora came first
    from hyclora.models.causal_lm_loss import uses_chunked_loss

    assert not uses_chunked_loss(run.trainer.model)


def test_compressed_run_is_close_and_really_compressed(tmp_path):
    ref = reference(tmp_path)
    callback = HyCLoRACallback(HyCLoRAConfig(**COMPRESSED))
    run = train(tmp_path, None, callbacks=[callback])
    assert callback.applied
    assert_hyclora_ran(run, compresses=True)
    # forwards are exact, only the saved copies are lossy: losses move by at most 1e-3 in 3 steps
    assert max(abs(a - b) for a, b in zip(run.losses, ref.losses)) < 1e-3
    # ... while the gradients carry the 8-bit quantisation error (baseline: ~4e-7), yet point the same way
    assert max_rel_diff(run, ref) > 1e-4
    assert cosine(run, ref) > 0.999


def test_callback_leaves_a_patched_model_alone(tmp_path):
    callback = HyCLoRACallback(HyCLoRAConfig(**COMPRESSED))
    run = train(tmp_path, BASELINE, how="apply", late_callbacks=[callback])
    assert not callback.applied  # on_train_begin found the model already patched
    assert_hyclora_ran(run, compresses=False)
    with pytest.raises(TypeError, match="HyCLoRAConfig"):
        HyCLoRACallback({"q_bit": 4})
    off = HyCLoRACallback(HyCLoRAConfig(use_hyclora=False))
    off.on_train_begin(None, None, None, model=run.trainer.model)
    assert not off.applied


# -- packing and padding-free ---------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["packing", "padding_free"])
def test_packed_and_padding_free_batches(tmp_path, mode, impl):
    config = dict(packing=True) if mode == "packing" else dict(padding_free=True, max_length=None)
    ref = reference(tmp_path, impl=impl, **config)
    run = train(tmp_path, BASELINE, impl=impl, **config)
    data = run.trainer.train_dataset
    if mode == "packing":  # BFD packing: several documents per row, so padding-free batches
        assert run.trainer.padding_free and any(len(s) > 1 for s in data["seq_lengths"])
    batch = run.trainer.data_collator([data[i] for i in range(4)])
    assert "attention_mask" not in batch and int((batch["position_ids"][0] == 0).sum()) > 1
    assert_hyclora_ran(run, compresses=False)
    assert_same_run(run, ref)
    if mode == "padding_free":
        # the same documents as the padded batches: the first step's loss is the padded one, so the
        # documents of a flattened row really are kept apart (block-diagonal mask)
        assert run.losses[0] == pytest.approx(reference(tmp_path, impl=impl).losses[0], rel=1e-5)


# -- TRL's default gradient checkpointing ---------------------------------------------------------
class RecomputeCounter(TrainerCallback):
    """Counts, per patched decoder layer, the checkpointed calls in the forward and the calls of the
    checkpointed function inside the backward (the recomputes).

    It wraps the ``_gradient_checkpointing_func`` that ``gradient_checkpointing_enable`` gives every
    ``GradientCheckpointingLayer`` (at ``on_train_begin``, after the Trainer enabled it). Module
    hooks would not do: from transformers 5.23 the checkpoint wraps ``forward``, not ``__call__``,
    so the recompute runs no hooks; and hyclora's forward_count does not count recomputes.
    """

    def __init__(self):
        self.forward = 0
        self.recomputes = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for _, layer in patched_layers(model):
            if "hyclora_state" not in layer._modules:
                continue  # the final norm
            checkpoint = layer.__dict__.get("_gradient_checkpointing_func")
            assert checkpoint is not None, "gradient checkpointing was not enabled on the decoder layers"

            def counting(function, *args, _checkpoint=checkpoint, **kwargs):
                self.forward += 1

                def recompute(*a, **k):
                    if torch._C._current_graph_task_id() != -1:  # inside the backward
                        self.recomputes += 1
                    return function(*a, **k)

                return _checkpoint(recompute, *args, **kwargs)

            layer._gradient_checkpointing_func = counting


def test_default_gradient_checkpointing_recomputes_hyclora_layers(tmp_path):
    """Fails while hyclora's patch shadows transformers >= 5.23's class-level checkpointing
    wrapper (checkpointing then silently off); passes on 5.17 and with the class-swap patch."""
    assert SFTConfig(output_dir=str(tmp_path), bf16=False).gradient_checkpointing is True  # TRL's default
    counter = RecomputeCounter()
    run = train(tmp_path, COMPRESSED, callbacks=[counter])  # gradient_checkpointing left at TRL's default
    assert run.trainer.args.gradient_checkpointing
    assert_hyclora_ran(run, compresses=True)
    assert counter.forward == LAYERS * STEPS, "the decoder layers were not run through the checkpoint"
    assert counter.recomputes == LAYERS * STEPS, "hyclora's decoder layers were not recomputed in the backward"
    # the recompute replays the step's quantisation: the same run as without checkpointing
    assert_same_run(run, train(tmp_path, COMPRESSED, gradient_checkpointing=False))


# -- examples/trl_sft.py --------------------------------------------------------------------------
def test_example_trl_sft_two_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("trl_sft_example", REPO / "examples" / "trl_sft.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "adapter"
    trainer, result = example.main([
        "--model_name_or_path", "tiny-random-llama", "--dataset", "synthetic:8", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--max_length", "64", "--output_dir", str(out),
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
        "--layer_type", "intra_inter", "--q_bit", "8",
    ])
    assert math.isfinite(result.training_loss) and result.global_step == 2
    layers = [m for _, m in patched_layers(trainer.model) if "hyclora_state" in m._modules]
    assert len(layers) == LAYERS and all(int(m.hyclora_state.forward_count) == 2 for m in layers)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
