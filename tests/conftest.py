"""Fixtures shared by the test modules (helper functions live in the ``helpers`` package)."""

import socket

import pytest
import torch

from helpers.repo import REPO


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: on the shared 2-core CI machine one thread is several times faster than two
    contending ones (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    """benchmarks/ on sys.path for the test, as ``python benchmarks/<script>.py`` has it (the scripts
    import their shared modules by bare name); sys.path is restored afterwards."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))


@pytest.fixture
def no_network(monkeypatch):
    """Offline hub/evaluate settings, and any socket connection fails the test."""
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
