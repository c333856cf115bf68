"""End-to-end runs of launch/longseq.py on a tiny random Llama, on CPU.

* ``accelerate launch --config_file launch/cpu.yaml``: 4 optimizer steps (gradient accumulation 2)
  with S²-Attn, RoPE interpolation, checkpoints at steps 2 and 4, the adapter and a perplexity at
  the end; then ``python launch/longseq.py --resume_from_checkpoint`` from step 2 must reproduce
  steps 3 and 4 and the step-4 checkpoint. With hyclora on (the default), calibration statistics
  that recalibrate across the resume point included.
* ``accelerate launch --config_file launch/zero3_2gpu.yaml`` with 2 CPU processes (gloo,
  ``DS_ACCELERATOR=cpu``): the shipped DeepSpeed ZeRO-3 config runs, with the LM head (larger than
  DeepSpeed's persistence threshold, so it is really partitioned) gathered for the chunked loss.
"""

import json
import sys

import pytest

from helpers.longseq import (
    EVAL_DOC,
    SCRIPT,
    common_args,
    long_docs_or_skip,
    read_metrics,
    run_checked,
    script_env,
    test_tokenizer,
)
from helpers.repo import REPO


# hyclora on: statistics freeze after 1 counted forward (2 per step with accumulation 2) and
# expire after 1 more, so the resumed run must restore the count since freezing too; 5% outlier
# channels give the 64-wide norm inputs 3 exact channels (and every other statistic none).
HYCLORA_ON = ["--use_hyclora", "true", "--layer_type", "intra_inter", "--iteration_threshold", "1",
              "--recalibrate_every", "1", "--layernorm_outlier_ratio", "0.05"]


@pytest.mark.parametrize("hyclora", [False, True], ids=["plain_lora", "hyclora"])
def test_accelerate_cpu_run_checkpoint_and_resume(tmp_path, hyclora):
    long_docs_or_skip()
    vocab = len(test_tokenizer())
    common = common_args(tmp_path, vocab) + (HYCLORA_ON if hyclora else [])
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu.yaml")]
    proc = run_checked(launch + [str(SCRIPT), *common, "--max_steps", "4", "--s2attn", "true", "--output_dir", str(out),
                                 "--checkpointing_steps", "2", "--eval_files", str(EVAL_DOC), "--eval_stride", "128",
                                 "--eval_max_windows", "2"], script_env())
    assert "== summary ==" in proc.stdout and "host peak RSS" in proc.stdout

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(5.0 < m["loss"] < 8.0 for m in metrics)  # random init, ~ln(512) = 6.24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["s2attn"] is True and summary["rope_factor"] == 2.0
    assert (summary["hyclora"] is not None) == hyclora
    assert summary["eval"]["n_windows"] == 2 and 100 < summary["eval"]["perplexity"] < 5000
    assert summary["memory"]["per_rank"][0]["peak_rss_gib"] > 0
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and set(adapter_cfg["modules_to_save"]) == {"embed_tokens", "norm"}
    assert (out / "checkpoint-2" / "progress.json").is_file()

    # The adapter is a plain PEFT adapter: it loads onto a fresh base model, embeddings included.
    import peft
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tmp_path / "cfg")))
    loaded = peft.PeftModel.from_pretrained(base, str(out / "adapter"))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    emb_key = next(k for k in saved if "embed_tokens" in k)
    emb = loaded.get_base_model().model.embed_tokens.modules_to_save["default"].weight
    assert torch.equal(emb, saved[emb_key])

    # Resume from step 2 with plain `python` (no launcher): steps 3 and 4 are reproduced.
    ckpt = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    hyclora_keys = [k for k in ckpt if ".hyclora_state." in k]
    assert bool(hyclora_keys) == hyclora
    if hyclora:  # safetensors kept every statistic (it drops zero-element tensors: none saved)
        assert any(k.endswith("x_in.outlier_idx") and ckpt[k].numel() == 3 for k in hyclora_keys)
        assert any(k.endswith("stats.q.count") for k in hyclora_keys)
    out2 = tmp_path / "resumed"
    run_checked([sys.executable, str(SCRIPT), *common, "--max_steps", "4", "--s2attn", "true",
                 "--output_dir", str(out2), "--resume_from_checkpoint", str(out / "checkpoint-2"),
                 "--checkpointing_steps", "2", "--save_adapter", "false"], script_env())
    resumed = read_metrics(out2)
    assert [m["step"] for m in resumed] == [3, 4]
    for got, want in zip(resumed, metrics[2:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-6), got["step"]
    # ... and so is the state at step 4: the LoRA weights and hyclora's statistics
    final, final_resumed = (load_file(str(o / "checkpoint-4" / "model.safetensors")) for o in (out, out2))
    assert final.keys() == final_resumed.keys()
    for key, value in final.items():
        if value.is_floating_point():
            assert torch.allclose(final_resumed[key], value, rtol=1e-5, atol=1e-6), key
        else:  # counts, the count since freezing, outlier channels
            assert torch.equal(final_resumed[key], value), key
    if hyclora:
        assert any(k.endswith("frozen_forwards") and int(v) == 1 for k, v in final.items())


def test_deepspeed_zero3_two_cpu_processes(tmp_path):
    long_docs_or_skip()
    pytest.importorskip("deepspeed")
    # 2048 x 64 LM head > DeepSpeed's 1e5-element persistence threshold: it is partitioned.
    common = common_args(tmp_path, vocab=2048)
    out = tmp_path / "z3"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "launch" / "zero3_2gpu.yaml")]
    proc = run_checked(launch + [str(SCRIPT), *common, "--max_steps", "3", "--output_dir", str(out),
                                 "--eval_files", str(EVAL_DOC), "--eval_stride", "128", "--eval_max_windows", "1"],
                       script_env(DS_ACCELERATOR="cpu"), timeout=420)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(6.5 < m["loss"] < 9.0 for m in metrics)  # ~ln(2048) = 7.6 at random init
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and len(summary["memory"]["per_rank"]) == 2
    assert summary["s2attn"] is True and summary["eval"]["n_windows"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "== summary ==" in proc.stdout
