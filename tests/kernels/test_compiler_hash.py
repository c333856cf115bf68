"""Triton's once-per-process compiler hash is computed on a background thread from
``apply_hyclora`` on, so that the first training step does not wait for it (issue 23's first
step): started only where Triton kernels will run, once, and quiet when it fails."""

from __future__ import annotations

import functools
import threading

import pytest
import torch

from hyclora import HyCLoRAConfig, apply_hyclora
from hyclora.kernels import common
from helpers.models import lora_model, tiny_model

cache = pytest.importorskip("triton.runtime.cache")


@pytest.fixture
def fake_key(monkeypatch):
    """A stand-in for ``triton_key`` (lru-cached like it) that records its calls, with the
    compiled-kernel mode (not the interpreter) the hash is needed in."""
    calls = []

    @functools.lru_cache()
    def triton_key():
        calls.append(threading.current_thread().name)
        if fake_key_error:
            raise OSError("libtriton.so: no such file")
        return "key"

    fake_key_error = []
    monkeypatch.setattr(cache, "triton_key", triton_key)
    monkeypatch.setattr(common, "INTERPRET", False)
    triton_key.calls, triton_key.error = calls, fake_key_error
    yield triton_key
    common._wait_for_compiler_hash()  # nothing left pending for the next test


def test_hash_runs_once_on_a_background_thread(fake_key, monkeypatch):
    started = threading.Event()
    release = threading.Event()
    real = fake_key.__wrapped__

    @functools.lru_cache()
    def slow_key():  # still hashing when the first launch comes
        started.set()
        release.wait(timeout=10)
        return real()

    monkeypatch.setattr(cache, "triton_key", slow_key)
    thread = common.start_compiler_hash(torch.device("cuda"))
    assert thread is not None and thread.daemon and started.wait(timeout=10)
    assert common.start_compiler_hash(torch.device("cuda")) is None  # one thread at a time
    threading.Timer(0.2, release.set).start()
    common.check_triton_device("a kernel")  # the first launch waits for the thread ...
    assert not thread.is_alive()
    assert fake_key.calls == ["hyclora-triton-compiler-hash"]
    assert slow_key() == "key" and len(fake_key.calls) == 1  # ... and finds the hash cached
    assert common.start_compiler_hash(torch.device("cuda")) is None  # known: nothing to start


def test_no_hash_where_no_triton_kernel_runs(fake_key, monkeypatch):
    assert common.start_compiler_hash(torch.device("cpu")) is None
    assert common.start_compiler_hash(torch.device("cuda"), "torch") is None  # the torch references
    monkeypatch.setattr(common, "INTERPRET", True)  # the interpreter compiles nothing
    assert common.start_compiler_hash(torch.device("cuda")) is None
    assert fake_key.calls == []


def test_a_failing_hash_is_left_to_the_first_launch(fake_key, monkeypatch):
    fake_key.error.append(True)
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    common.start_compiler_hash(torch.device("cuda")).join(timeout=10)
    assert fake_key.calls and uncaught == []
    with pytest.raises(OSError, match="libtriton"):  # raised again where it is needed
        fake_key()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_apply_hyclora_starts_it_for_the_model_device(backend, monkeypatch):
    calls = []
    monkeypatch.setattr("hyclora.models.api.start_compiler_hash", lambda *a: calls.append(a))
    apply_hyclora(lora_model(tiny_model()), HyCLoRAConfig(kernel_backend=backend))
    assert calls == [(torch.device("cpu"), backend)]


def test_the_installed_triton_caches_its_hash_as_assumed():
    # start_compiler_hash does nothing for a Triton whose triton_key is not an lru_cache
    assert callable(cache.triton_key) and hasattr(cache.triton_key, "cache_info")


@pytest.mark.parametrize("argv,cuda,started", [
    ([], True, True),
    ([], False, False),  # no GPU
    (["--use_hyclora", "false"], True, False),
    (["--kernel_backend", "torch"], True, True),  # start_compiler_hash refuses that backend
    (["--use_cpu", "true"], True, False),
])
def test_a_training_run_starts_it_before_loading(argv, cuda, started, monkeypatch):
    from hyclora.training import run
    from hyclora.training.args import parse_finetune_args

    args = parse_finetune_args("gsm8k", argv)
    calls = []
    monkeypatch.setattr(run, "start_compiler_hash", lambda *a: calls.append(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    run._hash_triton_compiler_early(args)
    assert calls == ([(torch.device("cuda"), args.hyclora.kernel_backend)] if started else [])
