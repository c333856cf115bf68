"""Interrupted runs and bad input (issue 20): ``--save_steps N`` alone saves every N steps;
``--resume_from_checkpoint latest`` picks the newest COMPLETE checkpoint (never one cut off while
saving); a run killed (SIGKILL) in the middle of a checkpoint save resumes with ``latest`` on the
uninterrupted run's loss curve; unreadable ``hyclora_state.pt`` files, missing model folders and
relative base-model paths in saved adapters give errors that name the file and the fix."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from hyclora.training import (
    build_tiny_llama,
    load_hyclora_state,
    parse_finetune_args,
    run_finetune,
    save_hyclora_state,
)
from hyclora.training.callbacks import HyCLoRAStateCallback, HyCLoRAStateFileError
from hyclora.training.checkpoints import latest_checkpoint, resolve_resume

from helpers.examples import glue_example, needs_hyclora, tokenizer
from helpers.repo import REPO, pythonpath

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
                OMP_NUM_THREADS="1", PYTHONPATH=pythonpath(), **extra)


# -- item 4: --save_steps alone ----------------------------------------------------------------------
def test_save_steps_alone_means_save_strategy_steps():
    # the examples default to save_strategy=epoch: --save_steps alone used to save nothing mid-epoch
    for argv, overrides in ((["--save_steps", "3"], {}), (["--save-steps=3"], {}), ([], {"save_steps": 3})):
        t = parse_finetune_args("gsm8k", argv, **overrides).training
        assert str(getattr(t.save_strategy, "value", t.save_strategy)) == "steps" and t.save_steps == 3, argv
    assert str(parse_finetune_args("gsm8k").training.save_strategy.value) == "epoch"  # default unchanged
    # an explicit other strategy wins, with a warning that --save_steps does nothing
    with pytest.warns(UserWarning, match="--save_steps is ignored with --save_strategy epoch"):
        t = parse_finetune_args("gsm8k", ["--save_steps", "3", "--save_strategy", "epoch"]).training
    assert str(t.save_strategy.value) == "epoch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = parse_finetune_args("gsm8k", ["--save_steps", "3", "--save_strategy", "steps"], save_strategy="no").training
    assert str(t.save_strategy.value) == "steps"


def test_glue_save_steps_alone_means_save_strategy_steps():
    glue = glue_example()
    t = glue.parse_glue_args(["--save_steps", "5"]).training
    assert str(t.save_strategy.value) == "steps" and t.save_steps == 5
    assert str(glue.parse_glue_args([]).training.save_strategy.value) == "no"


# -- item 4: --resume_from_checkpoint latest -----------------------------------------------------------
def _checkpoint(root, step, state=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    if state is True:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    elif state:  # the given text, e.g. JSON cut off in the middle of its write
        (folder / "trainer_state.json").write_text(state)
    return str(folder)


def test_resume_latest_picks_the_newest_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-.* folder in .*none at all"):
        resolve_resume("latest", str(out))
    _checkpoint(out, 1)
    ten = _checkpoint(out, 10)  # numeric order, not by name
    _checkpoint(out, 2)
    partial = _checkpoint(out, 11, state=False)         # killed before trainer_state.json
    _checkpoint(out, 12, state='{"global_step": 1')     # killed during trainer_state.json
    (out / "checkpoint-13").write_text("not a folder")
    for spelling in ("latest", "LATEST", "true", "last", True):
        assert resolve_resume(spelling, str(out)) == ten
    assert latest_checkpoint(str(out)) == ten
    for off in (None, False, "", "false", "no"):
        assert resolve_resume(off, str(out)) is None
    assert resolve_resume(ten, str(out)) == ten  # a path keeps working
    with pytest.raises(ValueError, match="checkpoint-11.* is an incomplete checkpoint .*no trainer_state.json"
                                         ".*'latest'"):
        resolve_resume(partial, str(out))
    with pytest.raises(FileNotFoundError, match="folder not found.*'latest'"):
        resolve_resume(str(out / "checkpoint-99"), str(out))
    only_partial = tmp_path / "only_partial"
    _checkpoint(only_partial, 3, state=False)
    with pytest.raises(FileNotFoundError, match=r"only incomplete ones \(checkpoint-3"):
        resolve_resume("latest", str(only_partial))


def test_examples_accept_resume_latest(tmp_path):
    # before: "--resume_from_checkpoint 'latest' is not a folder"; now it names what it looked for
    args = parse_finetune_args("gsm8k", ["--model_name_or_path", "tiny-random-llama", "--data", "synthetic:8",
                                         "--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", "latest"])
    with pytest.raises(FileNotFoundError, match="latest: no complete checkpoint"):
        run_finetune(args, tokenizer=tokenizer())


# -- fault injection: SIGKILL while a checkpoint is being saved, then resume with "latest" ---------------
# Runs examples/gsm8k.py; the Trainer's RNG-state save (after the adapter and the optimizer, before
# trainer_state.json) of step KILL_AT_STEP writes a marker and stalls, and the test kills the process
# there: checkpoint-3 then holds an adapter, optimizer and hyclora state but no trainer_state.json.
_STALL = """
import os, runpy, sys, time
import transformers
real = transformers.Trainer._save_rng_state
def stalled(self, output_dir):
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        with open(os.environ["KILL_MARKER"], "w") as handle:
            handle.write(output_dir)
        time.sleep(600)
    return real(self, output_dir)
transformers.Trainer._save_rng_state = stalled
example = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(example, run_name="__main__")
"""


@needs_hyclora
def test_killed_during_checkpoint_save_resumes_latest_on_the_same_curve(tmp_path):
    argv = ["--model_name_or_path", "tiny-random-llama", "--data", "synthetic:16", "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
            "--warmup_steps", "0", "--max_length", "128", "--max_eval_samples", "0", "--max_generate_samples", "0",
            "--progress", "false", "--save_steps", "1",  # no --save_strategy: --save_steps alone must save
            "--use_hyclora", "true", "--layer_type", "intra_inter", "--q_bit", "4", "--iteration_threshold", "3"]
    out = tmp_path / "killed"
    script, marker = tmp_path / "stall_save.py", tmp_path / "saving"
    script.write_text(_STALL)
    proc = subprocess.Popen([sys.executable, str(script), str(REPO / "examples" / "gsm8k.py"), *argv,
                             "--output_dir", str(out)], cwd=REPO, env=_env(KILL_AT_STEP="3", KILL_MARKER=str(marker)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not marker.exists():
            log = proc.stderr.read()[-3000:] if proc.poll() is not None else "(still running)"
            pytest.fail(f"the example never reached the save of step 3 (rc {proc.poll()}): {log}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    partial = out / "checkpoint-3"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    assert (partial / "adapter_model.safetensors").is_file() and (partial / "hyclora_state.pt").is_file()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()

    resumed_at = {}

    class Where(TrainerCallback):  # the trainer state of the checkpoint is loaded before on_train_begin
        def on_train_begin(self, args, state, control, **kw):
            resumed_at["step"] = state.global_step

    resumed = run_finetune(parse_finetune_args("gsm8k", [*argv, "--output_dir", str(out),
                                                         "--resume_from_checkpoint", "latest"]),
                           tokenizer=tokenizer(), extra_callbacks=[Where()])
    whole = run_finetune(parse_finetune_args("gsm8k", [*argv, "--output_dir", str(tmp_path / "whole")]),
                         tokenizer=tokenizer())
    assert resumed_at["step"] == 2  # checkpoint-2, not the partial checkpoint-3
    assert [s for s, _ in resumed["loss_history"]] == [1, 2, 3, 4] == [s for s, _ in whole["loss_history"]]
    got = [loss for _, loss in resumed["loss_history"]]
    want = [loss for _, loss in whole["loss_history"]]
    # steps 3 and 4 continue the uninterrupted curve: weights, optimizer, schedule, data order, RNG
    # and hyclora's calibration state (3 calibrating forwards: step 3's ran after the resume) all restored
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # the calibration (its 3rd forward ran after the resume) ended exactly as without the kill
    final = {name: torch.load(Path(m["output_dir"]) / "hyclora_state.pt", weights_only=True)
             for name, m in (("resumed", resumed), ("whole", whole))}
    assert final["resumed"].keys() == final["whole"].keys() and final["whole"]
    for key, value in final["whole"].items():
        assert torch.allclose(final["resumed"][key].float(), value.float(), rtol=1e-6, atol=1e-7), key
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()  # the partial folder was written again


# -- item 5: unreadable hyclora_state.pt -------------------------------------------------------------------
class _State(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def _model_with_state():
    torch.manual_seed(0)
    model = build_tiny_llama(tokenizer())
    for layer in model.model.layers:
        layer.hyclora_state = _State()
    return model


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "code", "not_tensors"])
def test_unreadable_state_file_names_the_file_and_the_safe_fix(tmp_path, damage):
    folder = tmp_path / "checkpoint-2"
    path = Path(save_hyclora_state(_model_with_state(), str(folder)))
    assert load_hyclora_state(_model_with_state(), str(folder)) == str(path)
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a torch file\n" * 20)
    elif damage == "code":  # a pickle that would run os.system under weights_only=False
        import pickle

        path.write_bytes(pickle.dumps(os.system))
    else:
        torch.save({"layers.0.hyclora_state.count": 3}, path)
    with pytest.raises(HyCLoRAStateFileError) as info:
        load_hyclora_state(_model_with_state(), str(folder))
    message = str(info.value)
    assert str(path) in message and "delete it" in message and "calibration then starts afresh" in message
    assert "weights_only=False" not in message.replace("Do not load it with weights_only=False", "")
    error = info.value  # no torch error (with its weights_only=False advice) chained below ours
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    # the same error on resume, through the callback
    callback = HyCLoRAStateCallback(str(folder))
    args = type("A", (), {"world_size": 1, "process_index": 0, "output_dir": str(tmp_path)})()
    with pytest.raises(HyCLoRAStateFileError, match="hyclora_state.pt"):
        callback.on_train_begin(args, None, None, model=_model_with_state())


def test_state_callback_resolves_latest_and_writes_before_the_trainer(tmp_path):
    model = _model_with_state()
    model.model.layers[0].hyclora_state.count.fill_(7)
    args = type("A", (), {"world_size": 1, "process_index": 0, "output_dir": str(tmp_path)})()
    state = type("S", (), {"global_step": 5})()
    control = type("C", (), {"should_save": True})()
    callback = HyCLoRAStateCallback()
    callback.on_step_end(args, state, control, model=model)  # the Trainer has decided to save step 5
    assert (tmp_path / "checkpoint-5" / "hyclora_state.pt").is_file()
    assert not list((tmp_path / "checkpoint-5").glob("*.partial-*"))  # written beside, then renamed
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    fresh = _model_with_state()
    resume = HyCLoRAStateCallback("latest")
    resume.on_train_begin(args, state, control, model=fresh)
    assert resume.loaded_from == str(tmp_path / "checkpoint-5" / "hyclora_state.pt")
    assert int(fresh.model.layers[0].hyclora_state.count) == 7


# -- item 5: model folders that do not exist ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "runs/no/model"])
def test_missing_model_folder_says_folder_not_found(tmp_path, name):
    args = parse_finetune_args("gsm8k", ["--model_name_or_path", name, "--data", "synthetic:8",
                                         "--output_dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=f"--model_name_or_path: folder not found: {name}"):
        run_finetune(args)


def test_missing_hub_like_name_says_neither_folder_nor_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    from hyclora.training.args import ModelArguments
    from hyclora.training.model import load_tokenizer

    with pytest.raises(OSError, match="'runs/base' is neither a local folder .*runs/base does not exist"):
        load_tokenizer(ModelArguments(model_name_or_path="runs/base"))


# -- item 6: adapters name their base model by an absolute path --------------------------------------------
def test_adapter_stores_absolute_base_path_and_evaluates_from_elsewhere(tmp_path, monkeypatch):
    from hyclora.eval.cli import build_parser, load_model_for_eval

    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    torch.manual_seed(0)
    build_tiny_llama(tokenizer()).save_pretrained(work / "runs" / "base")
    tokenizer().save_pretrained(work / "runs" / "base")
    monkeypatch.chdir(work)
    metrics = run_finetune(parse_finetune_args("gsm8k", [
        "--model_name_or_path", "runs/base", "--data", "synthetic:8", "--output_dir", "runs/adapter",
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--max_length", "128", "--max_eval_samples", "0", "--max_generate_samples", "0", "--progress", "false",
        "--save_strategy", "no", "--use_hyclora", "false"]))
    config = json.loads((work / "runs" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work / "runs" / "base")
    assert metrics["output_dir"] == "runs/adapter"
    monkeypatch.chdir(tmp_path)  # evaluate from another folder
    ns = build_parser().parse_args(["--task", "gsm8k", "--adapter_path", str(work / "runs" / "adapter"),
                                    "--device", "cpu", "--torch_dtype", "float32"])
    model, _, base = load_model_for_eval(ns)
    assert base == str(work / "runs" / "base") and hasattr(model, "peft_config")
    # an adapter written before the fix (relative base): the error names adapter_config.json and the flag
    config["base_model_name_or_path"] = "./runs/base"
    (work / "runs" / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"base_model_name_or_path in .*adapter_config.json \(pass "
                                                r"--model_name_or_path BASE_FOLDER\): folder not found: ./runs/base"):
        load_model_for_eval(ns)


def test_state_file_without_the_refresh_window_still_loads(tmp_path):
    """A hyclora_state.pt written before the refresh window was saved (no next_* / observing /
    window_observed, no frozen_forwards) resumes: the statistics load, the window opens again."""
    from hyclora import HyCLoRAConfig, apply_hyclora
    from hyclora.demo import build_lora_llama
    from hyclora.quant import ChannelStats

    def model():
        m, _ = build_lora_llama(hidden=32, layers=2, heads=2, kv_heads=2, ffn=48, vocab=64)
        apply_hyclora(m, HyCLoRAConfig(layer_type="intra_inter", iteration_threshold=2))
        return m

    trained = model()
    for seed in range(3):
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
        trained(input_ids=ids, labels=ids).loss.backward()
    path = Path(save_hyclora_state(trained, str(tmp_path)))
    old = {k: v for k, v in torch.load(path, weights_only=True).items()
           if k.rpartition(".")[2] not in ("frozen_forwards", *ChannelStats.WINDOW_BUFFERS)}
    torch.save(old, path)
    resumed = model()
    assert load_hyclora_state(resumed, str(tmp_path)) == str(path)
    pairs = [(a, b) for a, b in zip(trained.modules(), resumed.modules()) if isinstance(a, ChannelStats)]
    assert pairs and any(int(a.count) > 0 for a, _ in pairs)
    for a, b in pairs:
        assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi) and int(a.count) == int(b.count)
