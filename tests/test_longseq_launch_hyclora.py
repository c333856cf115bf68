"""launch/longseq.py with --use_hyclora --layer_type intra_inter and S²-Attn (the default): a 3-step
CPU run on a tiny random Llama, plain ``python`` (no launcher)."""

import json
import sys

from test_longseq_common import long_docs_or_skip, test_tokenizer
from test_longseq_launch import SCRIPT, _common_args, _env, _metrics, _run


def test_hyclora_intra_inter_with_s2attn_three_steps(tmp_path):
    long_docs_or_skip()
    common = _common_args(tmp_path, len(test_tokenizer()))
    common[common.index("--use_hyclora") + 1] = "true"
    common[common.index("--gradient_accumulation_steps") + 1] = "1"
    out = tmp_path / "run"
    proc = _run([sys.executable, str(SCRIPT), *common, "--layer_type", "intra_inter", "--q_bit", "4",
                 "--max_steps", "3", "--output_dir", str(out), "--save_adapter", "false"], _env())
    assert "S²-Attn on" in proc.stdout
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(5.0 < m["loss"] < 8.0 for m in metrics)  # random init, ~ln(512) = 6.24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["s2attn"] is True
    assert summary["hyclora"]["layer_type"] == "intra_inter" and summary["hyclora"]["q_bit"] == 4


def test_hyclora_with_checkpointing_and_8bit_boundaries_three_steps(tmp_path):
    long_docs_or_skip()
    common = _common_args(tmp_path, len(test_tokenizer()))
    common[common.index("--use_hyclora") + 1] = "true"
    common[common.index("--gradient_accumulation_steps") + 1] = "1"
    out = tmp_path / "run"
    proc = _run([sys.executable, str(SCRIPT), *common, "--layer_type", "intra_inter", "--q_bit", "4",
                 "--gradient_checkpointing", "true", "--checkpoint_boundary_bits", "8",
                 "--max_steps", "3", "--output_dir", str(out), "--save_adapter", "false"], _env())
    assert "S²-Attn on" in proc.stdout
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(5.0 < m["loss"] < 8.0 for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gradient_checkpointing"] is True and summary["checkpoint_boundary_bits"] == 8
