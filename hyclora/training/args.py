"""Command-line arguments of the examples: HfArgumentParser dataclasses and per-task defaults.

One parser serves every example: model, data, LoRA, hyclora (``HyCLoRAConfig`` itself, so the
flags are the reference's ``--use_hyclora --layer_type --q_bit ...``) and HF
``TrainingArguments`` (which bring ``--deepspeed``, ``--local_rank``, ``--bf16``,
``--gradient_accumulation_steps``, ``--resume_from_checkpoint`` ...) and the activation-checkpointing
switches: ``--activation_checkpointing true`` (on/off; transformers' own field from 5.23, added here on
older versions, ``--gradient_checkpointing`` its alias), ``--checkpointing_backend``,
``--checkpoint_every_k``. Each task's defaults follow the paper's Table 8 and the reference scripts;
anything on the command line wins.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hyclora.config import HyCLoRAConfig

TASKS = ("gsm8k", "wikitext2", "multitask")
LLAMA_LINEARS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "local folder or hub id of the base model; 'tiny-random-llama' builds a "
                          "2-layer random Llama with a BPE tokenizer trained on synthetic problems "
                          "(smoke tests only)"},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "tokenizer folder or hub id (default: the model's)"}
    )
    gguf_file: Optional[str] = field(
        default=None, metadata={"help": "GGUF file name inside model_name_or_path (dequantised on load)"}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "NF4 4-bit base weights (QLoRA, the paper's setting); needs bitsandbytes and CUDA"},
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4"})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "double-quantise the 4-bit scales"})
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "dtype of the base weights: float32, bfloat16, float16 or auto "
                          "(default: bfloat16 with --bf16, else float32)"},
    )
    attn_implementation: str = field(
        default="eager",
        metadata={"help": "eager (the paper's; needed for the sparse attention map), sdpa, ..."},
    )
    trust_remote_code: bool = field(default=False)


@dataclass
class DataArguments:
    data: Optional[str] = field(
        default=None,
        metadata={"help": "hub dataset name (online), a local file/folder (../shared/data formats), "
                          "or synthetic[:N] (GSM8K task)"},
    )
    eval_data: Optional[str] = field(
        default=None,
        metadata={"help": "evaluation data when it is not next to --data (GSM8K test file, "
                          "WikiText test file, LLM-Adapters dataset/ folder)"},
    )
    max_length: int = field(
        default=512, metadata={"help": "max tokens per example (WikiText: the block size)"}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use the first N training examples"})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "first N evaluation examples/blocks for the eval loss"}
    )
    max_generate_samples: Optional[int] = field(
        default=None,
        metadata={"help": "first N test problems (per set) for generation accuracy; 0 skips generation"},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget per answer"})
    eval_sets: str = field(
        default="gsm8k,SVAMP,mawps,AQuA,AddSub,MultiArith,SingleEq",
        metadata={"help": "multitask evaluation sets (comma-separated)"},
    )
    strip_calc_annotations: bool = field(
        default=False, metadata={"help": "drop GSM8K's <<a*b=c>> annotations from targets"}
    )
    pad_to_multiple_of: Optional[int] = field(
        default=None,
        metadata={"help": "round padded lengths up (default: 32 for intra_inter_full_fuse, else 8)"},
    )
    synthetic_seed: int = field(default=0, metadata={"help": "seed of --data synthetic"})
    results_file: Optional[str] = field(
        default=None, metadata={"help": "results JSON (default: <output_dir>/results.json)"}
    )
    progress: bool = field(default=True, metadata={"help": "progress bars during evaluation"})
    packing: Optional[bool] = field(
        default=None,
        metadata={"help": "padding-free training: whole examples concatenated into packed rows (TRL's "
                          "best-fit-decreasing packer), attention and RoPE positions per example "
                          "(hyclora.data.packing; needs trl). Every micro-batch has the one shape "
                          "--tokens_per_batch gives, so --cuda_graphs replays it. SFT tasks (gsm8k, multitask). "
                          "Default: on where the CUDA graphs can replay (hyclora on one CUDA device, see "
                          "--cuda_graphs) and trl is installed, else off"},
    )
    tokens_per_batch: Optional[int] = field(
        default=None,
        metadata={"help": "with --packing: tokens of each micro-batch, as --per_device_train_batch_size rows of "
                          "tokens_per_batch / per_device_train_batch_size tokens each (a multiple of it, each "
                          "row at least --max_length). Default: per_device_train_batch_size * max_length"},
    )

    def __post_init__(self) -> None:
        if self.tokens_per_batch is not None and self.packing is False:
            raise ValueError("--tokens_per_batch sets the size of packed micro-batches: drop --packing false, or drop it")
        if self.tokens_per_batch is not None:
            self.packing = True  # asking for a packed size asks for packing
        if self.tokens_per_batch is not None and (isinstance(self.tokens_per_batch, bool) or self.tokens_per_batch < 2):
            raise ValueError(f"--tokens_per_batch {self.tokens_per_batch}: expected a token count >= 2")

    def packed_row_tokens(self, rows: int) -> int:
        """Tokens per packed row for micro-batches of ``rows`` rows (``--tokens_per_batch``)."""
        if self.tokens_per_batch is None:
            return self.max_length
        if self.tokens_per_batch % rows or self.tokens_per_batch // rows < self.max_length:
            raise ValueError(
                f"--tokens_per_batch {self.tokens_per_batch}: expected a multiple of --per_device_train_batch_size "
                f"{rows} with at least --max_length {self.max_length} tokens per row (e.g. "
                f"{rows * self.max_length}); an example is never split across rows")
        return self.tokens_per_batch // rows


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (paper: alpha = r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default=LLAMA_LINEARS, metadata={"help": "comma-separated module names, or all-linear"}
    )
    lora_init: str = field(
        default="default",
        metadata={"help": "PEFT init_lora_weights: default, gaussian, pissa, olora, loftq, ..."},
    )

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"--lora_r {self.lora_r}: expected a positive rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout {self.lora_dropout}: expected a value in [0, 1)")

    def target_modules(self):
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        names = [n.strip() for n in self.lora_target_modules.split(",") if n.strip()]
        if not names:
            raise ValueError("--lora_target_modules is empty")
        return names


CHECKPOINTING_MODES = ("auto", "none", "hf", "deepspeed")


@dataclass
class CheckpointingArguments:
    checkpointing_backend: str = field(
        default="auto",
        metadata={"help": "auto | none | hf | deepspeed: how the layers are checkpointed (--activation_checkpointing "
                          "true switches checkpointing on). hf: torch.utils.checkpoint (non-reentrant unless "
                          "--activation_checkpointing_kwargs says use_reentrant) on every "
                          "--checkpoint_every_k-th decoder layer, what HF's activation checkpointing installs; "
                          "deepspeed: deepspeed.checkpointing, configured from the activation_checkpointing "
                          "block of the --deepspeed JSON (partition_activations, cpu_checkpointing, ...), "
                          "which HF Trainer alone ignores. auto (default): deepspeed when the --deepspeed "
                          "JSON has an activation_checkpointing block (e.g. ds_configs/zero2_actckpt.json), "
                          "else hf when --activation_checkpointing true or --checkpoint_every_k > 1, else none. "
                          "Checkpointed hyclora layers still compress what their recompute saves.",
                  "choices": CHECKPOINTING_MODES},
    )
    checkpoint_every_k: int = field(
        default=1,
        metadata={"help": "hybrid policy: checkpoint decoder layers 0, k, 2k, ... and let the others keep "
                          "their (hyclora-compressed) activations; 1 = every layer"},
    )

    checkpoint_boundary_bits: int = field(
        default=0,
        metadata={"help": "0 | 2 | 4 | 8. With hf checkpointing: keep each checkpointed layer's input "
                          "quantised at this width (1 percent of the channels exact) instead of exactly; the "
                          "backward recomputes the layer from the reconstruction. 8 is near lossless and "
                          "about halves the boundaries' memory; 4 costs accuracy (BENCHMARKS.md). 0: exact."},
    )

    chunked_lm_loss: bool = field(
        default=False,
        metadata={"help": "train with the LM loss computed in chunks through the LM head "
                          "(hyclora.integrations.longseq.CausalLMChunkedLoss): the (tokens, vocab) logits, their "
                          "fp32 upcast and their gradient never exist at once. Same loss and gradients as the "
                          "model's own loss; evaluation keeps the "
                          "model's loss. Single process only (it calls the decoder and the LM head itself, which "
                          "DDP/DeepSpeed wrappers would not see): use launch/longseq.py for distributed runs."},
    )

    cuda_graphs: Optional[bool] = field(
        default=None,
        metadata={"help": "replay CUDA graphs of the compressed decoder layers once their statistics are "
                          "frozen (hyclora.cuda_graphs; CUDA, single process, no activation checkpointing, no "
                          "LoRA dropout). A hyclora step at a few thousand tokens is bound by the host's "
                          "kernel launches, which replaying removes. Calls replay only at the "
                          "first captured batch shape and without "
                          "padding masks (packed or equal-length batches, e.g. wikitext2); others run eager. "
                          "The end-of-run summary counts replays and eager calls. Default: on where it can "
                          "replay (those conditions, with packed batches or wikitext2's full rows), else off"},
    )

    def __post_init__(self) -> None:
        if self.checkpoint_boundary_bits not in (0, 2, 4, 8) or isinstance(self.checkpoint_boundary_bits, bool):
            raise ValueError(f"--checkpoint_boundary_bits {self.checkpoint_boundary_bits!r}: expected 0 (exact), 2, 4 or 8")
        if self.checkpointing_backend not in CHECKPOINTING_MODES:
            raise ValueError(
                f"--checkpointing_backend {self.checkpointing_backend!r}: expected one of {CHECKPOINTING_MODES}"
            )
        if isinstance(self.checkpoint_every_k, bool) or self.checkpoint_every_k < 1:
            raise ValueError(f"--checkpoint_every_k {self.checkpoint_every_k}: expected an integer >= 1 (1 = every layer)")
        if self.checkpointing_backend == "none" and self.checkpoint_every_k != 1:
            raise ValueError("--checkpoint_every_k only applies with checkpointing on: drop it or pass "
                             "--checkpointing_backend hf (or deepspeed)")


@dataclass
class ActivationCheckpointingSwitch:
    """``--activation_checkpointing`` / ``--activation_checkpointing_kwargs`` for transformers < 5.23,
    whose ``TrainingArguments`` only know the ``gradient_checkpointing`` spellings (5.23 renamed them
    and kept the old ones as deprecated aliases). Added to the parser only on those versions (see
    :func:`with_checkpointing_switch`); :func:`parse_dataclasses` folds the values into
    ``TrainingArguments.gradient_checkpointing[_kwargs]`` as 5.23+ does (the new name wins when set),
    so one spelling works on every supported version."""

    activation_checkpointing: Optional[bool] = field(
        default=None,
        metadata={"help": "activation checkpointing on/off (true/false; bare flag = true); "
                          "--gradient_checkpointing is its alias. --checkpointing_backend picks how.",
                  "nargs": "?", "const": True},
    )
    activation_checkpointing_kwargs: Optional[str] = field(
        default=None,
        metadata={"help": "JSON object of checkpointing options, e.g. '{\"use_reentrant\": true}'; "
                          "--gradient_checkpointing_kwargs is its alias"},
    )


def trainer_has_activation_checkpointing() -> bool:
    """True where ``TrainingArguments`` has its own ``activation_checkpointing`` field (transformers >= 5.23)."""
    from transformers import TrainingArguments

    return "activation_checkpointing" in TrainingArguments.__dataclass_fields__


def with_checkpointing_switch(dataclass_types: Sequence[type]) -> Tuple[type, ...]:
    """``dataclass_types`` plus :class:`ActivationCheckpointingSwitch` where ``TrainingArguments``
    lacks ``activation_checkpointing`` (a second copy would be a conflicting option)."""
    types = tuple(dataclass_types)
    return types if trainer_has_activation_checkpointing() else types + (ActivationCheckpointingSwitch,)


def checkpointing_requested(training_args) -> bool:
    """Whether ``--activation_checkpointing true`` (or its alias ``--gradient_checkpointing true``)
    was asked for: the one place that reads the switch, whichever transformers names it."""
    return bool(getattr(training_args, "activation_checkpointing", None)
                or getattr(training_args, "gradient_checkpointing", None))


def checkpointing_kwargs(training_args) -> Dict[str, Any]:
    """``--activation_checkpointing_kwargs`` (or its alias ``--gradient_checkpointing_kwargs``) as a dict."""
    kwargs = getattr(training_args, "activation_checkpointing_kwargs", None)
    if kwargs is None:
        kwargs = getattr(training_args, "gradient_checkpointing_kwargs", None)
    return dict(kwargs or {})


def clear_trainer_checkpointing(training_args) -> None:
    """Turn Trainer's own checkpointing switch off (every spelling it may read: ``activation_checkpointing``
    from transformers 5.23, ``gradient_checkpointing`` before and in TRL), once hyclora has installed
    its own: ``Trainer.train()`` would otherwise re-enable HF's checkpointing over it."""
    training_args.gradient_checkpointing = False
    if hasattr(training_args, "activation_checkpointing"):
        training_args.activation_checkpointing = False


def _old_backend_spelling(argv: Sequence[str]) -> Optional[str]:
    """The backend of a pre-rename ``--activation_checkpointing hf`` in ``argv``, else None."""
    names = ("--activation_checkpointing", "--activation-checkpointing")  # HfArgumentParser adds the dashed one
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name not in names:
            continue
        if not equals:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if value in CHECKPOINTING_MODES:
            return value
    return None


def _old_backend_message(value: str) -> str:
    return (f"--activation_checkpointing {value}: the checkpointing backend is now --checkpointing_backend {value} "
            f"(checkpointing_backend={value!r} in Python); --activation_checkpointing is the on/off switch "
            "(true/false)")


def _json_kwargs(value: Any) -> Optional[Dict[str, Any]]:
    if value is None or isinstance(value, dict):
        return value
    try:
        loaded = json.loads(value)
    except (TypeError, ValueError):
        loaded = None
    if not isinstance(loaded, dict):
        raise ValueError(f"--activation_checkpointing_kwargs {value!r}: expected a JSON object, "
                         "e.g. '{\"use_reentrant\": true}'")
    return loaded


def parse_dataclasses(parser, argv: Sequence[str]) -> List[Any]:
    """``parser.parse_args_into_dataclasses(argv)`` for a parser built over
    :func:`with_checkpointing_switch`: returns the dataclasses without the switch, whose values are
    folded into the ``TrainingArguments`` (the new name wins when set, as in transformers >= 5.23).
    A pre-rename ``--activation_checkpointing hf`` stops with the new spelling instead of a bool
    parse error."""
    from transformers import TrainingArguments

    argv = list(argv)
    old = _old_backend_spelling(argv)
    if old is not None:
        parser.error(_old_backend_message(old))
    default = parser.get_default("activation_checkpointing")
    if isinstance(default, str) and default in CHECKPOINTING_MODES:  # an override from Python
        raise ValueError(_old_backend_message(default))
    outputs = list(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))
    switches = [o for o in outputs if isinstance(o, ActivationCheckpointingSwitch)]
    outputs = [o for o in outputs if not isinstance(o, ActivationCheckpointingSwitch)]
    training = next((o for o in outputs if isinstance(o, TrainingArguments)), None)
    for switch in switches:
        if training is None:
            raise ValueError("--activation_checkpointing needs TrainingArguments in the same parser")
        if switch.activation_checkpointing is not None:
            training.gradient_checkpointing = bool(switch.activation_checkpointing)
        if switch.activation_checkpointing_kwargs is not None:
            training.gradient_checkpointing_kwargs = _json_kwargs(switch.activation_checkpointing_kwargs)
    return outputs


def given_on_command_line(parser, argv: Sequence[str]) -> Dict[str, Optional[str]]:
    """``{dest: value}`` for every option that ``argv`` sets (the last value given; None for a bare
    flag), matched as argparse matches them: exact option strings, the dashed aliases that
    HfArgumentParser adds, ``--name=value``, unambiguous abbreviations."""
    table = parser._option_string_actions
    given: Dict[str, Optional[str]] = {}
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        option, equals, value = arg.partition("=")
        if option in table:
            dest = table[option].dest
        else:
            dests = {action.dest for name, action in table.items() if name.startswith(option)}
            if len(dests) != 1 or not getattr(parser, "allow_abbrev", True):
                continue
            dest = dests.pop()
        if not equals:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        given[dest] = value
    return given


def imply_save_strategy(parser, argv: Sequence[str], overrides: Dict[str, Any]) -> None:
    """``--save_steps N`` without ``--save_strategy`` means ``--save_strategy steps``: the examples
    default to saving once per epoch, which would otherwise ignore ``--save_steps`` silently (and a
    killed run would have nothing to resume from). With an explicit ``--save_strategy`` other than
    ``steps`` a warning says that ``--save_steps`` does nothing."""
    given = given_on_command_line(parser, argv)
    if "save_steps" not in given and "save_steps" not in overrides:
        return
    if "save_strategy" not in given and "save_strategy" not in overrides:
        parser.set_defaults(save_strategy="steps")
        return
    strategy = given["save_strategy"] if "save_strategy" in given else overrides["save_strategy"]
    strategy = getattr(strategy, "value", strategy)  # a SaveStrategy enum from Python
    if str(strategy) != "steps":
        import warnings

        warnings.warn(f"--save_steps is ignored with --save_strategy {strategy}: pass --save_strategy steps "
                      "(or leave --save_strategy out) to save a checkpoint every --save_steps steps",
                      UserWarning, stacklevel=3)


SFT_TASKS = ("gsm8k", "multitask")


def resolve_auto_defaults(task: str, *, packing: Optional[bool], cuda_graphs: Optional[bool],
                          graph_refusal: Optional[str], cuda: bool, lora_dropout: float,
                          trl_available: bool) -> Tuple[bool, bool, List[str]]:
    """``--packing`` / ``--cuda_graphs`` left unset (None): on where they pay, i.e. where the graphs
    can replay. Graphs replay only one batch shape without padding masks, so they pay with packed
    SFT batches or wikitext2's full rows; packing is what makes SFT batches one shape. Returns the
    resolved (packing, cuda_graphs) and a note per decision taken here. ``graph_refusal``: why a run
    of these arguments could not replay (``hyclora.cuda_graphs.run_refusal``), or None."""
    notes: List[str] = []
    why_not = graph_refusal
    if why_not is None and not cuda:
        why_not = "no CUDA device"
    if why_not is None and lora_dropout > 0:
        why_not = "LoRA dropout > 0 (its mask is redrawn in the backward from a host-read generator state)"
    if packing is None:
        packing = task in SFT_TASKS and why_not is None and trl_available
        if task in SFT_TASKS:
            if packing:
                notes.append("--packing defaulted to true (padding-free rows of one shape, which the CUDA graphs "
                             "replay; --packing false for padded batches)")
            elif why_not is None:
                notes.append("--packing defaulted to false: trl is not installed (pip install trl); padded batches "
                             "run eager, without the CUDA graphs")
    if cuda_graphs is None:
        one_shape = packing or task == "wikitext2"
        cuda_graphs = why_not is None and one_shape
        if cuda_graphs:
            notes.append("--cuda_graphs defaulted to true (--cuda_graphs false to run every step eager)")
        elif why_not is None:
            notes.append("--cuda_graphs defaulted to false: padded batches of changing lengths would not replay "
                         "(--packing true makes them one shape)")
        else:
            notes.append(f"--cuda_graphs defaulted to false: {why_not}")
    return bool(packing), bool(cuda_graphs), notes


# Paper Table 8 (lr / max len / batch / grad-acc / epochs) and the reference scripts' optimiser
# settings (hyclora-method.md section 7); AdamW in its fused form, transformers' own default (the
# same update without the full-size temporary the foreach form allocates at the step).
_COMMON: Dict[str, Any] = dict(
    learning_rate=3e-4,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=8,
    gradient_accumulation_steps=4,
    lr_scheduler_type="cosine",
    warmup_steps=0.03,
    weight_decay=0.1,
    optim="adamw_torch_fused",
    seed=11,
    logging_steps=10,
    save_strategy="epoch",
    save_total_limit=2,
    report_to="none",
)
TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "gsm8k": dict(_COMMON, num_train_epochs=6, max_length=512, max_new_tokens=256,
                  data="openai/gsm8k", output_dir="output/gsm8k"),
    "wikitext2": dict(_COMMON, num_train_epochs=3, max_length=1024, data="wikitext",
                      output_dir="output/wikitext2"),
    "multitask": dict(_COMMON, num_train_epochs=12, max_length=512, max_new_tokens=512,
                      warmup_steps=0.1, weight_decay=0.0, max_grad_norm=1.0, seed=42,
                      output_dir="output/multitask"),
}


@dataclass
class FinetuneArgs:
    task: str
    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    hyclora: HyCLoRAConfig
    training: Any  # transformers.TrainingArguments
    checkpointing: CheckpointingArguments = field(default_factory=CheckpointingArguments)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "task": self.task,
            "checkpointing": dataclasses.asdict(self.checkpointing),
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "lora": dataclasses.asdict(self.lora),
            "hyclora": self.hyclora.to_dict(),
            "training": self.training.to_dict(),
        }


def build_parser(task: str):
    from transformers import HfArgumentParser, TrainingArguments

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    parser = HfArgumentParser(
        with_checkpointing_switch(
            (ModelArguments, DataArguments, LoraArguments, HyCLoRAConfig, TrainingArguments, CheckpointingArguments)
        ),
        description=f"hyclora {task} fine-tuning (defaults: paper Table 8)",
    )
    parser.set_defaults(**TASK_DEFAULTS[task])
    return parser


def parse_finetune_args(task: str, argv: Sequence[str] = (), **overrides: Any) -> FinetuneArgs:
    """Parse ``argv`` (command-line strings) for ``task`` on top of its defaults.

    ``overrides`` (field names of any of the argument dataclasses, e.g. ``data="synthetic"``,
    ``max_steps=50``, ``use_hyclora=False``) replace the task defaults and are themselves
    overridden by ``argv``; that is the Python entry point used by the demo and benchmarks.
    """
    parser = build_parser(task)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for parse_finetune_args")
    if overrides:
        parser.set_defaults(**overrides)
    argv = list(argv)
    imply_save_strategy(parser, argv, overrides)
    if overrides.get("deepspeed") or any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        # Several CPU processes: accelerate runs DeepSpeed there only with an explicit gloo
        # process group (a no-op on GPUs).
        from hyclora.integrations.accelerate import trainer_cpu_deepspeed_kwargs

        parser.set_defaults(**trainer_cpu_deepspeed_kwargs())
    model, data, lora, hy, training, checkpointing = parse_dataclasses(parser, argv)
    return FinetuneArgs(task, model, data, lora, hy, training, checkpointing)


__all__ = [
    "TASKS",
    "SFT_TASKS",
    "TASK_DEFAULTS",
    "resolve_auto_defaults",
    "LLAMA_LINEARS",
    "ModelArguments",
    "DataArguments",
    "LoraArguments",
    "ActivationCheckpointingSwitch",
    "CheckpointingArguments",
    "CHECKPOINTING_MODES",
    "checkpointing_kwargs",
    "checkpointing_requested",
    "clear_trainer_checkpointing",
    "given_on_command_line",
    "imply_save_strategy",
    "parse_dataclasses",
    "trainer_has_activation_checkpointing",
    "with_checkpointing_switch",
    "FinetuneArgs",
    "build_parser",
    "parse_finetune_args",
]
