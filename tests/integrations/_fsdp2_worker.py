"""One rank of a small FSDP2 LoRA run on CPU (gloo), driven by tests/integrations/test_fsdp2.py.

Started by ``helpers.dist.Launch(..., worker=this file, distributed=True)``: every run, the
1-process ones included, has a process group (FSDP2 needs one; a plain loop ignores it). Scenarios
run one after another in the same processes; each writes its per-step losses, any exception and
its saved adapter under ``spec["out_dir"]/<name>/``.

Scenario keys (besides those of ``_dist_worker``: name, steps, mb, ga, lr, hyclora, ckpt):
  mode ("loop": plain loop, ``shard_model`` when fsdp; "accelerate": Accelerator with an FSDP2
  plugin; "trainer": HF Trainer with ``fsdp_config={"fsdp_version": 2}``), fsdp (bool), mp ("bf16":
  bf16 compute, fp32 reduce), offload (parameter CPU offload), measure (count the saved activation
  bytes of the first micro-batch with hyclora.memory), guard_child ("mlp": make each decoder
  layer's MLP its own FSDP unit, the mistake the shard guard must catch), save_at / resume
  (accelerate: save_state after that step / load_state from that folder and continue), save_steps
  / resume (trainer).

Data as in ``_dist_worker``: step s uses rows [s*GB, (s+1)*GB), GB = mb*ga*world; rank r takes
micro-batch j*world + r at accumulation step j, so a 1-process run with ga*world accumulation
steps sees the same micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from _dist_worker import _Dataset, build_model, world
from helpers.dist import token_data


def mp_policy(sc):
    if sc.get("mp") is None:
        return None
    from hyclora.integrations.fsdp import mixed_precision_policy

    return mixed_precision_policy(torch.bfloat16, torch.float32)


def offload_policy(sc):
    if not sc.get("offload"):
        return None
    from hyclora.integrations.fsdp import cpu_offload_policy

    return cpu_offload_policy()


def maybe_checkpointing(model, sc):
    """Enable sc["ckpt"]; returns a one-item list counting the calls that reach the layers'
    checkpoint function (a wrapper that bypasses transformers' checkpointing leaves it at 0)."""
    calls = [0]
    if sc.get("ckpt"):
        from hyclora.integrations.checkpointing import enable_activation_checkpointing
        from hyclora.integrations.deepspeed import decoder_layers

        enable_activation_checkpointing(model, **sc["ckpt"])
        for layer in decoder_layers(model):
            def counted(*args, _func=layer._gradient_checkpointing_func, **kwargs):
                calls[0] += 1
                return _func(*args, **kwargs)

            layer._gradient_checkpointing_func = counted
    return calls


def shard(model, sc):
    from hyclora.integrations.fsdp import shard_model

    if sc.get("guard_child") == "mlp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer.mlp)
    return shard_model(model, mp_policy=mp_policy(sc), offload_policy=offload_policy(sc))


def count_bytes(model, run):
    from hyclora.memory import count_saved_tensors

    with count_saved_tensors(model) as report:
        loss = run()
    return loss, [int(b) for b in report.layer_bytes()]


def run_loop(sc, model_dir, out):
    ws, rank = world()
    mb, ga, steps = sc["mb"], sc.get("ga", 1), sc["steps"]
    data = token_data()
    model = build_model(model_dir, sc)
    ckpt_calls = maybe_checkpointing(model, sc)
    if sc.get("fsdp"):
        model = shard(model, sc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sc.get("lr", 1e-2), weight_decay=0.0)
    model.train()
    losses, saved_bytes = [], None
    gb = mb * ga * ws
    for step in range(steps):
        step_loss = torch.zeros(())
        for j in range(ga):
            start = step * gb + (j * ws + rank) * mb
            x = data[start:start + mb]

            def forward():
                return model(input_ids=x, labels=x).loss

            if sc.get("measure") and saved_bytes is None:
                loss, saved_bytes = count_bytes(model, forward)
            else:
                loss = forward()
            (loss / ga).backward()
            step_loss += loss.detach().float() / ga
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ws > 1:
            torch.distributed.all_reduce(step_loss)
            step_loss /= ws
        losses.append(step_loss.item())
    from hyclora.integrations.fsdp import save_lora_adapter

    save_lora_adapter(model, out / "adapter")
    param_types = sorted({type(p).__name__ for p in model.parameters()})
    return {"losses": losses, "saved_bytes": saved_bytes, "param_types": param_types,
            "param_devices": sorted({str(p.device) for p in model.parameters()}),
            "ckpt_calls": ckpt_calls[0], "micro_batches": steps * ga}


def make_fsdp_accelerator(sc):
    from hyclora.integrations.accelerate import make_accelerator
    from hyclora.integrations.fsdp import fsdp2_plugin

    plugin = fsdp2_plugin(cpu_offload=bool(sc.get("offload")))
    return make_accelerator(fsdp_plugin=plugin, gradient_accumulation_steps=sc.get("ga", 1),
                            mixed_precision=sc.get("mp") or "no")


def run_accelerate(sc, model_dir, out):
    from accelerate.state import AcceleratorState

    from hyclora.integrations.accelerate import prepare_model

    # PartialState too: it keeps the FSDP distributed_type use_fsdp_on_cpu gave the previous
    # scenario, and a new AcceleratorState copying it would get no fsdp_plugin
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = make_fsdp_accelerator(sc)
    model = build_model(model_dir, sc)
    ckpt_calls = maybe_checkpointing(model, sc)
    prepare_model(acc, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sc.get("lr", 1e-2), weight_decay=0.0)
    model, opt = acc.prepare(model, opt)  # FSDP2: together, so the optimizer gets the shards
    loader = acc.prepare(torch.utils.data.DataLoader(_Dataset(token_data()), batch_size=sc["mb"], shuffle=False))
    start_step = 0
    if sc.get("resume"):
        acc.load_state(sc["resume"])
        start_step = sc["resume_step"]
    model.train()
    losses, acc_loss, micro = [], torch.zeros(()), 0
    ga = sc.get("ga", 1)
    skip = start_step * ga
    for index, batch in enumerate(loader):
        if index < skip:
            continue
        with acc.accumulate(model):
            loss = model(**batch).loss
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        acc_loss += loss.detach().float() / ga
        micro += 1
        if micro % ga == 0:
            losses.append(acc.reduce(acc_loss, reduction="mean").item())
            acc_loss = torch.zeros(())
            if sc.get("save_at") == start_step + len(losses):
                acc.save_state(str(out / "state"))
            if start_step + len(losses) == sc["steps"]:
                break
    from hyclora.integrations.fsdp import save_lora_adapter

    save_lora_adapter(acc.unwrap_model(model), out / "adapter")
    return {"losses": losses, "distributed_type": str(acc.distributed_type),
            "param_types": sorted({type(p).__name__ for p in model.parameters()}),
            "ckpt_calls": ckpt_calls[0], "micro_batches": micro}


def run_trainer(sc, model_dir, out):
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hyclora.integrations.accelerate import use_fsdp_on_cpu
    from hyclora.integrations.fsdp import prepare_fsdp2, save_lora_adapter
    from hyclora.training.callbacks import HyCLoRAStateCallback

    AcceleratorState._reset_state(reset_partial_state=True)
    save_steps = sc.get("save_steps")
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=sc["mb"],
        gradient_accumulation_steps=sc.get("ga", 1), max_steps=sc["steps"],
        learning_rate=sc.get("lr", 1e-2), lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], seed=11, data_seed=11, dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=True, ddp_backend="gloo", fsdp="full_shard auto_wrap" if sc.get("fsdp") else "",
        fsdp_config={"fsdp_version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                     "state_dict_type": "SHARDED_STATE_DICT"} if sc.get("fsdp") else None,
    )
    model = build_model(model_dir, sc)
    maybe_checkpointing(model, sc)
    losses = []

    class Record(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

    trainer = Trainer(model=model, args=args, train_dataset=_Dataset(token_data()),
                      callbacks=[Record(), HyCLoRAStateCallback(sc.get("resume"))])
    if sc.get("fsdp"):
        use_fsdp_on_cpu(trainer)
        prepare_fsdp2(trainer.accelerator, trainer.model)
    trainer.train(resume_from_checkpoint=sc.get("resume"))
    save_lora_adapter(trainer.model, out / "adapter")
    return {"losses": [l for _, l in losses], "steps": [s for s, _ in losses],
            "fsdp": bool(trainer.is_fsdp_enabled),
            "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()})}


RUNNERS = {"loop": run_loop, "accelerate": run_accelerate, "trainer": run_trainer}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(1)  # two cores shared by every rank and test worker
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
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
            break  # an expected failure can leave ranks out of step
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
