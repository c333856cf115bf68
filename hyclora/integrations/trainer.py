"""hyclora under ``transformers.Trainer`` and TRL's trainers (``SFTTrainer`` ...): one callback.

When the trainer wraps the model with PEFT itself (``SFTTrainer(model, peft_config=LoraConfig(...))``)
there is no LoRA model to pass to :func:`~hyclora.apply_hyclora` before the trainer exists. Pass
``callbacks=[HyCLoRACallback(cfg)]`` instead::

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                         peft_config=LoraConfig(...), callbacks=[HyCLoRACallback(HyCLoRAConfig(q_bit=4))])
    trainer.train()

The callback patches the trainer's model at the end of ``Trainer.__init__`` (``on_init_end``: the
PEFT model exists, and nothing of ``train()`` has run yet: gradient checkpointing, accelerate and
DeepSpeed set-up all see the patched model), or at ``on_train_begin`` when it was added later with
``trainer.add_callback``. A model that is already patched is left alone, so calling
``apply_hyclora(trainer.model, cfg)`` yourself after construction (equivalent, also tested) or
training twice is fine. Under DeepSpeed ZeRO-3 it also runs
:func:`hyclora.integrations.deepspeed.prepare_zero3`, which must happen before ``train()``.

With ``Trainer(model_init=...)`` callbacks only ever see the first model; apply hyclora inside
``model_init`` instead.
"""

from __future__ import annotations

from transformers import TrainerCallback

from hyclora.config import HyCLoRAConfig


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the deepspeed integration
        return False
    return bool(is_deepspeed_zero3_enabled())


class HyCLoRACallback(TrainerCallback):
    """Apply hyclora (``config``, default ``HyCLoRAConfig()``) to the model a Trainer trains.

    ``config.use_hyclora=False`` makes it a no-op. Attribute ``applied`` is True once this
    callback has patched the model.
    """

    def __init__(self, config: HyCLoRAConfig | None = None):
        config = HyCLoRAConfig() if config is None else config
        if not isinstance(config, HyCLoRAConfig):
            raise TypeError(f"hyclora: HyCLoRACallback needs a HyCLoRAConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.applied = False

    def _apply(self, model, late: bool) -> None:
        if model is None or not self.config.use_hyclora:
            return
        from hyclora.models.api import apply_hyclora, is_patched

        if is_patched(model):
            return
        zero3 = _zero3_enabled()
        if late and zero3:
            raise RuntimeError(
                "hyclora: under DeepSpeed ZeRO-3 the model must be patched before Trainer.train() wraps it. "
                "Pass HyCLoRACallback in the trainer's callbacks=[...] at construction, or call "
                "apply_hyclora(trainer.model, cfg) and hyclora.integrations.deepspeed.prepare_zero3(trainer.model) "
                "before trainer.train()."
            )
        apply_hyclora(model, self.config)
        if zero3:
            from hyclora.integrations.deepspeed import prepare_zero3

            prepare_zero3(model)
        self.applied = True

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._apply(model, late=False)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, late=True)


__all__ = ["HyCLoRACallback"]
