"""What every Triton kernel of hyclora shares: the optional ``triton`` import, the environment,
backend resolution, launch options, tile helpers and the ``@triton.jit`` pieces of the LoRA dot.

A leaf: imports nothing from hyclora (``hyclora.quant`` and every kernel module import it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

try:  # Triton is optional: without it only the torch references (CPU / backend='torch') exist
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Linux images ship triton
    triton = None
    tl = None

# The environment is read here and nowhere else, once, at import: the variables must be set
# before Python starts (the interpreter mode is fixed when triton is imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("HYCLORA_QUANT_AUTOTUNE", "1") != "0"
# where the autotuner's choices are kept across runs (:class:`TuningCache`)
TUNING_CACHE_DIR = os.path.join(
    os.path.expanduser(os.environ.get("HYCLORA_CACHE_DIR")
                       or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "hyclora")), "autotune")

BACKENDS = ("auto", "triton", "torch")

# (BLOCK_M, BLOCK_N, num_warps, ROW_ITERS) of the tensor-core LoRA-epilogue kernels when
# autotuning is off (HYCLORA_QUANT_AUTOTUNE=0); 80-91 registers at r=16, no spills on sm_90
FIXED_TILE = (32, 64, 8, 2)

_RESOLVED_BACKENDS: Dict[Tuple[str, str], str] = {}  # answers that cannot change within a process


def resolve_backend(backend: str, device: torch.device) -> str:
    """``'auto'`` -> Triton for CUDA tensors, torch otherwise; ``'triton'`` on CPU needs the
    interpreter; anything else is refused by name."""
    known = _RESOLVED_BACKENDS.get((backend, device.type))
    if known is not None:  # runs once per kernel call: skip the checks (host time)
        return known
    resolved = _resolve_backend(backend, device)
    _RESOLVED_BACKENDS[(backend, device.type)] = resolved
    return resolved


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: use one of {BACKENDS}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if backend == "triton":
        if device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"backend='triton' on a {device.type} tensor needs the Triton interpreter: "
                f"set TRITON_INTERPRET=1 before Python starts, or use backend='torch'."
            )
        if triton is None:
            raise RuntimeError("backend='triton' needs the `triton` package (pip install triton), "
                               "or use backend='torch'.")
    return backend


# the thread computing Triton's compiler hash, until the first kernel launch waits for it
_PENDING_HASH: Dict[str, threading.Thread] = {}


def start_compiler_hash(device: torch.device, backend: str = "auto") -> Optional[threading.Thread]:
    """Start computing Triton's once-per-process compiler hash (``triton_key``: a SHA-256 of its
    shared library and sources, which the first kernel launch of a process needs) on a daemon
    thread, so that it overlaps the set-up before the first training step where that set-up
    leaves the GIL free (file reads, GPU work, tokenizers; hashing itself releases it). The first
    launch then waits for the thread (:func:`check_triton_device`) instead of hashing again beside
    it. Returns the thread, or None where no Triton kernel will run (``backend`` ``"torch"``, a
    device other than CUDA, the interpreter) or the hash is known."""
    if backend == "torch" or triton is None or INTERPRET or device.type != "cuda" or _PENDING_HASH:
        return None
    try:
        from triton.runtime import cache
    except ImportError:  # pragma: no cover - a Triton without this module hashes its own way
        return None
    triton_key = getattr(cache, "triton_key", None)
    info = getattr(triton_key, "cache_info", None)
    if info is None or info().currsize:
        return None

    def compute():
        try:
            triton_key()
        except Exception:  # the first launch computes it again and reports the error in context
            pass

    thread = threading.Thread(target=compute, name="hyclora-triton-compiler-hash", daemon=True)
    _PENDING_HASH["thread"] = thread
    thread.start()
    return thread


def _wait_for_compiler_hash() -> None:
    thread = _PENDING_HASH.pop("thread", None)
    if thread is not None:
        thread.join(timeout=60)  # else the launch hashes by itself


def check_triton_device(what: str, *tensors: Optional[torch.Tensor]) -> None:
    """Refuse tensors the Triton kernels of ``what`` cannot take, naming the fix. Runs before
    every launch: the first waits for :func:`start_compiler_hash`'s thread."""
    if triton is None:
        raise RuntimeError(f"hyclora {what}: backend='triton' needs the `triton` package; use backend='torch'.")
    if _PENDING_HASH:
        _wait_for_compiler_hash()
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"hyclora {what}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                "before Python starts); use backend='torch' for CPU tensors."
            )


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def prev_pow2(n: int) -> int:
    """The largest power of two <= ``n`` (``n >= 1``)."""
    return 1 << (n.bit_length() - 1)


def block_r(r: int) -> int:
    """The rank tile: ``tl.dot`` needs K >= 16 and a power of two; the rank is zero-padded by
    masked loads."""
    return max(16, next_pow2(r))


def interpret_tile(m: int, n: int) -> Tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, ROW_ITERS)`` under the interpreter, which pays per
    program, not per element: few, large tiles."""
    return max(16, min(next_pow2(m), 64)), max(16, min(next_pow2(n), 128)), 4, 1


def launch_opts(num_warps: int) -> dict:
    """Launch keywords: none under the interpreter; on GPU no FMA contraction, so that
    ``(y - lo) * inv + 0.5`` rounds twice like the torch references."""
    if INTERPRET:
        return {}
    return dict(num_warps=num_warps, enable_fp_fusion=False)


def dot_dtype_for(xa: torch.Tensor, lora_b: torch.Tensor) -> torch.dtype:
    """The dtype torch's ``F.linear(xa, lora_b)`` computes in here: the autocast dtype when
    autocast is on for this device type, else the promoted dtype of the two operands."""
    dev = xa.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError):  # pragma: no cover - device type without autocast
        pass
    return torch.promote_types(xa.dtype, lora_b.dtype)


def promoted_dtype(dot_dtype: Optional[torch.dtype], *tensors: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """``dot_dtype`` if given, else the promoted dtype of the tensors present (None: none are)."""
    if dot_dtype is not None:
        return dot_dtype
    out = None
    for t in tensors:
        if t is not None:
            out = t.dtype if out is None else torch.promote_types(out, t.dtype)
    return out


def lora_term_torch(xa: Optional[torch.Tensor], b: Optional[torch.Tensor], dot_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """fp32 ``xa @ b^T`` of operands rounded to ``dot_dtype``: what the kernels' LoRA dot computes
    (the torch references use it)."""
    if xa is None:
        return None
    return xa.to(dot_dtype).float() @ b.to(dot_dtype).float().t()


def with_lora(base: torch.Tensor, lora: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``base + scale * lora`` (``base`` when there is no LoRA term)."""
    return base if lora is None else base + lora * scale


def dot_operands(what: str, dot_dtype: Optional[torch.dtype], pairs, *, tensor_core_on_fp32: bool = False):
    """Round the LoRA operands ``pairs`` (``[(xa, b), ...]``, ``None`` where absent) to the dot
    dtype in torch (round to nearest even; tiny tensors), so that the kernels only ever upcast
    them exactly. Returns ``(operands in the order given, R, DOT_FP32)``.

    The interpreter's bf16/fp16 ``tl.dot`` is wrong, so there the operands are upcast to fp32
    (exact) instead. ``tensor_core_on_fp32`` (tests): run the tensor-core branch on fp32 operands,
    which the interpreter computes correctly, so that the GPU branch's loads and masks run too."""
    flat = [t for pair in pairs for t in pair]
    present = [(xa, b) for xa, b in pairs if xa is not None]
    if not present:
        return flat, 1, True
    dot_dtype = promoted_dtype(dot_dtype, *flat)
    if dot_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hyclora {what}: dot dtype {dot_dtype} is not supported (fp32/bf16/fp16).")
    ranks = {xa.shape[1] for xa, _ in present}
    if len(ranks) != 1:
        # one BLOCK_R per launch; different ranks would need two launches (not a PEFT default)
        raise ValueError(f"hyclora {what}: LoRA ranks differ between the fused projections ({sorted(ranks)}); "
                         "use one rank for them, or layer_type='intra_inter'.")
    dot_fp32 = dot_dtype == torch.float32 or INTERPRET
    if tensor_core_on_fp32:
        if dot_dtype != torch.float32 or not INTERPRET:
            raise ValueError("tensor_core_on_fp32 runs the tensor-core branch on fp32 operands under the interpreter only")
        dot_fp32 = False
    return [None if t is None else t.to(dot_dtype).contiguous() for t in flat], ranks.pop(), dot_fp32


# -- launching an autotuned kernel: tuned once per key and token bucket, remembered on disk -------
# ``Autotuner.run`` rebuilds an argument dict, its key and the dtype list on every launch (host
# time that matters where a step is host-bound): ``launch_tuned`` asks the autotuner once per key
# and then launches the tuned kernel directly with the chosen meta-parameters. Tuning compiles and
# times every config (seconds per kernel variant, the first step's stall): the choice is kept on
# disk (:class:`TuningCache`) so that a later run compiles the winner only. Triton caches the
# compiled binaries itself (``TRITON_CACHE_DIR``, default ``~/.triton/cache``); we cache the choice.
# The key adds the token count in buckets (:func:`token_bucket`): a new padded length reuses its
# bucket's choice, the launch itself gets the real count (the kernels mask rows with it).
TOKEN_BUCKET_MIN = 1024
logger = logging.getLogger("hyclora.kernels.tuning")


def token_bucket(tokens: int) -> int:
    """The tuning bucket of a token count: the next power of four, at least 1024. Powers of four,
    not two: each bucket costs a tuning per kernel variant on a cold cache, and a tile's ranking
    is not expected to flip within a factor of four (not measured)."""
    bucket = TOKEN_BUCKET_MIN
    while bucket < tokens:
        bucket *= 4
    return bucket


def device_tag(device: torch.device) -> Dict[str, str]:
    """What a tuned config is valid for: the GPU model, its compute capability, Triton's version
    (under the interpreter: the device type)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = "%d.%d" % torch.cuda.get_device_capability(device)
    else:
        name, capability = f"{device.type} (Triton interpreter)", "none"
    return {"device": name, "capability": capability, "triton": getattr(triton, "__version__", "none")}


class TuningCache:
    """The autotuner's choices on disk: one JSON file per (GPU, capability, Triton version,
    kernel) under ``directory``, mapping a tuning key to the chosen config's keyword arguments.
    ``directory=None``: nothing is read or written.

    Files are replaced atomically (a temporary file, then ``os.replace``), re-read and merged just
    before each write, so that ranks writing at once lose at most an entry (tuned again next run).
    A file that cannot be read, was written for another device or Triton, or holds a config the
    kernel does not list is ignored with a warning, never trusted."""

    FORMAT = 1

    def __init__(self, directory: Optional[str]):
        self.directory = directory
        self._files: Dict[str, Dict[str, Any]] = {}  # path -> its entries, read once per process
        self._unwritable = False

    def forget(self) -> None:
        """Drop what was read (the next lookup reads the files again)."""
        self._files.clear()

    def path(self, tag: Dict[str, str], kernel: str) -> str:
        stem = f"{tag['device']}-sm{tag['capability']}-triton{tag['triton']}-{kernel}"
        return os.path.join(self.directory, re.sub(r"[^A-Za-z0-9._-]+", "_", stem) + ".json")

    def lookup(self, tag: Dict[str, str], kernel: str, entry: str, configs) -> Optional[Dict[str, Any]]:
        """The stored config of ``entry`` if it is one of ``configs`` (dicts of a config's keyword
        arguments), else None."""
        if self.directory is None:
            return None
        entries = self._entries(tag, kernel)
        stored = entries.get(entry)
        if stored is None:
            return None
        if not any(stored == c for c in configs):
            path = self.path(tag, kernel)
            warnings.warn(f"hyclora: ignoring the tuned config {stored!r} of {kernel} [{entry}] in {path}: "
                          "it is not one of the kernel's configs (another hyclora version?); tuning it again.")
            del entries[entry]
            return None
        return dict(stored)

    def store(self, tag: Dict[str, str], kernel: str, entry: str, config: Dict[str, Any]) -> None:
        if self.directory is None:
            return
        entries = self._entries(tag, kernel)
        entries[entry] = dict(config)
        if self._unwritable:
            return
        path = self.path(tag, kernel)
        tmp = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            entries.update({k: v for k, v in self._read(path, tag, kernel, quiet=True).items() if k not in entries})
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(dict(format=self.FORMAT, kernel=kernel, **tag, entries=entries), f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            self._unwritable = True
            warnings.warn(f"hyclora: cannot write the tuning cache {path} ({e}); tuned configs are kept for this "
                          "process only. Set HYCLORA_CACHE_DIR to a writable folder.")
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def _entries(self, tag: Dict[str, str], kernel: str) -> Dict[str, Any]:
        path = self.path(tag, kernel)
        if path not in self._files:
            self._files[path] = self._read(path, tag, kernel)
        return self._files[path]

    def _read(self, path: str, tag: Dict[str, str], kernel: str, quiet: bool = False) -> Dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as e:  # unreadable, truncated, not JSON
            if not quiet:
                warnings.warn(f"hyclora: ignoring the tuning cache {path}: {e}; the kernel is tuned again and "
                              "the file rewritten.")
            return {}
        expected = dict(format=self.FORMAT, kernel=kernel, **tag)
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict) or any(
                data.get(k) != v for k, v in expected.items()):
            if not quiet:
                found = {k: data.get(k) for k in expected} if isinstance(data, dict) else type(data).__name__
                warnings.warn(f"hyclora: ignoring the tuning cache {path}: written for {found}, not {expected}; "
                              "the kernel is tuned again and the file rewritten.")
            return {}
        return data["entries"]


_disk_cache = TuningCache(TUNING_CACHE_DIR)
_best: Dict[Tuple[int, Hashable, Optional[int]], Dict[str, Any]] = {}
_key_positions: Dict[int, Tuple[Tuple[Any, str], ...]] = {}


def _tuner_key(tuner, args: tuple, kwargs: dict) -> Hashable:
    spec = _key_positions.get(id(tuner))
    if spec is None:
        names = list(tuner.arg_names)
        spec = tuple((names.index(k) if names.index(k) < len(args) else None, k) for k in tuner.keys)
        _key_positions[id(tuner)] = spec
    return (tuple(args[i] if i is not None else kwargs.get(k) for i, k in spec)
            + tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))


def _kernel_name(tuner) -> str:
    base = getattr(tuner, "base_fn", None)
    name = getattr(base, "__name__", type(tuner).__name__).strip("_")
    return name[: -len("_kernel")] if name.endswith("_kernel") else name


def _source_hash(tuner) -> str:
    """Triton's hash of the kernel's source and the jit functions it calls (the interpreter has
    none: the source text's): a changed kernel is tuned again."""
    key = getattr(getattr(tuner, "fn", None), "cache_key", None)
    if not isinstance(key, str):
        try:
            key = inspect.getsource(tuner.base_fn)
        except (AttributeError, OSError, TypeError):
            key = ""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _key_text(tuner, key: tuple, bucket: Optional[int]) -> str:
    names = list(tuner.keys)
    text = ",".join(f"{n}={v}" for n, v in zip(names, key))
    return text + ("" if bucket is None else f",M<={bucket}")


def _recall_or_tune(tuner, grid: Callable, args: tuple, kwargs: dict, key: tuple, bucket: Optional[int],
                    cache: TuningCache) -> Tuple[Dict[str, Any], bool]:
    """``(config, launched)``: the stored choice for this key (not launched), or the autotuner's
    (which launched the kernel), stored."""
    name = _kernel_name(tuner)
    label = _key_text(tuner, key, bucket)
    dtypes = ",".join(str(d).replace("torch.", "") for d in key[len(tuner.keys):])
    entry = f"{_source_hash(tuner)}|{label}|{dtypes}"
    tag = device_tag(next(a.device for a in args if isinstance(a, torch.Tensor)))
    configs = [c.all_kwargs() for c in tuner.configs] if cache.directory is not None else ()
    stored = cache.lookup(tag, name, entry, configs)
    if stored is not None:
        return stored, False
    logger.info("hyclora: tuning %s[%s] over %d configs (once per GPU model, kernel and size bucket%s)",
                name, label, len(getattr(tuner, "configs", ())),
                "" if cache.directory is None else f"; remembered in {cache.directory}")
    # Triton's own memo has no token bucket: time this bucket's configs afresh
    own_memo = getattr(tuner, "cache", None)
    if isinstance(own_memo, dict):
        own_memo.clear()
    tuner[grid](*args, **kwargs)
    best = tuner.best_config.all_kwargs()
    cache.store(tag, name, entry, best)
    return best, True


def launch_tuned(tuner, grid: Callable, args: tuple, kwargs: dict, *, tokens: Optional[int] = None,
                 cache: Optional[TuningCache] = None) -> None:
    """Launch ``tuner``'s kernel with the config chosen for its key, the argument dtypes and the
    token bucket of ``tokens`` (None: no bucket): remembered in the process, else read from
    ``cache`` (default: :data:`TUNING_CACHE_DIR`), else tuned by ``tuner[grid](*args, **kwargs)``
    (one INFO line of ``hyclora.kernels.tuning``) and stored; later launches are
    ``tuner.fn[grid](*args, **kwargs, **best)``.

    ``tuner`` must live as long as the process (an ``functools.lru_cache``'d builder) and its
    configs carry no ``pre_hook`` (the direct launch does not run it)."""
    bucket = None if tokens is None else token_bucket(tokens)
    memo = (id(tuner), _tuner_key(tuner, args, kwargs), bucket)
    best = _best.get(memo)
    if best is None:
        best, launched = _recall_or_tune(tuner, grid, args, kwargs, memo[1], bucket,
                                         _disk_cache if cache is None else cache)
        _best[memo] = best
        if launched:
            return
    tuner.fn[grid](*args, **kwargs, **best)


def tuned_choices() -> Dict[Tuple[int, Hashable, Optional[int]], Dict[str, Any]]:
    """The configs chosen in this process: ``{(id(tuner), key values + dtypes, token bucket): config}``."""
    return dict(_best)


def forget_tuned() -> None:
    """Forget the configs chosen in this process (the next launch of every key reads the disk
    cache again, as a new process would, and tunes what it does not hold)."""
    _best.clear()
    _disk_cache.forget()


if triton is not None:

    @triton.jit
    def cast_out(y, out_ptr, EMULATE_BF16_RNE: tl.constexpr):
        """``y`` in the element type of ``out_ptr``. The interpreter truncates fp32 -> bf16:
        there round to nearest even by hand, like torch and ``cvt.rn``."""
        if EMULATE_BF16_RNE:
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return y.to(out_ptr.dtype.element_ty)

    @triton.jit
    def load_bt(b_ptr, cols, cmask, R, stride_bn, BLOCK_R: tl.constexpr):
        """``B^T`` tile ``(BLOCK_R, BLOCK_N)`` of PEFT's ``(out_features, r)`` lora_B, rank
        zero-padded."""
        ks = tl.arange(0, BLOCK_R)
        return tl.load(b_ptr + ks[:, None] + cols[None, :] * stride_bn,
                       mask=(ks < R)[:, None] & cmask[None, :], other=0.0)

    @triton.jit
    def column_block(pid_n, N, BLOCK_N: tl.constexpr):
        """The ``BLOCK_N`` columns of program ``pid_n`` and their mask."""
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return cols, cols < N

    @triton.jit
    def byte_columns(pid_n, NB, BLOCK_N: tl.constexpr, BITS: tl.constexpr):
        """The packed-byte columns holding program ``pid_n``'s ``BLOCK_N`` codes of ``BITS`` bits,
        and their mask (``NB`` bytes per row)."""
        BLOCK_B: tl.constexpr = BLOCK_N // (8 // BITS)
        bcols = pid_n * BLOCK_B + tl.arange(0, BLOCK_B)
        return bcols, bcols < NB

    @triton.jit
    def row_block(pid_m, it, M, BLOCK_M: tl.constexpr, ROW_ITERS: tl.constexpr):
        """Rows (int64: beyond 2^31 elements) of sub-tile ``it`` of program ``pid_m``, and their mask."""
        rows = ((pid_m * ROW_ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        return rows, rows < M

    @triton.jit
    def channel_row(ptr, cols, cmask):
        """A per-channel fp32 parameter of the column block, as a row broadcast over the rows."""
        return tl.load(ptr + cols, mask=cmask, other=0.0)[None, :]

    @triton.jit
    def program_bt(b_ptr, cols, cmask, R, stride_bn, HAS_LORA: tl.constexpr, FMA_PATH: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """The ``B^T`` tile a program reuses for all its rows (tensor-core dot). The fp32 dot of
        :func:`lora_tile` loads it per K chunk instead, and without LoRA there is none: then an
        unused zero tile of the same type (one return type; the compiler drops it)."""
        if HAS_LORA and not FMA_PATH:
            return load_bt(b_ptr, cols, cmask, R, stride_bn, BLOCK_R)
        return tl.zeros((BLOCK_R, BLOCK_N), b_ptr.dtype.element_ty)

    @triton.jit
    def lora_tile(xa_ptr, b_ptr, bt, rows, rmask, cols, cmask, R, stride_xm, stride_bn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  DOT_FP32: tl.constexpr):
        """fp32 ``(BLOCK_M, BLOCK_N)`` tile of ``xa[rows, :R] @ B[cols, :R]^T`` (rank zero-padded)."""
        if DOT_FP32:
            # fp32 operands (exact upcasts of already rounded values), IEEE products: what torch
            # computes for an fp32 matmul, and the only correct dot in the interpreter. K in
            # chunks of 16 with B^T loaded per chunk: the whole K extent in registers spills.
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, BLOCK_R, 16):
                ks = k0 + tl.arange(0, 16)
                a = tl.load(xa_ptr + rows[:, None] * stride_xm + ks[None, :],
                            mask=rmask[:, None] & (ks < R)[None, :], other=0.0)
                b = tl.load(b_ptr + ks[:, None] + cols[None, :] * stride_bn,
                            mask=(ks < R)[:, None] & cmask[None, :], other=0.0)
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            return acc
        else:
            # tensor cores on bf16/fp16 operands, fp32 accumulation; bt (B^T) was loaded once
            # per program and is reused for all its row sub-tiles
            ks = tl.arange(0, BLOCK_R)
            a = tl.load(xa_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=rmask[:, None] & (ks < R)[None, :], other=0.0)
            return tl.dot(a, bt, out_dtype=tl.float32)


__all__ = [
    "triton", "tl", "INTERPRET", "AUTOTUNE", "BACKENDS", "FIXED_TILE", "resolve_backend", "start_compiler_hash",
    "check_triton_device",
    "next_pow2", "prev_pow2", "block_r", "interpret_tile", "launch_opts", "dot_dtype_for", "promoted_dtype",
    "lora_term_torch", "with_lora", "dot_operands", "launch_tuned", "forget_tuned", "tuned_choices", "token_bucket",
    "device_tag", "TuningCache", "TUNING_CACHE_DIR", "TOKEN_BUCKET_MIN", "cast_out", "load_bt", "lora_tile",
    "column_block", "byte_columns", "row_block", "channel_row", "program_bt",
]
