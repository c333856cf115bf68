"""One GPU, parameters offloaded to the host: FSDP2 (``fully_shard`` + ``CPUOffloadPolicy``) vs
DeepSpeed ZeRO-3 offload (``ds_configs/zero3_offload.json``), each with plain PEFT LoRA and with
hyclora: peak GPU memory and tokens/s.

A random-weight Llama (Llama-2-7B shape by default, bf16 weights), PEFT LoRA on all seven linears,
torch AdamW; one step = forward + backward + optimizer step. FSDP2 shards each decoder layer
(:func:`hyclora.integrations.fsdp.shard_model`; bf16 compute, fp32 gradient reduction) and keeps
the shards, gradients and the optimizer step on the host; ZeRO-3 offloads parameters and optimizer
state to the host (``deepspeed.initialize``, hyclora layers as ZeRO-3 leaf modules). Each
(backend, method) point runs in its own 1-process launch of this script (``--variant``), so peaks
do not mix; peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps.

    python benchmarks/bench_fsdp2_offload.py                       # on the GPU machine
    python benchmarks/bench_fsdp2_offload.py --bs 1 --seq 4096 --layer_type intra_inter --q_bit 2
    python benchmarks/bench_fsdp2_offload.py --smoke               # tiny model on the CPU (gloo)

Writes ``fsdp2_offload.csv`` and ``fsdp2_offload.md`` under ``--out``/bench_fsdp2_offload.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BACKENDS = ("fsdp2", "zero3")
METHODS = ("lora", "hyclora")


def build_parser():
    p = harness.parser(__doc__, "model", "batch", "steps", "lora", "hyclora", "smoke",
                       bs=1, seq=2048, steps=3, warmup=6, layer_type="intra_inter", q_bit=4)
    p.add_argument("--backends", default="fsdp2,zero3", help=f"comma-separated subset of {BACKENDS}")
    p.add_argument("--methods", default="lora,hyclora", help=f"comma-separated subset of {METHODS}")
    p.add_argument("--variant", default=None, help="internal: run one backend:method point and print JSON")
    return p


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_variant(args) -> dict:
    backend, method = args.variant.split(":")
    device = harness.device_of(args)
    dtype = harness.dtype_of(args, device)
    if device == "cuda":
        torch.cuda.set_device(0)
    backend_name = "nccl" if device == "cuda" else "gloo"
    if backend == "zero3":
        if device == "cpu":  # the shared-memory all-reduce op JIT-compiles a C++ extension; gloo suffices
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend_name)
    else:
        torch.distributed.init_process_group(backend_name)
    model, _ = harness.build_model(args, "cpu" if backend == "zero3" else device, dtype)
    if method == "hyclora":
        from hyclora.models import apply_hyclora

        model = apply_hyclora(model, harness.hyclora_config(args)) or model
    params = [p for p in model.parameters() if p.requires_grad]
    if backend == "fsdp2":
        from hyclora.integrations.fsdp import cpu_offload_policy, mixed_precision_policy, shard_model

        for p in params:  # FSDP2 needs one dtype per unit's trainable parameters: fp32 masters
            p.data = p.data.float()
        mp = mixed_precision_policy(dtype) if dtype != torch.float32 else None
        model = shard_model(model, mp_policy=mp, offload_policy=cpu_offload_policy())
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        engine = model
    else:
        from hyclora.integrations.deepspeed import fill_auto, load_config, prepare_zero3

        if method == "hyclora":
            prepare_zero3(model)
        cfg = fill_auto(load_config("zero3_offload"), micro_batch_size=args.bs, model=model,
                        bf16=dtype == torch.bfloat16, learning_rate=1e-4)
        if device == "cpu":  # nothing to pin without an accelerator
            cfg["zero_optimization"]["offload_param"]["pin_memory"] = False
            cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
        opt = torch.optim.AdamW(params, lr=1e-4)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    model.train()
    ids = torch.randint(0, args.vocab, (args.bs, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        loss = engine(input_ids=ids, labels=ids).loss
        if backend == "zero3":
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    result = harness.measure(step, device, steps=args.steps, warmup=args.warmup, tokens=ids.numel())
    row = {"backend": backend, "method": method, "device": device, "bs": args.bs, "seq": args.seq,
           "tok_s": round(result["tok_s"], 1), "step_s": round(result["step_s"], 4),
           "peak_gib": round(result["peak"] / 2**30, 3),
           "loss": round(float(result["last"]), 4)}
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return row


def main(argv=None):
    args = harness.parse(build_parser(), argv, bs=1, seq=64, steps=1, warmup=1)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    backends = [b for b in args.backends.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(backends) - set(BACKENDS)) + sorted(set(methods) - set(METHODS))
    if bad:
        raise SystemExit(f"unknown --backends/--methods {bad}: choose from {BACKENDS} and {METHODS}")
    rows = []
    argv_rest = [a for a in (argv if argv is not None else sys.argv[1:])]
    for backend in backends:
        for method in methods:
            env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
            if args.smoke:
                env["DS_ACCELERATOR"] = "cpu"
            proc = subprocess.run([sys.executable, __file__, *argv_rest, "--variant", f"{backend}:{method}"],
                                  env=env, capture_output=True, text=True)
            found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                tail = (proc.stdout + proc.stderr)[-3000:]
                rows.append({"backend": backend, "method": method, "error": tail.strip().splitlines()[-1]})
                print(f"{backend}:{method} failed:\n{tail}", file=sys.stderr)
                continue
            rows.append(json.loads(found[-1]))
            print(rows[-1], flush=True)
    out = harness.out_dir(args) / "bench_fsdp2_offload"
    out.mkdir(parents=True, exist_ok=True)
    env = harness.environment(harness.device_of(args))
    fields = ["backend", "method", "device", "bs", "seq", "tok_s", "step_s", "peak_gib", "loss", "error"]
    harness.write_csv(out / "fsdp2_offload.csv", rows, fields, env=env)
    table = harness.markdown_table(fields, [[r.get(f, "") for f in fields] for r in rows])
    harness.write_text(out / "fsdp2_offload.md", "\n".join(table + ["", harness.env_line(env)]) + "\n")
    print("\n".join(table))
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
