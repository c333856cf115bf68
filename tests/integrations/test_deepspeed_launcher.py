"""``deepspeed --num_gpus N examples/gsm8k.py --deepspeed ds_configs/zero3.json`` on CPU (gloo):
the launcher starts N ranks (appending ``--local_rank``), the Trainer shards the data, ZeRO-3
trains hyclora (baseline layer type), and the per-step losses and the saved adapter equal a 1-process run
of the same example that accumulates over the same micro-batches.

The example runs unmodified through ``_gsm8k_cpu_launch.py`` (see there for the two CPU-only
adjustments). The 8-rank variant (issue 9's CPU part, run once and recorded) is ``slow`` and
opt-in (``HYCLORA_TEST_8_RANKS=1``): eight ranks of transformers + DeepSpeed on a 2-core CI
machine take 2-3 minutes on their own.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from helpers.dist import free_port, load_adapter_tensors  # noqa: E402
from helpers.repo import REPO, pythonpath  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLE = REPO / "examples" / "gsm8k.py"
LAUNCH = HERE / "_gsm8k_cpu_launch.py"  # a script of this folder, self-contained (needs no helpers)
STEPS = 3
COMMON = [
    "--model_name_or_path", "tiny-random-llama", "--data", "synthetic:64", "--max_steps", str(STEPS),
    "--logging_steps", "1", "--save_strategy", "no", "--max_eval_samples", "4",
    "--max_generate_samples", "1", "--max_new_tokens", "4", "--progress", "false",
    # hyclora's exact layer type: the launcher path is what is tested here, to rounding; the
    # lossy types' ZeRO parity is test_zero_parity's job (a quantiser turns rounding noise into
    # occasional code flips, which would need a tolerance too loose to catch sharding bugs).
    "--use_hyclora", "true", "--layer_type", "baseline",
    # the model's own LM loss on both sides: the chunked one does not run on a ZeRO-3-sharded head
    "--lm_loss", "model",
]
# Measured: losses and adapters bit-equal with 2 ranks (8 ranks: losses 1.5e-7 relative,
# adapters 7e-9), fp32.
LOSS_RTOL, W_ATOL = 2e-6, 1e-6


def _env():
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=pythonpath())
    return env


def _launch_pair(ranks, tmp, timeout):
    """Start the N-rank launcher run and the 1-process reference together; wait for both."""
    deepspeed_cli = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if deepspeed_cli is None:
        pytest.skip("the deepspeed launcher is not installed")
    dist_out, ref_out = tmp / f"zero3_{ranks}ranks", tmp / "one_process"
    dist_cmd = [deepspeed_cli, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(LAUNCH),
                "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), *COMMON,
                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                "--output_dir", str(dist_out)]
    ref_cmd = [sys.executable, str(EXAMPLE), *COMMON, "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", str(ranks), "--output_dir", str(ref_out)]
    procs = []
    for name, cmd in (("dist", dist_cmd), ("ref", ref_cmd)):
        log = open(tmp / f"{name}.log", "w")
        procs.append((name, log, subprocess.Popen(cmd, env=_env(), cwd=str(REPO), stdout=log,
                                                  stderr=subprocess.STDOUT)))
    try:
        for name, log, proc in procs:
            code = proc.wait(timeout=timeout)
            log.close()
            if code != 0:
                tail = (tmp / f"{name}.log").read_text()[-6000:]
                raise AssertionError(f"{name} run exited with {code}:\n{tail}")
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return dist_out, ref_out


def _check(dist_out, ref_out, ranks, tmp):
    dist = json.loads((dist_out / "results.json").read_text())
    ref = json.loads((ref_out / "results.json").read_text())
    assert dist["args"]["training"]["deepspeed"].endswith("zero3.json")
    assert "baseline" in dist["metrics"]["hyclora"], dist["metrics"]["hyclora"]
    log = (tmp / "dist.log").read_text()
    assert all(f"--local_rank={r}" in log for r in range(ranks)), "the launcher passes --local_rank"
    got = [loss for _, loss in dist["loss_history"]]
    want = [loss for _, loss in ref["loss_history"]]
    assert [s for s, _ in dist["loss_history"]] == list(range(1, STEPS + 1))
    # Equal losses mean each rank trained on its own shard: duplicated or missing micro-batches
    # would change the mean loss and the accumulated gradient.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=LOSS_RTOL, atol=0)
    assert got[0] != got[-1]
    a, b = load_adapter_tensors(dist_out), load_adapter_tensors(ref_out)
    assert a.keys() == b.keys() and a
    for key in b:
        assert a[key].numel() > 0, f"{key}: empty ZeRO-3 shard saved"
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=W_ATOL,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_deepspeed_launcher_2_ranks_zero3_matches_one_process(tmp_path):
    dist_out, ref_out = _launch_pair(2, tmp_path, timeout=500)
    _check(dist_out, ref_out, 2, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HYCLORA_TEST_8_RANKS") != "1",
                    reason="8 ranks on CPU take minutes; set HYCLORA_TEST_8_RANKS=1 to run")
def test_deepspeed_launcher_8_ranks_zero3_matches_one_process(tmp_path):
    """Issue 9 on CPU: the same command with 8 gloo ranks."""
    dist_out, ref_out = _launch_pair(8, tmp_path, timeout=900)
    _check(dist_out, ref_out, 8, tmp_path)
