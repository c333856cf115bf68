"""Shared glue of the fine-tuning examples (HF Trainer based): arguments with the paper's
per-task defaults, model/LoRA/QLoRA/hyclora setup, callbacks, and ``run_finetune``.

Python use::

    from hyclora.training import parse_finetune_args, run_finetune
    args = parse_finetune_args("gsm8k", data="synthetic", model_name_or_path="tiny-random-llama",
                               max_steps=50, use_hyclora=False, output_dir="out/demo")
    metrics = run_finetune(args)
"""

from .args import (
    LLAMA_LINEARS,
    TASK_DEFAULTS,
    TASKS,
    DataArguments,
    FinetuneArgs,
    LoraArguments,
    ModelArguments,
    build_parser,
    parse_finetune_args,
)
from .callbacks import (
    HyCLoRAStateCallback,
    HyCLoRAStateFileError,
    MemoryThroughputCallback,
    format_summary,
    hyclora_state_dict,
    load_hyclora_state,
    save_hyclora_state,
)
from .checkpoints import latest_checkpoint, resolve_resume
from .model import (
    TINY_RANDOM,
    add_lora,
    build_tiny_llama,
    hyclora_api,
    load_base_model,
    load_tokenizer,
    maybe_apply_hyclora,
    prepare_model,
)
from .run import TaskData, prepare_task_data, run_finetune

__all__ = [
    "LLAMA_LINEARS",
    "TASK_DEFAULTS",
    "TASKS",
    "DataArguments",
    "FinetuneArgs",
    "LoraArguments",
    "ModelArguments",
    "build_parser",
    "parse_finetune_args",
    "HyCLoRAStateCallback",
    "HyCLoRAStateFileError",
    "latest_checkpoint",
    "resolve_resume",
    "MemoryThroughputCallback",
    "format_summary",
    "hyclora_state_dict",
    "load_hyclora_state",
    "save_hyclora_state",
    "TINY_RANDOM",
    "add_lora",
    "build_tiny_llama",
    "hyclora_api",
    "load_base_model",
    "load_tokenizer",
    "maybe_apply_hyclora",
    "prepare_model",
    "TaskData",
    "prepare_task_data",
    "run_finetune",
]
