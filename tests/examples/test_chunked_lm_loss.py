"""--chunked_lm_loss in the Trainer examples: training through hyclora's chunked cross-entropy
gives the model's own loss curve (gradient accumulation included); evaluation is unchanged."""

from __future__ import annotations

import pytest

from hyclora.training import parse_finetune_args, run_finetune

COMMON = ["--model_name_or_path", "tiny-random-llama", "--data", "synthetic:16", "--max_steps", "3",
          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--logging_steps", "1",
          "--max_eval_samples", "4", "--max_generate_samples", "0", "--progress", "false",
          "--save_strategy", "no", "--warmup_steps", "0", "--max_length", "256", "--use_hyclora", "false"]


def test_chunked_lm_loss_trains_like_the_model_loss(tmp_path):
    runs = {}
    for name, extra in [("model_loss", []), ("chunked", ["--chunked_lm_loss", "true"])]:
        args = parse_finetune_args("gsm8k", [*COMMON, "--output_dir", str(tmp_path / name), *extra])
        runs[name] = run_finetune(args)
    losses = {k: [loss for _, loss in m["loss_history"]] for k, m in runs.items()}
    assert len(losses["model_loss"]) == 3
    # same targets, same normalisation over the accumulated batch -> the same curve
    assert losses["chunked"] == pytest.approx(losses["model_loss"], abs=2e-4)
    assert runs["chunked"]["eval_loss"] == pytest.approx(runs["model_loss"]["eval_loss"], abs=2e-4)
