"""``run_finetune``: the whole example pipeline (data -> model -> Trainer -> save -> evaluate).

Steps, for every task:
 1. tokenizer (given, or loaded; ``tiny-random-llama`` builds one)
 2. datasets for the task (training examples, eval-loss examples, generation problems)
 3. model: base (given, or loaded, NF4 with --load_in_4bit) -> PEFT LoRA -> apply_hyclora
 4. HF Trainer with the padding collator and the memory/throughput + hyclora-state callbacks
 5. train (resuming when asked: ``--resume_from_checkpoint latest`` or a checkpoint folder), save the
    adapter, the tokenizer and hyclora's calibration state
 6. evaluate: token-weighted eval loss / perplexity, and greedy-generation accuracy
 7. write ``results.json`` (+ predictions), print a table, return a flat dict of metrics
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from hyclora.data import (
    CausalLMCollator,
    build_gsm8k_dataset,
    build_math_dataset,
    build_wikitext_dataset,
    load_gsm8k_records,
    load_math_eval_sets,
    load_math_train_records,
    resolve_math_eval_dir,
    wikitext_splits,
)
from hyclora.data.packing import PACKED_BATCH_KEYS, PackedBatchCollator, max_documents, pack_examples
from hyclora.eval.harness import (
    evaluate_gsm8k,
    evaluate_math_sets,
    evaluate_perplexity,
    format_table,
    write_results,
)
from hyclora.kernels.common import start_compiler_hash

from .args import FinetuneArgs, checkpointing_requested, parse_finetune_args, resolve_auto_defaults
from .callbacks import HyCLoRAStateCallback, MemoryThroughputCallback, save_hyclora_state
from .checkpoints import resolve_resume
from .model import load_tokenizer, prepare_model, zero3_enabled

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    train: Any
    eval_loss: Any = None  # datasets.Dataset for the token-weighted eval loss, or None
    generate: Optional[Callable] = None  # (model, tokenizer) -> (results, predictions)
    notes: List[str] = field(default_factory=list)


def _first(items, n: Optional[int]):
    if n is None:
        return items
    if n < 0:
        raise ValueError(f"sample limit {n}: expected >= 0")
    return items.select(range(min(n, len(items)))) if hasattr(items, "select") else items[:n]


def prepare_task_data(args: FinetuneArgs, tokenizer) -> TaskData:
    d, t = args.data, args.training
    if d.max_train_samples is not None and d.max_train_samples < 1:
        raise ValueError(f"--max_train_samples {d.max_train_samples}: expected at least 1 training example")
    progress = d.progress
    if args.task == "gsm8k":
        train_records = _first(load_gsm8k_records(d.data, "train", seed=d.synthetic_seed), d.max_train_samples)
        test_records = load_gsm8k_records(d.eval_data or d.data, "test", seed=d.synthetic_seed)
        train = build_gsm8k_dataset(tokenizer, train_records, d.max_length,
                                    strip_calc_annotations=d.strip_calc_annotations)
        loss_records = _first(test_records, d.max_eval_samples)
        eval_loss = build_gsm8k_dataset(tokenizer, loss_records, d.max_length,
                                        strip_calc_annotations=d.strip_calc_annotations) if loss_records else None
        gen_records = _first(test_records, d.max_generate_samples)
        generate = None
        if gen_records:
            generate = lambda model, tok: evaluate_gsm8k(  # noqa: E731
                model, tok, gen_records, max_new_tokens=d.max_new_tokens,
                batch_size=t.per_device_eval_batch_size, progress=progress)
        notes = [f"GSM8K zero-shot, greedy, fine-tuning prompt; {len(train)} training examples"]
        return TaskData(train, eval_loss, generate, notes)
    if args.task == "wikitext2":
        train_lines, eval_lines, note = wikitext_splits(d.data, d.eval_data)
        train = _first(build_wikitext_dataset(tokenizer, train_lines, d.max_length), d.max_train_samples)
        eval_loss = None
        if d.max_eval_samples != 0:
            eval_loss = _first(build_wikitext_dataset(tokenizer, eval_lines, d.max_length), d.max_eval_samples)
        return TaskData(train, eval_loss, None, [note, f"{d.max_length}-token blocks"])
    if args.task == "multitask":
        train_records = _first(load_math_train_records(d.data), d.max_train_samples)
        train = build_math_dataset(tokenizer, train_records, d.max_length)
        names = [n.strip() for n in d.eval_sets.split(",") if n.strip()]
        generate = None
        if d.max_generate_samples != 0 and names:
            eval_dir = resolve_math_eval_dir(d.data, d.eval_data)
            sets = load_math_eval_sets(eval_dir, names, max_samples=d.max_generate_samples)
            generate = lambda model, tok: evaluate_math_sets(  # noqa: E731
                model, tok, sets, max_new_tokens=d.max_new_tokens,
                batch_size=t.per_device_eval_batch_size, progress=progress)
        notes = ["arithmetic multitask: Alpaca prompt, greedy; numeric within 1e-3, AQuA by letter"]
        return TaskData(train, None, generate, notes)
    raise ValueError(f"unknown task {args.task!r}")


def _pad_multiple(args: FinetuneArgs) -> Optional[int]:
    if args.data.pad_to_multiple_of is not None:
        return args.data.pad_to_multiple_of or None
    # The fused kernels need sequence lengths that are multiples of 32 (hyclora-method.md 8.9).
    return 32 if args.hyclora.fused else 8


def _resolve_resume(training_args) -> Optional[str]:
    """``--resume_from_checkpoint``: ``latest`` (or ``true``) = the newest complete checkpoint-* of
    ``--output_dir``, a path = that folder (see ``hyclora.training.checkpoints``)."""
    return resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)


def _should_evaluate_here(trainer) -> bool:
    # Under ZeRO-3 and FSDP the weights are sharded: every rank must take part in each forward.
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
        if is_deepspeed_zero3_enabled():
            return True
    except ImportError:  # pragma: no cover - very old transformers
        pass
    return trainer.is_world_process_zero()


def _chunked_loss_trainer():
    """A Trainer whose TRAINING loss goes through hyclora's chunked cross-entropy (no full
    logits); evaluation and prediction keep the model's own loss and logits."""
    from transformers import Trainer

    from hyclora.integrations.longseq import CausalLMChunkedLoss

    class ChunkedLMLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not model.training or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            wrapper = getattr(self, "_chunked_loss", None)
            if wrapper is None or wrapper.model is not model:
                wrapper = self._chunked_loss = CausalLMChunkedLoss(model)
            kwargs = dict(labels=inputs["labels"], attention_mask=inputs.get("attention_mask"),
                          position_ids=inputs.get("position_ids"))
            kwargs.update({k: inputs[k] for k in PACKED_BATCH_KEYS if k in inputs})  # --packing's documents
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                # what the model's own loss does with num_items_in_batch (gradient accumulation):
                # the sum over this micro-batch's targets divided by the whole batch's count
                return wrapper(inputs["input_ids"], reduction="sum", **kwargs) / num_items_in_batch
            return wrapper(inputs["input_ids"], **kwargs)

    return ChunkedLMLossTrainer


def _fsdp_requested(training_args) -> bool:
    """``--fsdp`` or an accelerate config with ``distributed_type: FSDP``."""
    return bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _setup_fsdp(trainer, model) -> bool:
    """FSDP from the accelerate config (``distributed_type: FSDP``) or ``--fsdp``: FSDP2 only (hyclora's
    layers must be whole FSDP units, see ``hyclora.integrations.fsdp``); on a CPU process group the
    plugin accelerate dropped is switched back on. Returns whether FSDP2 is on."""
    from hyclora.integrations.accelerate import cpu_backend_needed, use_fsdp_on_cpu
    from hyclora.integrations.fsdp import fsdp2_enabled, prepare_fsdp2

    if _fsdp_requested(trainer.args) and cpu_backend_needed():
        use_fsdp_on_cpu(trainer)
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    if not fsdp2_enabled(trainer.accelerator):
        raise ValueError(
            "FSDP version 1 is not supported with hyclora: set fsdp_version: 2 in the accelerate config "
            "(launch/fsdp2_*.yaml) or --fsdp_config '{\"fsdp_version\": 2}'"
        )
    prepare_fsdp2(trainer.accelerator, model)
    return True


def _packed(args: FinetuneArgs, data: TaskData, tokenizer, padded_collator):
    """``--packing``: the training examples packed into rows and the collator of fixed-shape packed
    batches (evaluation batches, unpacked, keep ``padded_collator``)."""
    if args.task == "wikitext2":
        raise ValueError("--packing is for SFT tasks (gsm8k, multitask): wikitext2's blocks are already full rows "
                         "of --max_length tokens with nothing to pad")
    t = args.training
    rows = t.per_device_train_batch_size
    row_tokens = args.data.packed_row_tokens(rows)
    train = pack_examples(data.train, row_tokens)
    # the Trainer would drop seq_lengths (no model argument of that name) before the collator sees it
    t.remove_unused_columns = False
    collator = PackedBatchCollator(row_tokens, tokenizer.pad_token_id, max_documents=max_documents(train),
                                   rows=rows, padded=padded_collator)
    notes = data.notes + [f"packed {len(data.train)} examples into {len(train)} rows of {row_tokens} tokens "
                          f"({rows} rows per micro-batch)"]
    return replace(data, train=train, notes=notes), collator


def _graph_refusal(args: FinetuneArgs, checkpointing: bool) -> Optional[str]:
    from hyclora import cuda_graphs

    t = args.training
    return cuda_graphs.run_refusal(
        use_hyclora=args.hyclora.use_hyclora, checkpointing=checkpointing,
        several_processes=t.world_size > 1 or bool(t.deepspeed) or t.n_gpu > 1 or _fsdp_requested(t))


def _resolve_auto_defaults(args: FinetuneArgs) -> List[str]:
    """``--packing`` / ``--cuda_graphs`` left unset: decided here, before the data is built (see
    ``resolve_auto_defaults``). Returns the notes to log."""
    if args.data.packing is not None and args.checkpointing.cuda_graphs is not None:
        return []
    import importlib.util

    t, c = args.training, args.checkpointing
    checkpointing = (checkpointing_requested(t) or c.checkpointing_backend in ("hf", "deepspeed")
                     or c.checkpoint_every_k > 1)
    packing, graphs, notes = resolve_auto_defaults(
        args.task, packing=args.data.packing, cuda_graphs=c.cuda_graphs,
        graph_refusal=_graph_refusal(args, checkpointing), cuda=t.device.type == "cuda",
        lora_dropout=args.lora.lora_dropout, trl_available=importlib.util.find_spec("trl") is not None)
    args.data.packing, c.cuda_graphs = packing, graphs
    return notes


def _graph_layers(args: FinetuneArgs, model):
    """``--cuda_graphs``: a ``DecoderLayerGraphs`` over the hyclora-patched layers, or a clear error
    where graphs cannot replay."""
    from hyclora import cuda_graphs

    why = _graph_refusal(args, getattr(model, "hyclora_activation_checkpointing", None) is not None)
    if why is not None:
        raise ValueError(f"--cuda_graphs: {why}")
    return cuda_graphs.graph_decoder_layers(model)


def show_hyclora_info() -> None:
    """Print hyclora's INFO lines (the kernels' one-time tuning progress, data notes) on stderr
    when nothing configured logging: Python drops INFO by default. A configured root or hyclora
    logger is left as it is."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("hyclora")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def _hash_triton_compiler_early(args: FinetuneArgs) -> None:
    """A run that will launch hyclora's Triton kernels on the GPU starts Triton's compiler hash
    (``start_compiler_hash``) before tokenisation and model loading, which it then overlaps."""
    if args.hyclora.use_hyclora and torch.cuda.is_available() and not getattr(args.training, "use_cpu", False):
        start_compiler_hash(torch.device("cuda"), args.hyclora.kernel_backend)


def run_finetune(
    args: Union[FinetuneArgs, Sequence[str]],
    *,
    task: Optional[str] = None,
    model=None,
    tokenizer=None,
    extra_callbacks: Sequence[Any] = (),
) -> Dict[str, Any]:
    """Fine-tune and evaluate; returns a flat dict of metrics.

    ``args`` is a ``FinetuneArgs`` (``parse_finetune_args(task, argv, **overrides)``) or a list
    of command-line strings (then ``task`` is required). ``model`` / ``tokenizer`` replace the
    loaded ones (e.g. a model built from a config); ``model`` must be the base model, without
    LoRA. Keys: ``train_loss``, ``eval_loss``, ``eval_perplexity``, ``<set>_<metric>`` for each
    generation metric, the throughput/memory summary, ``loss_history`` ([(step, loss), ...]),
    ``output_dir`` and ``results_file``.
    """
    from transformers import Trainer, set_seed

    if not isinstance(args, FinetuneArgs):
        if task is None:
            raise ValueError("run_finetune(argv_list) needs task=")
        args = parse_finetune_args(task, list(args))
    t = args.training
    show_hyclora_info()
    _hash_triton_compiler_early(args)
    resume = _resolve_resume(t)  # before any loading: a wrong checkpoint fails at once
    set_seed(t.seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(args.model)
    auto_notes = _resolve_auto_defaults(args)
    data = prepare_task_data(args, tokenizer)
    data.notes[:0] = auto_notes
    collator = CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=_pad_multiple(args))
    if args.data.packing:
        data, collator = _packed(args, data, tokenizer, collator)
    for note in data.notes:
        logger.info(note)
    model, hyclora_status = prepare_model(args, tokenizer, model)
    if t.include_num_input_tokens_seen in ("no", False, None):
        # The throughput summary counts real (non-padding) tokens.
        t.include_num_input_tokens_seen = "non_padding"
    memory = MemoryThroughputCallback()
    callbacks = [memory, HyCLoRAStateCallback(resume), *extra_callbacks]
    trainer_class = Trainer
    if args.checkpointing.chunked_lm_loss:
        if t.world_size > 1 or t.deepspeed:
            raise ValueError(
                "--chunked_lm_loss runs in a single process in the Trainer examples (it calls the decoder and "
                "the LM head itself, bypassing DDP/DeepSpeed's forward): drop it, or use launch/longseq.py, "
                "whose accelerate loop prepares the chunked loss wrapper for distributed runs"
            )
        trainer_class = _chunked_loss_trainer()
    trainer = trainer_class(
        model=model,
        args=t,
        train_dataset=data.train,
        eval_dataset=data.eval_loss,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    fsdp = _setup_fsdp(trainer, model)
    if fsdp and args.checkpointing.cuda_graphs:
        raise ValueError("--cuda_graphs: FSDP2 gathers and frees every layer's weights around each call, which a "
                         "captured graph cannot replay; drop --cuda_graphs or run without FSDP")
    graphs = None
    if args.checkpointing.cuda_graphs:
        graphs = _graph_layers(args, model)
        # --bf16/--fp16: the Trainer's accelerator wraps the forward in autocast, whose weight
        # cache a graph capture cannot hold (hyclora.cuda_graphs refuses it): capture without it
        from accelerate.utils import AutocastKwargs

        trainer.accelerator.autocast_handler = AutocastKwargs(cache_enabled=False)
    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    finally:
        if graphs is not None:
            graphs.remove()
    if graphs is not None:
        logger.info(graphs.summary())
        if trainer.is_world_process_zero():
            print(graphs.summary(), flush=True)
    if zero3_enabled():
        # Trainer.save_model can write an empty adapter from ZeRO-3 shards; gather and save a
        # plain PEFT adapter instead (a collective: every rank calls it).
        from hyclora.integrations.deepspeed import save_lora_adapter

        save_lora_adapter(trainer.model, t.output_dir, is_main_process=trainer.is_world_process_zero())
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(t.output_dir)
    elif fsdp:
        # Trainer.save_model writes no adapter from sharded state dicts; gather the LoRA shards
        # into a plain PEFT adapter (a collective: every rank calls it).
        from hyclora.integrations.fsdp import save_lora_adapter as save_fsdp_adapter

        save_fsdp_adapter(trainer.model, t.output_dir, is_main_process=trainer.is_world_process_zero())
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(t.output_dir)
    else:
        trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        save_hyclora_state(trainer.model, t.output_dir)

    metrics: Dict[str, Any] = {"task": args.task, "hyclora": hyclora_status,
                               "activation_checkpointing": getattr(model, "hyclora_activation_checkpointing", None),
                               "fsdp2": fsdp}
    metrics["train_loss"] = train_output.training_loss
    metrics["loss_history"] = [
        (row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row
    ]
    metrics.update({k: v for k, v in memory.summary.items()})
    if graphs is not None:
        metrics["cuda_graphs"] = dict(graphs.counts)

    results: Dict[str, Dict[str, Any]] = {}
    predictions: List[Dict[str, Any]] = []
    if _should_evaluate_here(trainer):
        eval_model = trainer.model
        if data.eval_loss is not None and len(data.eval_loss) > 0:
            name = "wikitext2" if args.task == "wikitext2" else f"{args.task}_test"
            ppl = evaluate_perplexity(eval_model, tokenizer, data.eval_loss,
                                      batch_size=t.per_device_eval_batch_size,
                                      progress=args.data.progress, name=name)
            results.update(ppl)
            metrics["eval_loss"] = ppl[name]["loss"]
            metrics["eval_perplexity"] = ppl[name]["perplexity"]
            metrics["eval_tokens"] = ppl[name]["tokens"]
        if data.generate is not None:
            gen_results, predictions = data.generate(eval_model, tokenizer)
            results.update(gen_results)
            for set_name, values in gen_results.items():
                for key, value in values.items():
                    metrics[f"{set_name}_{key}"] = value
    trainer.accelerator.wait_for_everyone()

    results_file = args.data.results_file or os.path.join(t.output_dir, "results.json")
    metrics["output_dir"] = t.output_dir
    metrics["results_file"] = results_file
    if trainer.is_world_process_zero():
        title = f"{args.task}: {hyclora_status}, {args.model.model_name_or_path}"
        if results:
            print(format_table(results, title=title), flush=True)
        payload = {
            "task": args.task,
            "notes": data.notes,
            "results": results,
            "metrics": {k: v for k, v in metrics.items() if k != "loss_history"},
            "loss_history": metrics["loss_history"],
            "args": args.to_dict(),
        }
        write_results(results_file, payload, predictions or None)
    return metrics


__all__ = ["TaskData", "prepare_task_data", "run_finetune", "show_hyclora_info"]
