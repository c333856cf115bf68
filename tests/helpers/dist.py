"""Small distributed LoRA runs on this machine (gloo, CPU): start N ranks of
``tests/integrations/_dist_worker.py`` and collect their results; the tiny Llama, data and LoRA
config that the worker and the tests share.

The worker imports this module: :func:`worker_env` puts the checkout and ``tests/`` on its
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from helpers.repo import REPO, TESTS, pythonpath

WORKER = TESTS / "integrations" / "_dist_worker.py"
VOCAB, SEQ, ROWS = 128, 32, 256  # the runs' token matrix (see the worker's docstring)


def tiny_llama_config():
    """The runs' base model: a 2-layer random Llama (hidden 64, 4 heads / 2 KV heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def save_tiny_llama(path: str) -> str:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


def token_data() -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(1234))


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(rank: int, world: int, port: int, distributed: bool = True) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=pythonpath(REPO, TESTS),  # the worker imports hyclora and helpers.*
    )
    if not distributed:
        # A 1-process reference run without DeepSpeed is not distributed at all.
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)
    return env


class Launch:
    """N ranks of the worker running ``scenarios``; :meth:`wait` returns ``{name: result}``."""

    def __init__(self, world: int, scenarios: List[dict], tmp: Path, model_dir: str, timeout: float = 240,
                 worker: Path = WORKER, distributed: Optional[bool] = None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp, self.scenarios, self.timeout = tmp, scenarios, timeout
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps({"scenarios": scenarios, "out_dir": str(tmp), "model_dir": model_dir}))
        port = free_port()
        if distributed is None:  # a 1-process DeepSpeed or FSDP run still needs a process group
            distributed = world > 1 or any(sc.get("ds") for sc in scenarios)
        self.procs, self.logs = [], []
        for rank in range(world):
            log = open(tmp / f"rank{rank}.log", "w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, str(worker), "--spec", str(spec_path)],
                env=worker_env(rank, world, port, distributed), stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
            ))

    def wait(self) -> Dict[str, dict]:
        """Raises with every rank's log tail when a rank fails or hangs."""
        failed: Optional[str] = None
        try:
            for rank, proc in enumerate(self.procs):
                try:
                    code = proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    failed = f"rank {rank} timed out after {self.timeout}s"
                    break
                if code != 0:
                    failed = f"rank {rank} exited with {code}"
                    break
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if failed:
            tails = []
            for rank, log in enumerate(self.logs):
                log.seek(0)
                tails.append(f"--- rank {rank} ---\n" + log.read()[-4000:])
            raise RuntimeError(failed + "\n" + "\n".join(tails))
        for log in self.logs:
            log.close()
        results = {}
        for sc in self.scenarios:
            path = self.tmp / sc["name"] / "result.json"
            if path.exists():
                results[sc["name"]] = json.loads(path.read_text())
        return results


def launch(world: int, scenarios: List[dict], tmp: Path, model_dir: str, timeout: float = 240) -> Dict[str, dict]:
    """Run ``scenarios`` on ``world`` ranks and wait; ``{name: result}`` from rank 0."""
    return Launch(world, scenarios, tmp, model_dir, timeout).wait()


def load_adapter_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))
