"""Model and tokenizer loading, LoRA/QLoRA setup, and hyclora application for the examples."""

from __future__ import annotations

import logging
import os
import re
from typing import Optional, Tuple

import torch

from hyclora.config import HyCLoRAConfig

from .args import (
    CheckpointingArguments,
    LoraArguments,
    ModelArguments,
    checkpointing_kwargs,
    checkpointing_requested,
    clear_trainer_checkpointing,
)

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random-llama"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def hyclora_api():
    """``(apply_hyclora, None)`` when ``hyclora.models`` provides it, else ``(None, reason)``."""
    try:
        from hyclora.models import apply_hyclora
    except ImportError as err:
        return None, f"hyclora.models.apply_hyclora is not importable ({err})"
    return apply_hyclora, None


# A hub id is "name" or "namespace/name"; anything else (./x, /x, ~/x, a/b/c) can only be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_path(name: str) -> bool:
    """True when ``name`` can only mean a local path (it starts with ``.``, ``/`` or ``~``, contains
    the OS path separator where that is not ``/``, or is no valid hub id, e.g. ``runs/a/base``)."""
    if name.startswith((".", "/", "~", os.sep)):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    return _HUB_ID.match(name) is None


def check_model_path(name: Optional[str], flag: str = "--model_name_or_path") -> None:
    """Raise ``FileNotFoundError("<flag>: folder not found: <path>")`` when ``name`` looks like a local
    path that does not exist (transformers would say "Repo id must be in the form ..."); hub ids and
    existing paths pass."""
    if not name or name == TINY_RANDOM or os.path.exists(os.path.expanduser(name)):
        return
    if looks_like_path(name):
        absolute = os.path.abspath(os.path.expanduser(name))
        where = "" if absolute == name else f" (from {os.getcwd()}: {absolute})"
        raise FileNotFoundError(
            f"{flag}: folder not found: {name}{where}; pass an existing model folder or a hub id "
            "such as meta-llama/Llama-2-7b-hf"
        )


def _from_pretrained(load, name: str, flag: str, **kwargs):
    """``load(name, **kwargs)``; a name that is no local folder and fails on the hub too (offline, a
    typo, a relative path from another folder) gets an error that says both."""
    try:
        return load(name, **kwargs)
    except OSError as err:
        if os.path.exists(os.path.expanduser(name)):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(
            f"{flag} {name!r} is neither a local folder ({os.path.abspath(name)} does not exist) nor loadable "
            f"from the hub ({first}); pass an existing model folder, or a hub id this machine can reach"
        ) from err


def load_tokenizer(model_args: ModelArguments):
    """The tokenizer of ``tokenizer_name_or_path`` (else the model's), with a pad token.

    Llama tokenizers have no pad token; we reuse ``unk`` (else ``eos``) rather than adding one:
    a new token would resize the embeddings, which are frozen (and quantised under QLoRA).
    Padded positions are masked out of attention and loss, so the choice does not matter.
    """
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if name is None:
        raise ValueError("pass --model_name_or_path (a local folder or hub id)")
    if name == TINY_RANDOM:
        from hyclora.data.tokenizer import build_bpe_tokenizer

        return build_bpe_tokenizer()
    flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    check_model_path(name, flag)
    kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.gguf_file and not model_args.tokenizer_name_or_path:
        kwargs["gguf_file"] = model_args.gguf_file
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, flag, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        logger.info("tokenizer has no pad token; using %r", tokenizer.pad_token)
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {name!r} has no eos_token; answers could never end")
    return tokenizer


def build_tiny_llama(tokenizer, **config_overrides):
    """A randomly initialised 2-layer Llama sized for CPU tests (hidden 64, 4 heads / 2 KV
    heads, FFN 128); ``config_overrides`` replace any ``LlamaConfig`` field."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        attn_implementation="eager",
    )
    values.update(config_overrides)
    return LlamaForCausalLM(LlamaConfig(**values))


def resolve_dtype(model_args: ModelArguments, training_args) -> torch.dtype | str:
    if model_args.torch_dtype:
        if model_args.torch_dtype == "auto":
            return "auto"
        if model_args.torch_dtype not in _DTYPES:
            raise ValueError(f"--torch_dtype {model_args.torch_dtype!r}: expected one of {sorted(_DTYPES)} or auto")
        return _DTYPES[model_args.torch_dtype]
    # fp16 mixed precision keeps fp32 master weights, so only --bf16 changes the load dtype.
    return torch.bfloat16 if getattr(training_args, "bf16", False) else torch.float32


def _quantization_config(model_args: ModelArguments, training_args):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "--load_in_4bit needs bitsandbytes: `pip install bitsandbytes` (and a CUDA GPU), or "
            "drop --load_in_4bit to fine-tune unquantised base weights"
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError(
            "--load_in_4bit (NF4 QLoRA) needs a CUDA GPU and none is visible; drop "
            "--load_in_4bit to fine-tune unquantised base weights on this machine"
        )
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if getattr(training_args, "bf16", False) else (
        torch.float16 if getattr(training_args, "fp16", False) else torch.float32
    )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def _unmark_gguf(model) -> None:
    """transformers dequantises GGUF weights into ordinary dense tensors on load, yet leaves the
    model flagged as GGUF-quantized, and Trainer refuses to train such a model. The weights are
    plain floating-point tensors (checked here), so drop the flag."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", ""))
    if quantizer is None or "gguf" not in method.lower():
        return
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            raise ValueError(f"GGUF model still holds quantized weight {name} ({param.dtype}); cannot train it")
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        try:
            del model.config.quantization_config
        except AttributeError:  # pragma: no cover - config without a deletable attribute
            model.config.quantization_config = None


def load_base_model(model_args: ModelArguments, training_args, tokenizer=None):
    """The base causal LM (optionally NF4 4-bit), not yet wrapped with LoRA."""
    from transformers import AutoModelForCausalLM

    name = model_args.model_name_or_path
    if name is None:
        raise ValueError("pass --model_name_or_path (a local folder or hub id)")
    if name == TINY_RANDOM:
        if tokenizer is None:
            raise ValueError(f"{TINY_RANDOM} needs the tokenizer to size its vocabulary")
        if model_args.load_in_4bit:
            raise ValueError(f"--load_in_4bit does not apply to {TINY_RANDOM}")
        return build_tiny_llama(tokenizer, attn_implementation=model_args.attn_implementation)
    check_model_path(name)
    if os.path.isdir(name):
        # an absolute path, so that adapters saved from this model name a base that is found from
        # any folder (PEFT stores it as base_model_name_or_path in adapter_config.json)
        name = os.path.abspath(name)
    kwargs = dict(
        dtype=resolve_dtype(model_args, training_args),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.gguf_file:
        kwargs["gguf_file"] = model_args.gguf_file
    if model_args.load_in_4bit:
        kwargs["quantization_config"] = _quantization_config(model_args, training_args)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, "--model_name_or_path", **kwargs)
    if model_args.gguf_file:
        _unmark_gguf(model)
    if model_args.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing_requested(training_args)
        )
    return model


def add_lora(model, lora_args: LoraArguments, *, gradient_checkpointing: bool = False):
    """Wrap ``model`` with a PEFT LoRA adapter (rank, alpha, dropout and targets from
    ``lora_args``); prints the trainable-parameter count."""
    from peft import LoraConfig, get_peft_model

    init = lora_args.lora_init
    init_value = True if init in ("default", "true", "True") else (False if init in ("false", "False") else init)
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.target_modules(),
        init_lora_weights=init_value,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad when every base weight is frozen.
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, config)
    absolute_base_path(peft_model)
    return peft_model


def absolute_base_path(peft_model) -> None:
    """Make ``base_model_name_or_path`` of every adapter config absolute when it names a local folder
    (a relative one, written into adapter_config.json, breaks evaluating from another folder)."""
    for config in getattr(peft_model, "peft_config", {}).values():
        base = getattr(config, "base_model_name_or_path", None)
        if base and not os.path.isabs(base) and os.path.isdir(base):
            config.base_model_name_or_path = os.path.abspath(base)


def maybe_apply_hyclora(model, config: HyCLoRAConfig):
    """``apply_hyclora(model, config)`` when ``config.use_hyclora``; a clear error when the
    hyclora operators are not available in this installation."""
    if not config.use_hyclora:
        return model
    apply, reason = hyclora_api()
    if apply is None:
        raise RuntimeError(
            f"--use_hyclora is on but {reason}. Pass --use_hyclora false to fine-tune with plain "
            "PEFT LoRA, or install a hyclora build that includes hyclora.models."
        )
    result = apply(model, config)
    return model if result is None else result


def zero3_enabled() -> bool:
    """True when the TrainingArguments built so far carry a DeepSpeed ZeRO-3 config."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def resolve_checkpointing_mode(checkpointing: CheckpointingArguments, training_args) -> str:
    """``none``, ``hf`` or ``deepspeed``: what ``--checkpointing_backend`` (``auto`` resolved against
    ``--deepspeed`` and ``--activation_checkpointing``) asks for; contradictions raise."""
    mode = checkpointing.checkpointing_backend
    ds_config = getattr(training_args, "deepspeed", None)
    block = None
    if ds_config:
        from hyclora.integrations.deepspeed import load_config

        block = load_config(ds_config).get("activation_checkpointing")
    requested = checkpointing_requested(training_args)
    if mode == "auto":
        if isinstance(block, dict):
            mode = "deepspeed"
        elif requested or checkpointing.checkpoint_every_k > 1:
            mode = "hf"
        else:
            mode = "none"
    if mode == "none" and requested:
        raise ValueError("--checkpointing_backend none contradicts --activation_checkpointing true (or its alias "
                         "--gradient_checkpointing true): drop one of them")
    if mode == "deepspeed" and not ds_config:
        raise ValueError(
            "--checkpointing_backend deepspeed is configured from the --deepspeed JSON's activation_checkpointing "
            "block: pass --deepspeed ds_configs/zero2_actckpt.json (or another config), or use --checkpointing_backend hf"
        )
    return mode


def setup_activation_checkpointing(model, checkpointing: CheckpointingArguments, training_args):
    """Install the checkpointing that ``checkpointing`` asks for on ``model`` (after LoRA and
    hyclora); returns the summary of ``enable_activation_checkpointing`` or None when off.

    Both backends go through ``hyclora.integrations.checkpointing`` (so ``--checkpoint_every_k``
    works for either), and Trainer's own switch is then cleared (``activation_checkpointing`` and
    its alias ``gradient_checkpointing``): ``Trainer.train()`` would otherwise call
    ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before transformers 5.23)
    and overwrite the layers' checkpoint function with HF's own, checkpointing every layer through torch.
    """
    mode = resolve_checkpointing_mode(checkpointing, training_args)
    if mode == "none":
        return None
    from hyclora.integrations.checkpointing import enable_activation_checkpointing

    kwargs = checkpointing_kwargs(training_args)
    unknown = sorted(set(kwargs) - {"use_reentrant"})
    if unknown:
        raise ValueError(f"--activation_checkpointing_kwargs {unknown}: only use_reentrant is supported here "
                         "(every_n_layers: use --checkpoint_every_k)")
    bits = checkpointing.checkpoint_boundary_bits or None
    if bits and (mode == "deepspeed" or kwargs.get("use_reentrant")):
        raise ValueError(
            "--checkpoint_boundary_bits needs torch's non-reentrant checkpointing: use "
            "--checkpointing_backend hf without use_reentrant (deepspeed.checkpointing keeps exact inputs)"
        )
    if mode == "deepspeed":
        summary = enable_activation_checkpointing(
            model, every_k=checkpointing.checkpoint_every_k, backend="deepspeed",
            ds_config=training_args.deepspeed, use_reentrant=kwargs.get("use_reentrant"),
        )
    else:
        summary = enable_activation_checkpointing(
            model, every_k=checkpointing.checkpoint_every_k, backend="torch", use_reentrant=kwargs.get("use_reentrant"),
            boundary_bits=bits,
        )
    clear_trainer_checkpointing(training_args)
    logger.info("activation checkpointing: %s", summary)
    return summary


def prepare_model(args, tokenizer, model=None) -> Tuple[object, Optional[str]]:
    """Base model (given or loaded) -> LoRA -> hyclora. Returns (model, hyclora status text)."""
    if model is None:
        model = load_base_model(args.model, args.training, tokenizer)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.data.max_length > max_pos:
        raise ValueError(
            f"--max_length {args.data.max_length} exceeds the model's max_position_embeddings "
            f"{max_pos}; pass --max_length {max_pos} or less"
        )
    model = add_lora(model, args.lora, gradient_checkpointing=checkpointing_requested(args.training))
    model = maybe_apply_hyclora(model, args.hyclora)
    if zero3_enabled():
        # ZeRO-3 partitions every weight; hyclora's fused layers read their children's weights
        # without calling them, so the decoder layers must be ZeRO-3 leaf modules.
        from hyclora.integrations.deepspeed import prepare_zero3

        prepare_zero3(model)
    checkpointing = getattr(args, "checkpointing", None) or CheckpointingArguments()
    summary = setup_activation_checkpointing(model, checkpointing, args.training)
    # run_finetune reports it (metrics["activation_checkpointing"]); prepare_model's return stays a pair
    model.hyclora_activation_checkpointing = summary
    status = (
        f"hyclora {args.hyclora.layer_type} q_bit={args.hyclora.q_bit}"
        if args.hyclora.use_hyclora else "plain LoRA (hyclora off)"
    )
    if summary is not None:
        status += f", {summary['backend']} checkpointing of layers {summary['layers']}"
    return model, status


__all__ = [
    "TINY_RANDOM",
    "absolute_base_path",
    "check_model_path",
    "looks_like_path",
    "hyclora_api",
    "load_tokenizer",
    "build_tiny_llama",
    "resolve_dtype",
    "load_base_model",
    "add_lora",
    "maybe_apply_hyclora",
    "prepare_model",
    "resolve_checkpointing_mode",
    "setup_activation_checkpointing",
    "zero3_enabled",
]
