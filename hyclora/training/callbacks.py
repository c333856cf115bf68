"""Trainer callbacks: a memory/throughput summary, and hyclora calibration state in checkpoints.

Calibration statistics live in buffers of a child module named ``hyclora_state`` on each
patched decoder layer. A PEFT model's checkpoint holds only the adapter, so without help a
resumed run would recalibrate on different batches than the original run did.
``HyCLoRAStateCallback`` stores those buffers next to the adapter in every checkpoint and puts
them back when training resumes.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Dict, Optional

import torch
from transformers import TrainerCallback

from hyclora.memory import graph_pool_free_bytes
from hyclora.quant import ChannelStats

from .checkpoints import LATEST, resolve_resume

logger = logging.getLogger(__name__)

STATE_MODULE = "hyclora_state"
STATE_FILE = "hyclora_state.pt"


# -- hyclora calibration state -----------------------------------------------------------------
def _strip_wrappers(name: str) -> str:
    # DDP / DeepSpeed wrap the model as ``module``; keys must not depend on the wrapping.
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _state_modules(model) -> Dict[str, torch.nn.Module]:
    return {
        _strip_wrappers(name): module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == STATE_MODULE
    }


def hyclora_state_dict(model) -> Dict[str, torch.Tensor]:
    """Every buffer of every ``hyclora_state`` module, keyed ``<module path>.<buffer>`` (on CPU)."""
    out: Dict[str, torch.Tensor] = {}
    for name, module in _state_modules(model).items():
        for key, value in module.state_dict().items():
            out[f"{name}.{key}"] = value.detach().to("cpu", copy=True)
    return out


def state_file_name(world_size: int = 1, rank: int = 0) -> str:
    """Each rank calibrates on its own micro-batches, so with several ranks each keeps its own."""
    return STATE_FILE if world_size <= 1 else f"hyclora_state_rank{rank}.pt"


def save_hyclora_state(model, folder: str, *, world_size: int = 1, rank: int = 0) -> Optional[str]:
    """Write the calibration buffers to ``folder``; returns the path, or None when the model has
    no hyclora state (plain LoRA). The file is written beside its final name and then renamed,
    so a kill during the save never leaves a truncated ``hyclora_state.pt``."""
    state = hyclora_state_dict(model)
    if not state:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, state_file_name(world_size, rank))
    partial = f"{path}.partial-{os.getpid()}"
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


_STATE_FIX = ("delete it and resume again: calibration then starts afresh (the adapter, optimizer and trainer "
              "state of the checkpoint are not affected)")


class HyCLoRAStateFileError(ValueError):
    """A ``hyclora_state*.pt`` that cannot be read: the message names the file and the fix."""


def _read_state_file(path: str) -> Dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the safe fix. Never
    ``weights_only=False`` (torch's advice for an unreadable file): that would run code from the file."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise FileNotFoundError(f"hyclora calibration state {path}: {err.strerror or err}") from None
    if size == 0:
        raise HyCLoRAStateFileError(
            f"hyclora calibration state {path} is empty (a save cut off, e.g. by a kill): {_STATE_FIX}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError, RuntimeError (zip reader), UnpicklingError, KeyError (garbage) ...
        what = ("truncated or corrupt" if isinstance(err, (EOFError, RuntimeError))
                else "not a file written by save_hyclora_state (or it holds more than tensors)")
        raise HyCLoRAStateFileError(
            f"hyclora calibration state {path} ({size} bytes) cannot be read: it is {what} "
            f"[{type(err).__name__}]. Do not load it with weights_only=False; {_STATE_FIX}") from None
    if not isinstance(saved, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in saved.items()):
        raise HyCLoRAStateFileError(
            f"hyclora calibration state {path} holds a {type(saved).__name__}, not a dict of tensors: it was "
            f"not written by save_hyclora_state; {_STATE_FIX}")
    return saved


def load_hyclora_state(model, folder_or_file: str, *, world_size: int = 1, rank: int = 0) -> Optional[str]:
    """Restore calibration buffers saved by ``save_hyclora_state``; returns the file used, or
    None when there is none. Buffers whose shape changed since ``apply_hyclora`` (statistics
    allocated lazily) are replaced rather than copied into."""
    path = folder_or_file
    if os.path.isdir(folder_or_file):
        candidates = [state_file_name(world_size, rank), STATE_FILE, state_file_name(2, 0)]
        path = next((os.path.join(folder_or_file, c) for c in candidates
                     if os.path.isfile(os.path.join(folder_or_file, c))), None)
        if path is None:
            return None
    saved = _read_state_file(path)
    modules = _state_modules(model)
    if not modules:
        raise ValueError(
            f"{path} holds hyclora calibration state but the model has no '{STATE_MODULE}' "
            "module: call apply_hyclora(model, config) before resuming"
        )
    # Keys are "<state module path>.<buffer path inside it>"; the buffer path may itself be
    # dotted (statistics live in submodules), so split on the module path, not the last dot.
    by_module: Dict[str, Dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, value in saved.items():
        name = key[: key.index(f"{STATE_MODULE}.") + len(STATE_MODULE)] if f"{STATE_MODULE}." in key else None
        if name is None or name not in modules:
            unmatched.append(key)
            continue
        by_module.setdefault(name, {})[key[len(name) + 1:]] = value
    missing = sorted(set(modules) - set(by_module))
    extra = unmatched
    if missing or extra:
        raise ValueError(
            f"{path} does not match the model's hyclora layers (missing {missing[:3]}, "
            f"unexpected {extra[:3]}): resume with the same model and HyCLoRAConfig"
        )
    for name, module in modules.items():
        sub = by_module[name]
        current = module.state_dict()
        # files written before ChannelStats kept empty outlier_idx buffers out of state_dict, and
        # before it saved frozen_forwards and its refresh window, hold the one and lack the others;
        # its strict load accepts them
        legacy_extra = {k for k in set(sub) - set(current) if k.endswith("outlier_idx") and sub[k].numel() == 0}
        legacy_missing = {k for k in set(current) - set(sub)
                          if k.rpartition(".")[2] in ("frozen_forwards", *ChannelStats.WINDOW_BUFFERS)}
        if set(sub) - legacy_extra != set(current) - legacy_missing:
            raise ValueError(
                f"{path}: {name} holds {sorted(set(sub) - set(current))[:3]} but not "
                f"{sorted(set(current) - set(sub))[:3]}: resume with the same HyCLoRAConfig"
            )
        for buffer, value in sub.items():
            if buffer in legacy_extra:
                continue
            target = current[buffer]
            if target.shape != value.shape:
                # A buffer allocated lazily (still at its placeholder shape): make room first.
                owner_path, _, leaf = buffer.rpartition(".")
                owner = module.get_submodule(owner_path) if owner_path else module
                owner.register_buffer(leaf, torch.empty(value.shape, dtype=target.dtype, device=target.device))
        # load_state_dict (not a raw copy_) so modules that mirror buffers on the host (e.g.
        # ChannelStats' calibration count) refresh them in their _load_from_state_dict hooks.
        module.load_state_dict(sub, strict=True)
    return path


class HyCLoRAStateCallback(TrainerCallback):
    """Saves hyclora calibration buffers into each checkpoint folder; on resume (pass the
    checkpoint path, or ``latest``/``true`` for the newest complete checkpoint of ``output_dir``)
    loads them back before the first training step.

    The buffers are written when the Trainer has decided to save (``on_step_end`` /
    ``on_epoch_end`` with ``should_save``), before it writes the checkpoint's files, so that
    ``trainer_state.json``, which the Trainer writes last, marks a checkpoint complete with its
    hyclora state (``hyclora.training.checkpoints``). ``on_save`` writes them where that was not
    done (e.g. ``save_strategy="best"``, decided after evaluation)."""

    def __init__(self, resume_from_checkpoint: Optional[str] = None):
        self.resume_from_checkpoint = resume_from_checkpoint
        self.loaded_from: Optional[str] = None
        self._saved_step: Optional[int] = None  # the step whose checkpoint already holds our state

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        resume = self.resume_from_checkpoint
        if resume is True or (isinstance(resume, str) and resume.strip().lower() in LATEST):
            resume = resolve_resume(resume, args.output_dir)
        if resume and model is not None and _state_modules(model):
            self.loaded_from = load_hyclora_state(
                model, resume, world_size=args.world_size, rank=args.process_index
            )
            if self.loaded_from is None:
                logger.warning(
                    "checkpoint %s has no hyclora state: calibration starts again",
                    resume,
                )

    @staticmethod
    def _folder(args, state) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def _save_before_trainer(self, args, state, control, model):
        if model is not None and control.should_save:
            save_hyclora_state(model, self._folder(args, state), world_size=args.world_size, rank=args.process_index)
            self._saved_step = state.global_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._save_before_trainer(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._save_before_trainer(args, state, control, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and self._saved_step != state.global_step:
            save_hyclora_state(model, self._folder(args, state), world_size=args.world_size, rank=args.process_index)


# -- memory and throughput ---------------------------------------------------------------------
def _rss_peak_gb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 30) if sys.platform == "darwin" else peak / (1 << 20)


class MemoryThroughputCallback(TrainerCallback):
    """Measures a training run and prints a summary at its end.

    * throughput: optimizer steps and (non-padding) input tokens per second over the whole run,
      and over the steps after the first (which includes warm-up, compilation, calibration), and
      the first step's seconds;
      tokens come from ``state.num_input_tokens_seen`` (``include_num_input_tokens_seen``).
    * CUDA: peak allocated / reserved bytes during training, what was allocated before the first
      step (weights, optimizer-free), the peak above it and the optimizer step in which it
      happened (``cuda_peak_step``; ``torch.cuda``'s peak counter is reset at train begin and
      after every step, so it reads per step while the run trains). With CUDA graphs, the
      memory their pool holds outside the allocator's "allocated" count (saved activations,
      scratch: :func:`hyclora.memory.graph_pool_free_bytes`) is added to each step that ran
      after the capture: ``cuda_peak_with_graph_pool_above_static_gb``.
    * CPU only: the process's peak resident set size over its whole life, labelled as such;
      nothing GPU-like is reported without a GPU.

    The numbers are in ``self.summary`` after training.
    """

    def __init__(self, print_summary: bool = True):
        self.print_summary = print_summary
        self.summary: Dict[str, object] = {}

    @staticmethod
    def _cuda(args) -> Optional[torch.device]:
        device = getattr(args, "device", None)
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            return device
        return None

    def on_train_begin(self, args, state, control, **kwargs):
        self._device = self._cuda(args)
        if self._device is not None:
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            self._static = torch.cuda.memory_allocated(self._device)
        self._peak, self._peak_step = 0, None
        self._pool_free, self._peak_with_pool, self._reserved = 0, 0, None
        self._t0 = time.perf_counter()
        self._step0 = state.global_step
        self._tokens0 = state.num_input_tokens_seen or 0
        self._first = None

    def _note_peak(self, step: int) -> None:
        peak = torch.cuda.max_memory_allocated(self._device)  # an allocator counter: no device sync
        if peak > self._peak:
            self._peak, self._peak_step = peak, step
        # a graph pool that existed before this step held its free-listed memory through it
        self._peak_with_pool = max(self._peak_with_pool, peak + self._pool_free)
        torch.cuda.reset_peak_memory_stats(self._device)
        reserved = torch.cuda.memory_reserved(self._device)
        if reserved != self._reserved:  # pools only change with the reserved memory (a capture, a release)
            self._reserved, self._pool_free = reserved, graph_pool_free_bytes(self._device)

    def on_step_end(self, args, state, control, **kwargs):
        if self._device is not None:
            self._note_peak(state.global_step)
        if self._first is None:
            if self._device is not None:
                torch.cuda.synchronize(self._device)
            self._first = (time.perf_counter(), state.global_step, state.num_input_tokens_seen or 0)

    def on_train_end(self, args, state, control, **kwargs):
        if self._device is not None:
            torch.cuda.synchronize(self._device)
        now = time.perf_counter()
        steps = state.global_step - self._step0
        tokens = (state.num_input_tokens_seen or 0) - self._tokens0
        elapsed = now - self._t0
        s: Dict[str, object] = {
            "device": str(getattr(args, "device", "cpu")),
            "train_steps": steps,
            "train_seconds": elapsed,
            "steps_per_s": steps / elapsed if elapsed > 0 else None,
            "input_tokens": tokens if tokens else None,
            "tokens_per_s": tokens / elapsed if tokens and elapsed > 0 else None,
        }
        if self._first is not None:
            s["first_step_seconds"] = self._first[0] - self._t0
        if self._first is not None and state.global_step > self._first[1]:
            dt = now - self._first[0]
            dtok = (state.num_input_tokens_seen or 0) - self._first[2]
            s["seconds_per_step_after_first"] = dt / (state.global_step - self._first[1])
            s["tokens_per_s_after_first"] = dtok / dt if dtok and dt > 0 else None
        if self._device is not None:
            self._note_peak(state.global_step)  # whatever ran after the last step
            s["cuda_static_gb"] = self._static / 2**30
            s["cuda_peak_allocated_gb"] = self._peak / 2**30
            s["cuda_peak_step"] = self._peak_step
            s["cuda_peak_above_static_gb"] = s["cuda_peak_allocated_gb"] - s["cuda_static_gb"]
            s["cuda_peak_with_graph_pool_above_static_gb"] = (self._peak_with_pool - self._static) / 2**30
            s["cuda_peak_reserved_gb"] = torch.cuda.max_memory_reserved(self._device) / 2**30
        else:
            s["cpu_peak_rss_gb_process_lifetime"] = _rss_peak_gb()
        self.summary = s
        if self.print_summary and state.is_world_process_zero:
            print(format_summary(s), flush=True)


def format_summary(summary: Dict[str, object]) -> str:
    lines = ["training summary (hyclora MemoryThroughputCallback)"]
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if value is None:
            text = "n/a"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        lines.append(f"  {key.ljust(width)}  {text}")
    return "\n".join(lines)


__all__ = [
    "STATE_MODULE",
    "STATE_FILE",
    "hyclora_state_dict",
    "save_hyclora_state",
    "load_hyclora_state",
    "HyCLoRAStateFileError",
    "HyCLoRAStateCallback",
    "MemoryThroughputCallback",
    "format_summary",
]
