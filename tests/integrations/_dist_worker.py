"""One rank of a small distributed LoRA run on CPU (gloo), driven by tests/integrations.

Run as a script by ``helpers.dist.launch`` (one process per rank, torchrun-style environment) with
``--spec spec.json``. The spec lists scenarios run one after another in the same processes (process
start-up and imports cost more than the training itself); each writes its per-step losses, any
exception and its saved adapter under ``spec["out_dir"]/<name>/``.

Scenario keys:
  name, mode ("loop" | "trainer" | "accelerate"), ds (shipped config name or dict, None = no
  DeepSpeed), ds_overrides (dict deep-merged into ds), steps, mb (micro-batch per rank), ga
  (gradient accumulation), lr, fuse (toy fused MLP, see helpers.toy_fused), zero3_prep ("leaf" =
  prepare_zero3, "guard" = gather guards only, None), hyclora (HyCLoRAConfig kwargs or None),
  ckpt (enable_activation_checkpointing kwargs or None), save_steps / resume (trainer mode).

Data: a fixed random token matrix; step s uses rows [s*GB, (s+1)*GB) with GB = mb*ga*world,
split into micro-batches of mb rows; rank r takes micro-batch j*world + r at accumulation step j.
A 1-process run with ga*world accumulation steps therefore sees exactly the same micro-batches.

Imports ``helpers.*`` from tests/: ``helpers.dist.worker_env`` puts it on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from helpers.dist import lora_config, token_data


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_model(model_dir: str, sc: dict):
    """Base model + LoRA (same LoRA init on every rank and in the reference) + hyclora / toy."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(sc.get("seed", 7))
    model = get_peft_model(model, lora_config())
    if sc.get("hyclora"):
        from hyclora import HyCLoRAConfig
        from hyclora.models import apply_hyclora

        model = apply_hyclora(model, HyCLoRAConfig(**sc["hyclora"])) or model
    if sc.get("fuse"):
        from helpers.toy_fused import fuse_mlps

        fuse_mlps(model)
    prep = sc.get("zero3_prep")
    if prep in ("leaf", "leaf_noguard"):
        from hyclora.integrations.deepspeed import prepare_zero3

        prepare_zero3(model, guard=prep == "leaf")
    elif prep == "guard":
        from hyclora.integrations.deepspeed import install_gather_guards

        install_gather_guards(model)
    return model


def ds_config(sc: dict):
    if sc.get("ds") is None:
        return None
    from hyclora.integrations.deepspeed import load_config

    return deep_merge(load_config(sc["ds"]), sc.get("ds_overrides") or {})


def world():
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def maybe_checkpointing(model, sc, cfg):
    if sc.get("ckpt"):
        from hyclora.integrations.checkpointing import enable_activation_checkpointing

        kwargs = dict(sc["ckpt"])
        if kwargs.get("backend") == "deepspeed":
            kwargs.setdefault("ds_config", cfg)
        enable_activation_checkpointing(model, **kwargs)


# ------------------------------------------------------------------------------------------------
def run_loop(sc, model_dir, out):
    """Plain loop: deepspeed.initialize when sc['ds'] is set, else a torch reference loop."""
    ws, rank = world()
    mb, ga, steps = sc["mb"], sc.get("ga", 1), sc["steps"]
    data = token_data()
    cfg = ds_config(sc)
    model = build_model(model_dir, sc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sc.get("lr", 1e-2), weight_decay=0.0)
    if cfg is not None:
        import deepspeed
        from hyclora.integrations.deepspeed import fill_auto

        cfg = fill_auto(cfg, micro_batch_size=mb, gradient_accumulation_steps=ga, model=model,
                        gradient_clipping=1.0)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    else:
        engine = None
    maybe_checkpointing(engine.module if engine is not None else model, sc, cfg)
    model.train()
    losses = []
    gb = mb * ga * ws
    for step in range(steps):
        step_loss = torch.zeros(())
        for j in range(ga):
            start = step * gb + (j * ws + rank) * mb
            x = data[start:start + mb]
            if engine is not None:
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss)
                engine.step()
            else:
                loss = model(input_ids=x, labels=x).loss
                (loss / ga).backward()
            step_loss += loss.detach() / ga
        if engine is None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if ws > 1:
            torch.distributed.all_reduce(step_loss)
            step_loss /= ws
        losses.append(step_loss.item())
    from hyclora.integrations.deepspeed import save_lora_adapter

    save_lora_adapter(engine if engine is not None else model, out / "adapter")
    return {"losses": losses}


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def run_trainer(sc, model_dir, out):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hyclora.integrations.accelerate import trainer_cpu_deepspeed_kwargs

    cfg = ds_config(sc)
    # Several Trainers in one process: accelerate refuses a second DeepSpeed Accelerator unless
    # the previous one's state is dropped (the process group itself is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    extra = trainer_cpu_deepspeed_kwargs() if cfg is not None else {}
    save_steps = sc.get("save_steps")
    # TrainingArguments first: with ZeRO-3 it makes from_pretrained build the model partitioned
    # (deepspeed.zero.Init), the path users take.
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=sc["mb"],
        gradient_accumulation_steps=sc.get("ga", 1), max_steps=sc["steps"],
        learning_rate=sc.get("lr", 1e-2), lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], deepspeed=cfg, seed=11, data_seed=11, dataloader_num_workers=0,
        disable_tqdm=True, **extra,
    )
    model = build_model(model_dir, sc)
    if cfg is not None and sc.get("ckpt"):
        maybe_checkpointing(model, sc, cfg)
    losses = []

    class Record(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

    trainer = Trainer(model=model, args=args, train_dataset=_Dataset(token_data()), callbacks=[Record()])
    trainer.train(resume_from_checkpoint=sc.get("resume"))
    from hyclora.integrations.deepspeed import save_lora_adapter

    save_lora_adapter(trainer.model_wrapped, out / "adapter")
    return {"losses": [l for _, l in losses], "steps": [s for s, _ in losses],
            "deepspeed": bool(trainer.is_deepspeed_enabled)}


def run_accelerate(sc, model_dir, out):
    from hyclora.integrations.accelerate import make_accelerator, prepare_model

    cfg = ds_config(sc)
    acc = make_accelerator(cfg, gradient_accumulation_steps=sc.get("ga", 1))
    model = build_model(model_dir, sc)
    prepare_model(acc, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sc.get("lr", 1e-2), weight_decay=0.0)
    loader = torch.utils.data.DataLoader(_Dataset(token_data()), batch_size=sc["mb"], shuffle=False)
    model, opt, loader = acc.prepare(model, opt, loader)
    model.train()
    losses, acc_loss, micro = [], torch.zeros(()), 0
    ga = sc.get("ga", 1)
    for batch in loader:
        with acc.accumulate(model):
            loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
        acc_loss += loss.detach() / ga
        micro += 1
        if micro % ga == 0:
            losses.append(acc.reduce(acc_loss, reduction="mean").item())
            acc_loss = torch.zeros(())
            if len(losses) == sc["steps"]:
                break
    from hyclora.integrations.deepspeed import save_lora_adapter

    save_lora_adapter(model, out / "adapter")
    return {"losses": losses, "distributed_type": str(acc.distributed_type)}


RUNNERS = {"loop": run_loop, "trainer": run_trainer, "accelerate": run_accelerate}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # deepspeed launcher style
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(1)  # two cores shared by every rank and test worker
    # The shared-memory all-reduce op JIT-compiles a C++ extension; gloo is enough here.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    ws, rank = world()
    if ws > 1 or any(sc.get("ds") for sc in spec["scenarios"]):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    for sc in spec["scenarios"]:
        out = Path(spec["out_dir"]) / sc["name"]
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            result = RUNNERS[sc["mode"]](sc, spec["model_dir"], out)
            result["error"] = None
        except Exception as err:  # reported to the test, which decides whether it was expected
            result = {"error": {"type": type(err).__name__, "message": str(err),
                                "traceback": traceback.format_exc()}}
            if not sc.get("expect_error"):
                print(result["error"]["traceback"], file=sys.stderr, flush=True)
        result["seconds"] = round(time.perf_counter() - started, 2)
        if rank == 0:
            (out / "result.json").write_text(json.dumps(result))
        if sc.get("expect_error"):
            # An expected failure can leave ranks out of step; stop instead of running on.
            break
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # gloo's threads must be joined before the interpreter exits, or a rank can abort at exit
        # ("terminate called without an active exception", exit code -6) after all its work
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
