"""launch/longseq.py with --use_hyclora --layer_type intra_inter and S²-Attn (the default): a 3-step
CPU run on a tiny random Llama, plain ``python`` (no launcher)."""

import json
import sys

from test_longseq_common import long_docs_or_skip, test_tokenizer
from test_longseq_launch import SCRIPT, _common_args, _env, _metrics, _run


def _three_hyclora_steps(tmp_path, *extra):
    """3 steps of launch/longseq.py with hyclora intra_inter 4-bit and S²-Attn; returns the summary."""
    long_docs_or_skip()
    common = _common_args(tmp_path, len(test_tokenizer()))
    common[common.index("--use_hyclora") + 1] = "true"
    common[common.index("--gradient_accumulation_steps") + 1] = "1"
    out = tmp_path / "run"
    proc = _run([sys.executable, str(SCRIPT), *common, "--layer_type", "intra_inter", "--q_bit", "4", *extra,
                 "--max_steps", "3", "--output_dir", str(out), "--save_adapter", "false"], _env())
    assert "S²-Attn on" in proc.stdout
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(5.0 < m["loss"] < 8.0 for m in metrics)  # random init, ~ln(512) = 6.24
    return json.loads((out / "summary.json").read_text())


def test_hyclora_intra_inter_with_s2attn_three_steps(tmp_path):
    summary = _three_hyclora_steps(tmp_path)
    assert summary["s2attn"] is True
    assert summary["hyclora"]["layer_type"] == "intra_inter" and summary["hyclora"]["q_bit"] == 4


def test_hyclora_with_checkpointing_and_8bit_boundaries_three_steps(tmp_path):
    summary = _three_hyclora_steps(tmp_path, "--gradient_checkpointing", "true", "--checkpoint_boundary_bits", "8")
    assert summary["gradient_checkpointing"] is True and summary["checkpoint_boundary_bits"] == 8
