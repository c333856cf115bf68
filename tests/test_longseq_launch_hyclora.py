"""launch/longseq.py with --use_hyclora and S²-Attn (the default) on a tiny random Llama, on the
CPU: 3-step runs (plain ``python``; with checkpointing and 8-bit boundaries; under ``accelerate
launch`` with ZeRO-3 on 2 processes), ``--cuda_graphs`` through an emulated capture (same losses
as eager) and its refusals."""

import json
import sys

import pytest

from helpers.longseq import (
    SCRIPT,
    common_args,
    long_docs_or_skip,
    read_metrics,
    run_checked,
    script_env,
    test_tokenizer,
)


def _three_hyclora_steps(tmp_path, *extra):
    """3 steps of launch/longseq.py with hyclora intra_inter 4-bit and S²-Attn; returns the summary."""
    long_docs_or_skip()
    common = common_args(tmp_path, len(test_tokenizer()))
    common[common.index("--use_hyclora") + 1] = "true"
    common[common.index("--gradient_accumulation_steps") + 1] = "1"
    out = tmp_path / "run"
    proc = run_checked([sys.executable, str(SCRIPT), *common, "--layer_type", "intra_inter", "--q_bit", "4", *extra,
                        "--max_steps", "3", "--output_dir", str(out), "--save_adapter", "false"], script_env())
    assert "S²-Attn on" in proc.stdout
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(5.0 < m["loss"] < 8.0 for m in metrics)  # random init, ~ln(512) = 6.24
    return json.loads((out / "summary.json").read_text())


def test_hyclora_intra_inter_with_s2attn_three_steps(tmp_path):
    summary = _three_hyclora_steps(tmp_path)
    assert summary["s2attn"] is True
    assert summary["hyclora"]["layer_type"] == "intra_inter" and summary["hyclora"]["q_bit"] == 4


def test_hyclora_with_checkpointing_and_8bit_boundaries_three_steps(tmp_path):
    summary = _three_hyclora_steps(tmp_path, "--activation_checkpointing", "true", "--checkpoint_boundary_bits", "8")
    assert summary["gradient_checkpointing"] is True and summary["checkpoint_boundary_bits"] == 8


@pytest.mark.parametrize("flag", ["--activation_checkpointing", "--gradient_checkpointing"])
def test_checkpointing_switch_has_both_spellings(flag):
    """The Trainer examples' spelling; --gradient_checkpointing (the name before transformers 5.23) stays an alias."""
    parse = _launcher_module().parse_args
    base = ["--config_name", "c", "--tokenizer_name", "t", "--dataset", "d", "--output_dir", "o"]
    assert parse([*base, flag, "true"]).gradient_checkpointing is True
    assert parse(base).gradient_checkpointing is False


# -- --cuda_graphs ---------------------------------------------------------------------------------
def _launcher_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hyclora_launch_longseq", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_process(tmp_path, name, *extra, accumulation=1):
    """4 steps of launch/longseq.py's main() in this process (hyclora full_fuse 4-bit, S²-Attn)."""
    from accelerate.state import AcceleratorState

    long_docs_or_skip()
    common = common_args(tmp_path, len(test_tokenizer()))
    common[common.index("--use_hyclora") + 1] = "true"
    common[common.index("--gradient_accumulation_steps") + 1] = str(accumulation)
    out = tmp_path / name
    AcceleratorState._reset_state(True)  # each main() builds its own Accelerator
    try:
        summary = _launcher_module().main([
            *common, "--layer_type", "intra_inter_full_fuse", "--q_bit", "4", "--iteration_threshold", "2",
            "--max_steps", "4", "--seed", "3", "--output_dir", str(out),
            "--save_adapter", "false", *extra])
    finally:
        AcceleratorState._reset_state(True)
    return summary, [m["loss"] for m in read_metrics(out)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_cuda_graphs_flag_replays_the_layers_and_keeps_the_losses(tmp_path, monkeypatch, capsys, accumulation):
    # CPU: the layer chain with an emulated capture (tests/helpers/graph_emulation.py); on a GPU the flag
    # captures real graphs. Replays compute what the eager layers compute: the same losses.
    import hyclora.cuda_graphs as cuda_graphs

    from helpers.graph_emulation import chain_grapher

    made = []

    def fake_graph_decoder_layers(model, **kw):
        made.append(cuda_graphs.DecoderLayerGraphs(model, _grapher=chain_grapher, **kw))
        return made[-1]

    _, eager_losses = _in_process(tmp_path, "eager", accumulation=accumulation)
    monkeypatch.setattr(cuda_graphs, "graph_decoder_layers", fake_graph_decoder_layers)
    summary, graphed_losses = _in_process(tmp_path, "graphed", "--cuda_graphs", "true", accumulation=accumulation)
    counts = summary["cuda_graphs"]
    # 2 layers: the first forward calibrates eagerly (quick calibration), the second captures; it and all
    # later ones replay
    replays = 4 * accumulation * 2 - 2
    assert counts["capture"] == 1 and counts["replay"] == replays and counts["eager: statistics calibrating"] == 2, counts
    assert made and made[0]._removed  # removed before saving/evaluating
    assert f"CUDA graphs: {replays} decoder-layer calls replayed, 1 capture(s)" in capsys.readouterr().out
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-6, abs=0)


@pytest.mark.parametrize("extra, message", [
    (("--use_hyclora", "false"), "pass --use_hyclora true"),
    (("--gradient_checkpointing", "true"), "drop --gradient_checkpointing"),
    (("--separate_documents", "true"), "--separate_documents gives every row"),
])
def test_cuda_graphs_flag_refuses_what_cannot_replay(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        _in_process(tmp_path, "refused", "--cuda_graphs", "true", *extra)


def test_zero3_two_cpu_processes_with_hyclora_and_compressed_boundaries(tmp_path):
    # the configuration of benchmarks/run_gpu_longseq_zero3.sh (2 ranks, ZeRO-3, hyclora full_fuse
    # 2-bit, checkpointing with 8-bit boundaries), on 2 CPU processes (gloo)
    long_docs_or_skip()
    pytest.importorskip("deepspeed")
    common = common_args(tmp_path, len(test_tokenizer()))
    common[common.index("--use_hyclora") + 1] = "true"
    out = tmp_path / "z3"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(SCRIPT.parents[1] / "launch" / "zero3_2gpu.yaml")]
    run_checked(launch + [str(SCRIPT), *common, "--layer_type", "intra_inter_full_fuse", "--q_bit", "2",
                          "--gradient_checkpointing", "true", "--checkpoint_boundary_bits", "8", "--max_steps", "3",
                          "--output_dir", str(out), "--save_adapter", "false"],
                script_env(DS_ACCELERATOR="cpu"), timeout=420)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(5.0 < m["loss"] < 8.0 for m in metrics)  # random init, ~ln(512) = 6.24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and len(summary["memory"]["per_rank"]) == 2
    assert summary["hyclora"]["layer_type"] == "intra_inter_full_fuse" and summary["checkpoint_boundary_bits"] == 8
