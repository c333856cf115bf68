"""Supervised fine-tuning with TRL's SFTTrainer + LoRA + hyclora.

SFTTrainer applies LoRA itself (``peft_config=``); ``HyCLoRACallback`` patches the resulting PEFT
model before training. Every ``SFTConfig`` flag works (``--packing``, ``--padding_free``,
``--gradient_checkpointing``, ``--max_length``, ...), and so does every hyclora flag
(``--layer_type``, ``--q_bit``, ``--use_hyclora false`` for plain LoRA).

``--dataset``: ``synthetic[:N]`` (generated arithmetic word problems), or a local .json / .jsonl /
.csv / .parquet file whose records have ``text``, ``prompt``+``completion``, ``question``+``answer``
(GSM8K) or ``instruction``+``output`` (Alpaca, LLM-Adapters math) fields.

    # offline: a tiny random Llama on generated word problems (runs on a CPU)
    python examples/trl_sft.py --model_name_or_path tiny-random-llama --dataset synthetic:64 \\
        --max_steps 10 --output_dir runs/trl_tiny
    # a real model, 2-bit hyclora, packed sequences
    python examples/trl_sft.py --model_name_or_path meta-llama/Llama-2-7b-hf \\
        --dataset ../shared/data/gsm8k/train.jsonl --layer_type intra_inter_full_fuse --q_bit 2 \\
        --packing --max_length 1024 --learning_rate 3e-4 --output_dir runs/trl_gsm8k
"""

import os
import sys
from dataclasses import dataclass

# Run as a script, this folder is sys.path[0] and examples/evaluate.py would shadow the
# `evaluate` library; drop the folder before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hyclora import HyCLoRAConfig  # noqa: E402
from hyclora.data import (  # noqa: E402
    alpaca_prompt, arithmetic_word_problems, build_bpe_tokenizer, gsm8k_prompt, gsm8k_target, read_records,
)
from hyclora.integrations.trainer import HyCLoRACallback  # noqa: E402
from hyclora.training import HyCLoRAStateCallback, build_tiny_llama  # noqa: E402
from hyclora.training.checkpoints import resolve_resume  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: str = "tiny-random-llama"  # a hub id, a local folder, or tiny-random-llama
    dataset: str = "synthetic:256"
    attn_implementation: str = "sdpa"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"  # or a comma-separated list, e.g. q_proj,v_proj


def to_example(record: dict) -> dict:
    """One SFT example (TRL's language-modeling or prompt-completion format) from a record."""
    if "prompt" in record and "completion" in record:
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if "question" in record and "answer" in record:  # GSM8K
        return {"prompt": gsm8k_prompt(record["question"]), "completion": gsm8k_target(record["answer"])}
    if "instruction" in record and "output" in record:  # Alpaca / LLM-Adapters
        return {"prompt": alpaca_prompt(record["instruction"], record.get("input", "")),
                "completion": record["output"]}
    if "text" in record:
        return {"text": record["text"]}
    raise ValueError(f"record with fields {sorted(record)}: expected text, prompt+completion, "
                     "question+answer or instruction+output")


def load_dataset(spec: str) -> Dataset:
    if spec.startswith("synthetic"):
        n = int(spec.partition(":")[2] or 2000)
        records = arithmetic_word_problems("train", n)
    else:
        records = read_records(spec)
    return Dataset.from_list([to_example(r) for r in records])


def load_model(script: ScriptArguments, bf16: bool):
    if script.model_name_or_path == "tiny-random-llama":
        tokenizer = build_bpe_tokenizer()
        return build_tiny_llama(tokenizer, attn_implementation=script.attn_implementation), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        script.model_name_or_path, dtype=torch.bfloat16 if bf16 else torch.float32,
        attn_implementation=script.attn_implementation,
    )
    return model, tokenizer


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, SFTConfig, HyCLoRAConfig))
    if not torch.cuda.is_available():
        parser.set_defaults(bf16=False)  # SFTConfig's bf16 default needs a GPU
    script, sft_config, hy_config = parser.parse_args_into_dataclasses(args=argv)
    set_seed(sft_config.seed)  # the tiny model's random weights
    model, tokenizer = load_model(script, sft_config.bf16)
    targets = script.target_modules
    lora = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                      target_modules=targets if targets == "all-linear" else targets.split(","),
                      task_type="CAUSAL_LM")
    resume = resolve_resume(sft_config.resume_from_checkpoint, sft_config.output_dir)  # "latest" works too
    trainer = SFTTrainer(
        model=model, args=sft_config, train_dataset=load_dataset(script.dataset), processing_class=tokenizer,
        peft_config=lora,
        # HyCLoRACallback patches the PEFT model SFTTrainer built; HyCLoRAStateCallback keeps the
        # calibration statistics in checkpoints and restores them on --resume_from_checkpoint
        callbacks=[HyCLoRACallback(hy_config), HyCLoRAStateCallback(resume)],
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # a plain PEFT adapter
    print(f"train_loss {result.training_loss:.4f} hyclora "
          f"{'%s q_bit=%d' % (hy_config.layer_type, hy_config.q_bit) if hy_config.use_hyclora else 'off'}")
    return trainer, result


if __name__ == "__main__":
    main()
