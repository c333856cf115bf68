"""`make demo` runs hyclora.demo: its fine-tuning comparison end to end, shortened to a few steps."""

import math

import torch

from hyclora import demo


def test_demo_finetune_runs_both_rows_and_hyclora_buffers_less(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared CI runner
    try:
        results = demo.demo_finetune(steps=5, out_dir=str(tmp_path))  # bytes counted at step 3
    finally:
        torch.set_num_threads(threads)
    assert [name for name, _, _ in results] == ["PEFT LoRA", "hyclora intra_inter 4-bit"]
    for _, metrics, report in results:
        assert report is not None and report.total > 0  # the step's buffered bytes were measured
        assert math.isfinite(metrics["eval_loss"]) and metrics["tokens_per_s"] > 0
        assert 0.0 <= metrics["gsm8k_exact_match_strict"] <= 1.0
    # the decoder layers' buffers (the step's total also holds the embedding output and the LM
    # head's logits, which hyclora leaves alone and whose size follows the batch's padded length)
    lora_bytes, hy_bytes = (sum(r[2].layer_bytes()) for r in results)
    assert hy_bytes < lora_bytes / 5, (hy_bytes, lora_bytes)  # 4-bit intra_inter: measured 7.9x less
    out = capsys.readouterr().out
    assert "buffered/step" in out and "hyclora intra_inter 4-bit" in out
