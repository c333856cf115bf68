"""The examples' activation-checkpointing switches (--activation_checkpointing true, its alias
--gradient_checkpointing, --checkpointing_backend, --checkpoint_every_k): that they parse on the
installed transformers (5.23 added its own --activation_checkpointing), how ``auto`` resolves,
that Trainer does not re-enable HF's checkpointing over hyclora's, that a checkpointed 3-step
Trainer run has the same per-step losses as the uncheckpointed one (hyclora baseline: nothing compressed, so the recompute is exact), and that a
saved-tensor probe sees fewer buffered bytes with checkpointing. The DeepSpeed mode runs
examples/gsm8k.py with --deepspeed ds_configs/zero2_actckpt.json in one CPU process (gloo)."""

import importlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from hyclora.memory import measure_saved_tensors
from hyclora.training import build_tiny_llama, parse_finetune_args, prepare_model, run_finetune
from hyclora.training.args import CheckpointingArguments, build_parser, checkpointing_requested
from hyclora.training.model import resolve_checkpointing_mode, setup_activation_checkpointing

from helpers.dist import free_port
from helpers.examples import glue_example, needs_hyclora
from helpers.repo import GLUE_DIR, REPO, pythonpath

DS_CKPT = REPO / "ds_configs" / "zero2_actckpt.json"
DS_PLAIN = REPO / "ds_configs" / "zero2.json"

# a 3-step run of the tiny 2-layer Llama through hyclora's baseline layers (hyclora on, nothing
# compressed); the same list is given to the in-process runs and the DeepSpeed subprocess
COMMON = ["--model_name_or_path", "tiny-random-llama", "--data", "synthetic:16", "--max_steps", "3",
          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
          "--max_eval_samples", "2", "--max_generate_samples", "0", "--progress", "false",
          "--save_strategy", "no", "--warmup_steps", "0", "--max_length", "256",
          "--use_hyclora", "true", "--layer_type", "baseline"]


def _args(tmp_path, name, *extra):
    return parse_finetune_args("gsm8k", [*COMMON, "--output_dir", str(tmp_path / name), *extra])


def _losses(metrics):
    return [loss for _, loss in metrics["loss_history"]]


def _script_env(**extra):
    """The example scripts' environment: offline, and the checkout importable where hyclora is not installed."""
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
                PYTHONPATH=pythonpath(), **extra)


# -- flags and resolution ------------------------------------------------------------------------
def test_flags_are_documented_in_help():
    text = " ".join(build_parser("gsm8k").format_help().split())
    assert "--checkpointing_backend" in text and "--checkpoint_every_k" in text
    assert "--activation_checkpointing" in text and "--gradient_checkpointing" in text
    assert "auto | none | hf | deepspeed" in text and "activation_checkpointing block" in text


def test_example_help_parses_on_the_installed_transformers():
    """transformers 5.23 added TrainingArguments.activation_checkpointing: one more option of that
    name in the parser was an argparse conflict before argument parsing even started."""
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "gsm8k.py"), "--help"], cwd=REPO, env=_script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = proc.stdout.split("\n\n")[0]  # the usage block lists every option once
    assert usage.count("--activation_checkpointing ") == 1 and usage.count("--checkpointing_backend ") == 1


@pytest.mark.parametrize("flag", [["--activation_checkpointing", "true"], ["--activation_checkpointing"],
                                  ["--gradient_checkpointing", "true"]])
def test_on_off_switch_parses_with_either_spelling(tmp_path, flag):
    on = _args(tmp_path, "on", *flag).training
    assert checkpointing_requested(on) and checkpointing_requested(_args(tmp_path, "off").training) is False
    assert resolve_checkpointing_mode(CheckpointingArguments(), on) == "hf"  # auto -> hf


def test_old_backend_spelling_names_the_new_flag(tmp_path, capsys):
    for argv in (["--activation_checkpointing", "hf"], ["--activation_checkpointing=deepspeed"]):
        with pytest.raises(SystemExit):
            _args(tmp_path, "old", *argv)
        assert "--checkpointing_backend " + argv[-1].split("=")[-1] in capsys.readouterr().err
    with pytest.raises(ValueError, match="--checkpointing_backend none"):
        parse_finetune_args("gsm8k", activation_checkpointing="none")


@pytest.mark.parametrize("flag", ["--activation_checkpointing", "--gradient_checkpointing"])
def test_backend_none_contradicts_the_switch(tmp_path, flag):
    args = _args(tmp_path, "c", "--checkpointing_backend", "none", flag, "true")
    with pytest.raises(ValueError, match="--checkpointing_backend none contradicts --activation_checkpointing true"):
        setup_activation_checkpointing(None, args.checkpointing, args.training)


def test_checkpointing_kwargs_reach_the_setup(tmp_path):
    args = _args(tmp_path, "k", "--activation_checkpointing", "true", "--checkpoint_boundary_bits", "8",
                 "--activation_checkpointing_kwargs", '{"use_reentrant": true}')
    with pytest.raises(ValueError, match="non-reentrant"):  # boundary bits need the non-reentrant function
        setup_activation_checkpointing(None, args.checkpointing, args.training)


def _training(deepspeed=None, gradient_checkpointing=False):
    return SimpleNamespace(deepspeed=deepspeed, gradient_checkpointing=gradient_checkpointing,
                           gradient_checkpointing_kwargs=None)


@pytest.mark.parametrize("mode,every_k,deepspeed,gc,expected", [
    ("auto", 1, None, False, "none"),
    ("auto", 1, None, True, "hf"),
    ("auto", 2, None, False, "hf"),
    ("auto", 1, "zero2_actckpt", False, "deepspeed"),  # the JSON has an activation_checkpointing block
    ("auto", 1, "zero2", False, "none"),               # ... this one has none
    ("auto", 1, "zero2", True, "hf"),
    ("hf", 2, "zero2_actckpt", False, "hf"),           # an explicit mode wins over the block
    ("deepspeed", 3, "zero2_actckpt", False, "deepspeed"),
    ("none", 1, "zero2_actckpt", False, "none"),
])
def test_auto_resolves_from_deepspeed_json_and_gradient_checkpointing(mode, every_k, deepspeed, gc, expected):
    if deepspeed:
        deepspeed = REPO / "ds_configs" / f"{deepspeed}.json"
        if not deepspeed.is_file():
            pytest.skip(f"{deepspeed.name} not present")
        deepspeed = str(deepspeed)
    ckpt = CheckpointingArguments(checkpointing_backend=mode, checkpoint_every_k=every_k)
    assert resolve_checkpointing_mode(ckpt, _training(deepspeed, gc)) == expected


def test_bad_flags_name_the_fix(capsys):
    with pytest.raises(ValueError, match="expected one of"):
        CheckpointingArguments(checkpointing_backend="full")
    with pytest.raises(ValueError, match="integer >= 1"):
        CheckpointingArguments(checkpoint_every_k=0)
    with pytest.raises(ValueError, match="--checkpointing_backend hf"):
        CheckpointingArguments(checkpointing_backend="none", checkpoint_every_k=2)
    with pytest.raises(ValueError, match="drop one of them"):
        resolve_checkpointing_mode(CheckpointingArguments(checkpointing_backend="none"), _training(gradient_checkpointing=True))
    with pytest.raises(ValueError, match="pass --deepspeed"):
        resolve_checkpointing_mode(CheckpointingArguments(checkpointing_backend="deepspeed"), _training())
    # on the command line argparse lists the choices
    with pytest.raises(SystemExit):
        parse_finetune_args("gsm8k", ["--checkpointing_backend", "full"])
    assert "invalid choice: 'full'" in capsys.readouterr().err


# -- hf (torch.utils.checkpoint) mode through Trainer --------------------------------------------------
def _saved_bytes(tmp_path, name, *extra):
    """Bytes autograd buffers for one forward of the prepared model (saved-tensor hooks)."""
    args = _args(tmp_path, name, *extra)
    from hyclora.training.model import load_tokenizer

    tok = load_tokenizer(args.model)
    torch.manual_seed(0)
    model, _ = prepare_model(args, tok, build_tiny_llama(tok))
    model.train()
    ids = torch.randint(3, len(tok), (2, 64))
    _, report = measure_saved_tensors(model, lambda: model(input_ids=ids, labels=ids).loss)
    return report.total, model.hyclora_activation_checkpointing


@needs_hyclora
def test_hf_mode_same_losses_and_fewer_saved_bytes(tmp_path):
    runs = {name: run_finetune(_args(tmp_path, name, *extra)) for name, extra in [
        ("none", []),
        ("hf", ["--activation_checkpointing", "true"]),                    # auto -> hf, every layer
        ("hf_k2", ["--checkpointing_backend", "hf", "--checkpoint_every_k", "2"]),
    ]}
    assert runs["none"]["activation_checkpointing"] is None
    assert runs["hf"]["activation_checkpointing"]["layers"] == [0, 1]
    assert runs["hf"]["activation_checkpointing"]["backend"] == "torch"
    assert runs["hf_k2"]["activation_checkpointing"]["layers"] == [0]
    reference = _losses(runs["none"])
    assert len(reference) == 3
    for name in ("hf", "hf_k2"):  # fp32 recompute of an uncompressed layer: the same numbers
        assert _losses(runs[name]) == pytest.approx(reference, abs=1e-6), name

    none, _ = _saved_bytes(tmp_path, "p_none")
    every, summary = _saved_bytes(tmp_path, "p_hf", "--checkpointing_backend", "hf")
    half, _ = _saved_bytes(tmp_path, "p_k2", "--checkpointing_backend", "hf", "--checkpoint_every_k", "2")
    assert summary["layers"] == [0, 1]
    print("saved bytes: none", none, "every layer", every, "every 2nd", half)
    # measured (2 x 64 tokens, 2 layers): each checkpointed layer keeps only its input
    assert every < half < none
    # --checkpoint_boundary_bits 8: the kept layer inputs are quantised (1 byte + exact outliers
    # instead of 4 bytes in fp32)
    packed, summary8 = _saved_bytes(tmp_path, "p_hf8", "--checkpointing_backend", "hf",
                                    "--checkpoint_boundary_bits", "8")
    assert summary8["boundary_bits"] == 8 and summary8["layers"] == [0, 1]
    assert packed < every
    assert none - every > 0.5 * none


@needs_hyclora
@pytest.mark.parametrize("flag", ["--activation_checkpointing", "--gradient_checkpointing"])
def test_trainer_does_not_reenable_its_checkpointing_over_hyclora(tmp_path, monkeypatch, flag):
    """Trainer.train() checkpoints the model itself while its switch is on (activation_checkpointing_enable
    from transformers 5.23, gradient_checkpointing_enable before), replacing the layers' checkpoint
    function: the setup clears every spelling of the switch once hyclora's checkpointing is in."""
    from transformers import PreTrainedModel

    calls = []
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if hasattr(PreTrainedModel, name):
            monkeypatch.setattr(PreTrainedModel, name, lambda self, *a, _name=name, **k: calls.append(_name))
    args = _args(tmp_path, "t", flag, "true", "--max_steps", "1")
    metrics = run_finetune(args)
    assert metrics["activation_checkpointing"]["layers"] == [0, 1]
    assert calls == []
    assert args.training.gradient_checkpointing is False
    assert getattr(args.training, "activation_checkpointing", False) is False


# -- deepspeed mode -------------------------------------------------------------------------------------
@pytest.fixture
def ds_comm(monkeypatch):
    """A 1-process gloo group for deepspeed.checkpointing.configure (torn down afterwards)."""
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed import comm as ds_comm_mod

    if ds_comm_mod.is_initialized():
        pytest.skip("a DeepSpeed process group is already up in this process")
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield deepspeed
    deepspeed.checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False,
                                      checkpoint_in_cpu=False, num_checkpoints=None)
    torch.distributed.destroy_process_group()
    importlib.import_module("deepspeed.comm.comm").cdb = None


@needs_hyclora
def test_deepspeed_mode_checkpoints_through_deepspeed_and_buffers_less(tmp_path, ds_comm, monkeypatch):
    if not DS_CKPT.is_file():
        pytest.skip(f"{DS_CKPT} not present")
    calls = []
    real = ds_comm.checkpointing.checkpoint

    def counting(function, *args):
        calls.append(function)
        return real(function, *args)

    # enable_activation_checkpointing binds deepspeed.checkpointing.checkpoint when it runs
    monkeypatch.setattr(ds_comm.checkpointing, "checkpoint", counting)
    none, _ = _saved_bytes(tmp_path, "d_none")
    args = _args(tmp_path, "d_ds")
    args.training.deepspeed = str(DS_CKPT)  # the flag's value; no engine needed for the probe
    from hyclora.training.model import load_tokenizer

    tok = load_tokenizer(args.model)
    torch.manual_seed(0)
    model, status = prepare_model(args, tok, build_tiny_llama(tok))
    assert model.hyclora_activation_checkpointing["backend"] == "deepspeed" and "deepspeed checkpointing" in status
    assert checkpointing_requested(args.training) is False  # Trainer must not overwrite the layers' function
    model.train()
    ids = torch.randint(3, len(tok), (2, 64))
    loss, report = measure_saved_tensors(model, lambda: model(input_ids=ids, labels=ids).loss)
    loss.backward()
    assert len(calls) == 2  # both decoder layers went through deepspeed.checkpointing
    assert report.total < 0.5 * none
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


@needs_hyclora
def test_gsm8k_example_with_deepspeed_checkpointing_config_matches_plain_run(tmp_path):
    """examples/gsm8k.py --deepspeed ds_configs/zero2_actckpt.json (no other flag): auto picks
    DeepSpeed's checkpointing from the JSON block; the per-step losses equal the plain run's."""
    pytest.importorskip("deepspeed")
    if not DS_CKPT.is_file():
        pytest.skip(f"{DS_CKPT} not present")
    env = _script_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "gsm8k.py"), *COMMON, "--deepspeed", str(DS_CKPT),
                           "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    summary = saved["metrics"]["activation_checkpointing"]
    assert summary["backend"] == "deepspeed" and summary["layers"] == [0, 1] and summary["reentrant"] is True
    assert summary["settings"]["cpu_checkpointing"] is False
    plain = run_finetune(_args(tmp_path, "plain"))
    ds_losses = [loss for _, loss in saved["loss_history"]]
    assert len(ds_losses) == 3
    assert ds_losses == pytest.approx(_losses(plain), abs=1e-5)


# -- the GLUE example (encoder layers) -------------------------------------------------------------
@needs_hyclora
@pytest.mark.skipif(not (GLUE_DIR / "MRPC" / "train.tsv").is_file(), reason=f"GLUE TSV files not found under {GLUE_DIR}")
def test_glue_example_checkpointing_same_losses(tmp_path):
    """RoBERTa's layers are checkpointable too; torch.utils.checkpoint replays the dropout RNG,
    so hyclora baseline (dropout on) gives the same 3 losses with and without checkpointing."""
    example = glue_example()
    values = dict(task="mrpc", data=str(GLUE_DIR), model_name_or_path="tiny-random-roberta", max_steps=3,
                  per_device_train_batch_size=4, per_device_eval_batch_size=16, max_train_samples=32,
                  max_eval_samples=16, logging_steps=1, max_length=64, lora_r=4, lora_alpha=8,
                  use_hyclora=True, layer_type="baseline", disable_tqdm=True)
    plain = example.run_glue(example.parse_glue_args([], output_dir=str(tmp_path / "a"), **values))
    ckpt = example.run_glue(example.parse_glue_args(["--checkpointing_backend", "hf"],
                                                    output_dir=str(tmp_path / "b"), **values))
    assert plain["activation_checkpointing"] is None
    assert ckpt["activation_checkpointing"]["layers"] == [0, 1] and "torch checkpointing" in ckpt["hyclora"]
    assert [x for _, x in ckpt["loss_history"]] == pytest.approx([x for _, x in plain["loss_history"]], abs=1e-6)
    assert len(plain["loss_history"]) == 3


def test_checkpoint_boundary_bits_flag():
    assert CheckpointingArguments(checkpoint_boundary_bits=8).checkpoint_boundary_bits == 8
    with pytest.raises(ValueError, match="checkpoint_boundary_bits"):
        CheckpointingArguments(checkpoint_boundary_bits=3)

    class Args:  # deepspeed.checkpointing keeps exact inputs: a clear error, not a silent no-op
        gradient_checkpointing = True
        gradient_checkpointing_kwargs = {"use_reentrant": True}
        deepspeed = None

    with pytest.raises(ValueError, match="non-reentrant"):
        setup_activation_checkpointing(None, CheckpointingArguments(checkpointing_backend="hf",
                                                                    checkpoint_boundary_bits=8), Args())
