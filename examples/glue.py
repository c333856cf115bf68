"""Fine-tune an encoder (RoBERTa / BERT) on a GLUE task with LoRA (+ hyclora) on HF Trainer.

Recipe (paper Table 8 / the reference run_glue, hyclora-method.md 7.5): LoRA r = alpha = 16 on
query/key/value/dense, max length 128, batch 32, lr 3e-4, 10 epochs, AdamW (weight decay 0.01,
none on biases and LayerNorm), linear schedule, no warmup, gradient clipping 1.0, seed 42,
evaluation on the validation set (MNLI: matched) after every epoch. The classification head is
trained in full (PEFT modules_to_save) and stays a plain module; RoBERTa's 0.1 dropouts stay on.
Metrics: Matthews correlation (CoLA), accuracy and F1 (MRPC, QQP), Pearson and Spearman (STS-B),
accuracy otherwise, from hyclora's local evaluate modules.

    # the paper's setting (online): roberta-base, hyclora intra_inter at 2 bits
    python examples/glue.py --task rte --model_name_or_path FacebookAI/roberta-base \\
        --use_hyclora --layer_type intra_inter --q_bit 2 --output_dir output/glue-rte
    # offline: the GLUE TSVs and all-MiniLM-L6-v2 (a BERT checkpoint) loaded into RoBERTa
    python examples/glue.py --task mrpc --data ../shared/data/glue \\
        --model_name_or_path <folder of all-MiniLM-L6-v2> --load_as roberta --output_dir output/mrpc
    # no model files at all: a 2-layer random RoBERTa and a tokenizer learnt from the task text
    python examples/glue.py --task cola --data ../shared/data/glue --model_name_or_path tiny-random-roberta \\
        --max_steps 20 --max_eval_samples 64 --output_dir /tmp/glue-smoke

Python: ``from examples.glue import run_glue, parse_glue_args`` (or load this file by path).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder is sys.path[0] and examples/evaluate.py would shadow the
# `evaluate` library that the metrics need; drop the folder before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import dataclasses  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Dict, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hyclora.models.roberta  # noqa: E402,F401  (registers the BERT/RoBERTa encoder layers)
from hyclora.config import HyCLoRAConfig  # noqa: E402
from hyclora.data.glue import GLUE_TASKS, build_glue_dataset, glue_task, glue_texts, load_glue_records  # noqa: E402
from hyclora.training.args import (  # noqa: E402
    CheckpointingArguments,
    LoraArguments,
    imply_save_strategy,
    parse_dataclasses,
    with_checkpointing_switch,
)
from hyclora.training.checkpoints import resolve_resume  # noqa: E402
from hyclora.training.callbacks import HyCLoRAStateCallback, MemoryThroughputCallback, save_hyclora_state  # noqa: E402
from hyclora.training.model import (  # noqa: E402
    absolute_base_path,
    check_model_path,
    maybe_apply_hyclora,
    setup_activation_checkpointing,
    zero3_enabled,
)

logger = logging.getLogger("hyclora.examples.glue")

TINY_RANDOM_ROBERTA = "tiny-random-roberta"
ENCODER_LINEARS = "query,key,value,dense"
LOAD_AS = ("auto", "roberta", "bert")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# reference run_glue / paper Table 8; anything on the command line wins
GLUE_DEFAULTS: Dict[str, Any] = dict(
    learning_rate=3e-4, per_device_train_batch_size=32, per_device_eval_batch_size=64, num_train_epochs=10,
    weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, seed=42,
    eval_strategy="epoch", save_strategy="no", logging_steps=10, report_to="none",
    lora_r=16, lora_alpha=16, lora_dropout=0.0, lora_target_modules=ENCODER_LINEARS, output_dir="output/glue",
)


@dataclass
class GlueArguments:
    task: str = field(default="rte", metadata={"help": f"GLUE task: {', '.join(GLUE_TASKS)}"})
    data: Optional[str] = field(
        default=None,
        metadata={"help": "local GLUE folder (../shared/data/glue layout: <Task>/train.tsv, dev.tsv) or a "
                          "hub dataset name (default nyu-mll/glue, online)"},
    )
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "hub id or local folder; 'tiny-random-roberta' builds a 2-layer random RoBERTa "
                          "with a tokenizer learnt from the task text (smoke tests)"},
    )
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "default: the model's"})
    load_as: str = field(
        default="auto",
        metadata={"help": "auto (the checkpoint's own class), roberta (load a BERT checkpoint such as "
                          "all-MiniLM-L6-v2 into RobertaForSequenceClassification) or bert"},
    )
    attn_implementation: str = field(default="eager", metadata={"help": "eager (the paper's) or sdpa"})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": "float32 / bfloat16 / float16"})
    load_in_4bit: bool = field(default=False, metadata={"help": "NF4 base weights (the paper's QLoRA; CUDA)"})
    max_length: int = field(default=128, metadata={"help": "max tokens per example (pair)"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "first N training examples"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "first N validation examples"})
    results_file: Optional[str] = field(default=None, metadata={"help": "default <output_dir>/results.json"})
    train: bool = field(default=True, metadata={"help": "false: only evaluate (e.g. a task with no local train.tsv)"})

    def __post_init__(self):
        glue_task(self.task)  # raises with the list of tasks
        if self.load_as not in LOAD_AS:
            raise ValueError(f"--load_as {self.load_as!r}: expected one of {LOAD_AS}")
        if self.max_length < 8:
            raise ValueError(f"--max_length {self.max_length}: expected at least 8")


@dataclass
class GlueRunArgs:
    glue: GlueArguments
    lora: LoraArguments
    hyclora: HyCLoRAConfig
    training: Any  # transformers.TrainingArguments
    checkpointing: CheckpointingArguments = field(default_factory=CheckpointingArguments)

    def to_dict(self) -> Dict[str, Any]:
        return {"glue": dataclasses.asdict(self.glue), "lora": dataclasses.asdict(self.lora),
                "hyclora": self.hyclora.to_dict(), "training": self.training.to_dict(),
                "checkpointing": dataclasses.asdict(self.checkpointing)}


def build_parser():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(with_checkpointing_switch((GlueArguments, LoraArguments, HyCLoRAConfig, TrainingArguments,
                                                         CheckpointingArguments)),
                              description="hyclora GLUE fine-tuning (defaults: the paper's RoBERTa recipe)")
    parser.set_defaults(**GLUE_DEFAULTS)
    return parser


def parse_glue_args(argv: Sequence[str] = (), **overrides: Any) -> GlueRunArgs:
    """Parse command-line strings on top of the defaults; ``overrides`` (any field name) replace
    the defaults and are themselves overridden by ``argv``."""
    parser = build_parser()
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for parse_glue_args")
    parser.set_defaults(**overrides)
    imply_save_strategy(parser, list(argv), overrides)  # --save_steps N alone saves every N steps
    glue, lora, hy, training, checkpointing = parse_dataclasses(parser, argv)
    return GlueRunArgs(glue, lora, hy, training, checkpointing)


# -- model and tokenizer ----------------------------------------------------------------------


def _dtype(args: GlueRunArgs):
    if args.glue.torch_dtype:
        if args.glue.torch_dtype not in _DTYPES:
            raise ValueError(f"--torch_dtype {args.glue.torch_dtype!r}: expected one of {sorted(_DTYPES)}")
        return _DTYPES[args.glue.torch_dtype]
    return torch.bfloat16 if getattr(args.training, "bf16", False) else torch.float32


def load_tokenizer(args: GlueRunArgs, train_records):
    g = args.glue
    if g.model_name_or_path is None:
        raise ValueError("pass --model_name_or_path (hub id, local folder, or tiny-random-roberta)")
    if (g.tokenizer_name_or_path or g.model_name_or_path) == TINY_RANDOM_ROBERTA:
        from hyclora.data.tokenizer import build_bpe_tokenizer

        return build_bpe_tokenizer(glue_texts(train_records[:5000]), vocab_size=1024)
    check_model_path(g.tokenizer_name_or_path or g.model_name_or_path,
                     "--tokenizer_name_or_path" if g.tokenizer_name_or_path else "--model_name_or_path")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(g.tokenizer_name_or_path or g.model_name_or_path)


def load_model(args: GlueRunArgs, tokenizer, num_labels: int):
    """The sequence classifier (base weights, no LoRA yet)."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    g = args.glue
    regression = dict(problem_type="regression") if num_labels == 1 else {}
    if g.model_name_or_path == TINY_RANDOM_ROBERTA:
        config = RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=g.max_length + 2, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=num_labels,
            type_vocab_size=2, **regression,
        )
        model = RobertaForSequenceClassification(config)
        model.set_attn_implementation(g.attn_implementation)
        return model.to(_dtype(args))
    check_model_path(g.model_name_or_path)
    if g.load_as == "roberta":
        from hyclora.models.roberta import roberta_from_bert_checkpoint

        if g.load_in_4bit:
            raise ValueError("--load_as roberta builds the model from a local state dict; drop --load_in_4bit")
        return roberta_from_bert_checkpoint(g.model_name_or_path, num_labels=num_labels,
                                            attn_implementation=g.attn_implementation, dtype=_dtype(args), **regression)
    kwargs = dict(num_labels=num_labels, attn_implementation=g.attn_implementation, dtype=_dtype(args), **regression)
    if g.load_in_4bit:
        kwargs.update(_nf4(args))
    if g.load_as == "bert":
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(g.model_name_or_path, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(g.model_name_or_path, **kwargs)
    if g.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _nf4(args: GlueRunArgs) -> Dict[str, Any]:
    """The reference's QLoRA base: NF4 with double quantisation, the classifier left unquantised."""
    if not torch.cuda.is_available():
        raise RuntimeError("--load_in_4bit (NF4) needs a CUDA GPU and bitsandbytes; drop it on this machine")
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if getattr(args.training, "bf16", False) else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=["classifier", "pooler"])
    return {"quantization_config": quant, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def add_lora(model, lora: LoraArguments):
    """PEFT LoRA for sequence classification: adapters on the targets, the classification
    head trained in full (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=lora.target_modules(), bias="none", task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config)
    absolute_base_path(peft_model)  # adapter_config.json names the base folder from anywhere
    return peft_model


# -- metrics ----------------------------------------------------------------------------------


def make_compute_metrics(task_name: str):
    """``compute_metrics`` for Trainer: argmax (or the regression output) scored by the task's
    local evaluate module."""
    from hyclora.eval.metrics import load_metric

    task = glue_task(task_name)
    metric = load_metric(task.metric)

    def compute_metrics(eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        labels = eval_pred.label_ids
        if task.is_regression:
            preds = np.asarray(logits, dtype=np.float64).reshape(-1)
            refs = np.asarray(labels, dtype=np.float64).reshape(-1)
        else:
            preds = np.asarray(logits).argmax(-1).astype(np.int64)
            refs = np.asarray(labels).astype(np.int64)
        return metric.compute(predictions=preds.tolist(), references=refs.tolist())

    return compute_metrics


def main_metric(task_name: str) -> str:
    """The number the paper reports for the task (``eval_`` prefix as Trainer logs it)."""
    task = glue_task(task_name)
    return {"glue_matthews": "matthews_correlation", "glue_correlation": "pearson"}.get(task.metric, "accuracy")


# -- the run ----------------------------------------------------------------------------------


def _first(records, n: Optional[int]):
    if n is None:
        return records
    if n < 1:
        raise ValueError(f"sample limit {n}: expected at least 1")
    return records[:n]


def run_glue(args, model=None, tokenizer=None, extra_callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    """Fine-tune and evaluate; returns a flat dict of metrics: the final ``eval_*`` scores,
    ``best_<main metric>`` over the evaluations, ``train_loss``, ``loss_history``, the
    throughput/memory summary, ``output_dir`` and ``results_file``."""
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    if not isinstance(args, GlueRunArgs):
        args = parse_glue_args(list(args))
    g, t = args.glue, args.training
    task = glue_task(g.task)
    # --resume_from_checkpoint latest|true|PATH (latest: the newest complete checkpoint-* of --output_dir)
    resume = resolve_resume(t.resume_from_checkpoint, t.output_dir) if g.train else None
    set_seed(t.seed)
    train_records = _first(load_glue_records(task, g.data, "train"), g.max_train_samples) if g.train else []
    eval_records = _first(load_glue_records(task, g.data, "eval"), g.max_eval_samples)
    if tokenizer is None:
        tokenizer = load_tokenizer(args, train_records or eval_records)
    train = build_glue_dataset(tokenizer, task, train_records, g.max_length) if train_records else None
    evaluation = build_glue_dataset(tokenizer, task, eval_records, g.max_length)
    if model is None:
        model = load_model(args, tokenizer, task.num_labels)
    model = add_lora(model, args.lora)
    model = maybe_apply_hyclora(model, args.hyclora)
    if zero3_enabled():
        # ZeRO-3 partitions every weight; the patched encoder layers read their children's
        # weights without calling them, so they must be ZeRO-3 leaf modules
        from hyclora.integrations.deepspeed import prepare_zero3

        prepare_zero3(model)
    # the encoder layers (RobertaLayer / BertLayer) are GradientCheckpointingLayers: the same
    # --activation_checkpointing / --checkpointing_backend / --checkpoint_every_k switches as the decoder examples
    checkpointing = setup_activation_checkpointing(model, args.checkpointing, t)
    status = (f"hyclora {args.hyclora.layer_type} q_bit={args.hyclora.q_bit}"
              if args.hyclora.use_hyclora else "plain LoRA (hyclora off)")
    if t.include_num_input_tokens_seen in ("no", False, None):
        t.include_num_input_tokens_seen = "non_padding"
    memory = MemoryThroughputCallback()
    trainer = Trainer(
        model=model, args=t, train_dataset=train, eval_dataset=evaluation,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
        processing_class=tokenizer, compute_metrics=make_compute_metrics(task.name),
        callbacks=[memory, HyCLoRAStateCallback(resume), *extra_callbacks],
    )
    if checkpointing is not None:
        status += f", {checkpointing['backend']} checkpointing of layers {checkpointing['layers']}"
    metrics: Dict[str, Any] = {"task": task.name, "hyclora": status, "activation_checkpointing": checkpointing}
    if train is not None:
        out = trainer.train(resume_from_checkpoint=resume)
        metrics["train_loss"] = out.training_loss
        if zero3_enabled():  # Trainer.save_model can write an empty adapter from ZeRO-3 shards
            from hyclora.integrations.deepspeed import save_lora_adapter

            save_lora_adapter(trainer.model, t.output_dir, is_main_process=trainer.is_world_process_zero())
        else:
            trainer.save_model()
        if trainer.is_world_process_zero():
            save_hyclora_state(trainer.model, t.output_dir)
        metrics.update(memory.summary)
    final = trainer.evaluate()
    metrics.update({k: v for k, v in final.items() if k.startswith("eval_")})
    key = f"eval_{main_metric(task.name)}"
    history = [row for row in trainer.state.log_history if key in row]
    if history:
        metrics[f"best_{main_metric(task.name)}"] = max(row[key] for row in history)
    metrics["eval_history"] = [(row.get("epoch"), row[key]) for row in history]
    metrics["loss_history"] = [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]
    metrics["n_train"] = len(train_records)
    metrics["n_eval"] = len(eval_records)
    results_file = g.results_file or os.path.join(t.output_dir, "results.json")
    metrics["output_dir"] = t.output_dir
    metrics["results_file"] = results_file
    if trainer.is_world_process_zero():
        from hyclora.eval.harness import write_results

        write_results(results_file, {"task": task.name, "metrics": metrics, "args": args.to_dict()})
        shown = {k: v for k, v in metrics.items() if k.startswith(("eval_", "best_")) and isinstance(v, float)}
        print(f"GLUE {task.name} ({status}, {g.model_name_or_path}): "
              + ", ".join(f"{k} {v:.4f}" for k, v in shown.items() if math.isfinite(v)), flush=True)
    return metrics


def main(argv=None):
    return run_glue(parse_glue_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
