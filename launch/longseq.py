#!/usr/bin/env python
"""Long-sequence LoRA fine-tuning (LongLoRA recipe) with hyclora.

    accelerate launch --config_file launch/zero2_8gpu.yaml launch/longseq.py \
        --model_name_or_path meta-llama/Llama-2-7b-hf --dataset togethercomputer/RedPajama-Data-1T-Sample \
        --seq_len 8192 --max_steps 1000 --output_dir runs/longseq-8k
    python launch/longseq.py ...        # one process, no launcher needed

What it does, in order:

1. Model: ``--model_name_or_path`` (local folder or hub id), or ``--config_name`` (a config JSON /
   folder, random weights: memory and speed runs). Linear RoPE position interpolation to
   ``--seq_len`` (factor ``ceil(seq_len / original context)``, LongLoRA) unless ``--rope_scaling false``.
2. LongLoRA's "LoRA+": LoRA (r 8, alpha 16, q/k/v/o) plus trainable embeddings and norms
   (``--trainable_modules``, PEFT ``modules_to_save``: saved inside the adapter).
3. S²-Attn for training (``--s2attn``, on by default, group ``--group_ratio`` of the sequence);
   evaluation uses full attention automatically. hyclora activation compression with
   ``--use_hyclora`` and the other HyCLoRAConfig flags; the compressed attention block runs
   S²-Attn as well (and recomputes it in the backward from the compressed Q/K/V).
4. Data: documents (local text/JSONL files or folders, or a hub dataset name when online) joined
   with EOS and packed into rows of ``--seq_len`` tokens; tokenised once and cached as ``.npy``.
5. Loss: the LM head's cross-entropy in chunks of tokens, so ``seq_len x vocab`` logits never
   exist (hyclora.ops.chunked_ce).
6. Training loop on accelerate (DDP / DeepSpeed ZeRO-2/3 from the accelerate config in launch/),
   gradient accumulation, grad clipping, constant-with-warmup schedule, tqdm progress bars,
   checkpoints every ``--checkpointing_steps`` and ``--resume_from_checkpoint PATH|latest``
   (``accelerator.save_state``: the model's state_dict holds hyclora's calibration statistics,
   so a resumed run continues with them and reproduces the uninterrupted run's losses).
7. At the end: the adapter (plain PEFT) in ``--output_dir``, an optional sliding-window perplexity
   on ``--eval_files``, and a memory/throughput summary (printed and in ``summary.json``).

Why an accelerate loop and not HF Trainer: the memory-critical parts of this recipe (the model is
called without logits and the loss is computed from hidden states in chunks; S²-Attn on in
training and off in evaluation; the LM head gathered for the chunked loss under ZeRO-3) are
explicit here in a few lines, while accelerate still provides DDP/DeepSpeed, mixed precision,
accumulation and checkpoint/resume. The Trainer would need a ``compute_loss`` override plus
callbacks to reach the same place and hide it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

# Run from a checkout without installing: make `import hyclora` work.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyclora.compat import checkpointing_enable  # noqa: E402
from hyclora.config import HyCLoRAConfig, str2bool  # noqa: E402


def _csv(text: str):
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None, help="pretrained model folder or hub id")
    g.add_argument("--config_name", default=None, help="config JSON/folder for a randomly initialised model")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer folder or hub id (default: the model's)")
    g.add_argument("--torch_dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    g.add_argument("--rope_scaling", type=str2bool, default=True, help="linear RoPE interpolation to --seq_len")
    g.add_argument("--original_context", type=int, default=None,
                   help="pretraining context for the RoPE factor (default: config.max_position_embeddings)")
    g = p.add_argument_group("LoRA (LongLoRA's LoRA+)")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--lora_target_modules", type=_csv, default="q_proj,k_proj,v_proj,o_proj")
    g.add_argument("--trainable_modules", type=_csv, default="embed_tokens,norm",
                   help="module-name suffixes trained in full (PEFT modules_to_save); '' for none")
    g = p.add_argument_group("attention / memory")
    g.add_argument("--s2attn", type=str2bool, default=True,
                   help="shifted sparse attention in training, with or without --use_hyclora (hyclora's "
                        "compressed attention block runs it too)")
    g.add_argument("--group_ratio", type=float, default=0.25, help="S²-Attn group size as a fraction of seq_len")
    # one spelling with the Trainer examples (transformers 5.23 renamed it); the old one stays an alias
    g.add_argument("--activation_checkpointing", "--gradient_checkpointing", dest="gradient_checkpointing",
                   type=str2bool, default=False,
                   help="checkpoint every decoder layer (torch, non-reentrant); --gradient_checkpointing is an alias")
    g.add_argument("--checkpoint_boundary_bits", type=int, default=0, choices=[0, 2, 4, 8],
                   help="with --activation_checkpointing: keep the checkpointed layer inputs quantised at this "
                        "width (1%% of channels exact): about half the memory of exact inputs, 8 is near "
                        "lossless, the setup for the longest contexts (BENCHMARKS.md); 0: exact")
    g.add_argument("--loss_chunk_tokens", type=int, default=None, help="tokens per LM-head loss chunk (default: auto)")
    g.add_argument("--cuda_graphs", type=str2bool, default=False,
                   help="replay CUDA graphs of hyclora's decoder layers (hyclora.cuda_graphs): one GPU process, "
                        "--use_hyclora, no --activation_checkpointing, rows without padding; the fastest setup up "
                        "to about 16k tokens (BENCHMARKS.md)")
    HyCLoRAConfig.add_arguments(p)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", nargs="+", required=True,
                   help="local text/JSONL files or folders, or one hub dataset name (online)")
    g.add_argument("--text_field", default="text")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--max_documents", type=int, default=None)
    g.add_argument("--seq_len", type=int, default=8192)
    g.add_argument("--separate_documents", type=str2bool, default=False,
                   help="restart positions at each document so attention never crosses documents")
    g.add_argument("--cache_dir", default=None, help="tokenised-data cache (default: OUTPUT_DIR/token_cache)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--per_device_batch_size", type=int, default=1)
    g.add_argument("--gradient_accumulation_steps", type=int, default=8)
    g.add_argument("--learning_rate", type=float, default=2e-5)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--warmup_steps", type=int, default=20)
    g.add_argument("--lr_scheduler", default="constant_with_warmup")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--max_steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--checkpointing_steps", type=int, default=0, help="save a resumable state every N steps (0: off)")
    g.add_argument("--resume_from_checkpoint", default=None, help="checkpoint folder, or 'latest' in OUTPUT_DIR")
    g.add_argument("--logging_steps", type=int, default=1)
    g.add_argument("--save_adapter", type=str2bool, default=True)
    g = p.add_argument_group("evaluation (sliding-window perplexity, full attention)")
    g.add_argument("--eval_files", nargs="*", default=[])
    g.add_argument("--eval_context", type=int, default=None, help="window length (default: --seq_len)")
    g.add_argument("--eval_stride", type=int, default=256)
    g.add_argument("--eval_mode", default="longlora", choices=["longlora", "strided"])
    g.add_argument("--eval_max_windows", type=int, default=None)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if (args.model_name_or_path is None) == (args.config_name is None):
        raise SystemExit("error: give exactly one of --model_name_or_path (pretrained) or --config_name (random init).")
    if args.tokenizer_name is None:
        if args.model_name_or_path is None:
            raise SystemExit("error: --config_name needs --tokenizer_name.")
        args.tokenizer_name = args.model_name_or_path
    for name in ("seq_len", "per_device_batch_size", "gradient_accumulation_steps", "max_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1.")
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.output_dir, "token_cache")
    return args


# ---------------------------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def build_model(args, accelerator, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hyclora.integrations.longseq import set_rope_linear_scaling

    source = args.model_name_or_path or args.config_name
    config = AutoConfig.from_pretrained(source)
    factor = 1.0
    if args.rope_scaling:
        factor = set_rope_linear_scaling(config, args.seq_len, args.original_context)
    dtype = _dtype(args.torch_dtype)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        # DeepSpeed keeps fp32 masters itself and needs every trainable weight in its precision.
        ds_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision), torch.float32)
        if args.torch_dtype != "auto" and dtype != ds_dtype:
            raise SystemExit(
                f"error: --torch_dtype {args.torch_dtype} conflicts with DeepSpeed's precision "
                f"({accelerator.mixed_precision}); leave --torch_dtype auto or change the accelerate config."
            )
        dtype = ds_dtype
    common = dict(dtype=dtype, attn_implementation="sdpa")
    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, **common)
    else:
        model = AutoModelForCausalLM.from_config(config, **common)
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab and not hasattr(model.get_input_embeddings().weight, "ds_id"):
        raise SystemExit(
            f"error: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}; "
            "use the model's own tokenizer."
        )
    model.config.use_cache = False
    return model, factor


def apply_memory_features(args, model, hcfg):
    from hyclora.integrations.longseq import enable_s2attn

    if args.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        checkpointing_enable(inner, use_reentrant=False)
        if args.checkpoint_boundary_bits:
            from hyclora.integrations.checkpointing import enable_activation_checkpointing

            enable_activation_checkpointing(model, backend="torch", boundary_bits=args.checkpoint_boundary_bits)
    elif args.checkpoint_boundary_bits:
        raise SystemExit("error: --checkpoint_boundary_bits needs --activation_checkpointing true")
    if hcfg.use_hyclora:
        try:
            from hyclora.models import apply_hyclora
        except ImportError as err:
            raise SystemExit(
                f"error: hyclora.models.apply_hyclora is not available ({err}); run with --use_hyclora false."
            ) from err
        apply_hyclora(model, hcfg)
    if args.s2attn:
        enable_s2attn(model, group_ratio=args.group_ratio)
    return model


def cuda_graphs_refusal(args, hcfg, accelerator):
    """Why ``--cuda_graphs`` cannot replay in this run (a message naming the fix), or None."""
    from hyclora.cuda_graphs import run_refusal

    why = run_refusal(use_hyclora=hcfg.use_hyclora, checkpointing=args.gradient_checkpointing,
                      several_processes=accelerator.num_processes > 1
                      or getattr(accelerator.state, "deepspeed_plugin", None) is not None
                      or getattr(accelerator.state, "fsdp_plugin", None) is not None)
    if why is None and args.separate_documents:
        why = ("--separate_documents gives every row its own document boundaries (a new mask each batch): "
               "drop one of the two")
    return why


def keep_trainable_fp32(model, accelerator) -> None:
    """Without DeepSpeed nobody keeps fp32 master weights: AdamW on bf16 weights loses updates
    below bf16's resolution (an lr-2e-5 step on a 0.01 weight is 0.2%, under bf16's 0.4%). So the
    trainable weights (LoRA, embeddings and norms of the recipe) are held in fp32 and autocast runs
    the compute in half precision. DeepSpeed keeps its own fp32 masters instead."""
    half = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return
    if accelerator.mixed_precision not in ("bf16", "fp16"):
        raise SystemExit(
            "error: half-precision weights without autocast: use an accelerate config with "
            "mixed_precision bf16 (launch/single_gpu.yaml) or --torch_dtype float32."
        )
    for p in half:
        p.data = p.data.float()


def memory_summary(accelerator) -> dict:
    """Peak memory of this process (GPU allocator and host RSS), gathered from every rank."""
    local = {
        "rank": accelerator.process_index,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,  # KiB on Linux
    }
    if torch.cuda.is_available():
        local["gpu"] = torch.cuda.get_device_name()
        local["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        local["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
    from accelerate.utils import gather_object

    return {"per_rank": gather_object([local])}


def _latest_checkpoint(output_dir: str):
    from hyclora.training.checkpoints import latest_checkpoint

    return latest_checkpoint(output_dir, marker="progress.json")  # written last: a killed save is skipped


# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    from hyclora.training.run import show_hyclora_info

    args = parse_args(argv)
    hcfg = HyCLoRAConfig.from_args(args)  # validates every hyclora flag up front
    show_hyclora_info()

    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, get_scheduler

    from hyclora.data.longdocs import build_packed_dataset
    from hyclora.integrations.accelerate import cpu_backend_needed, make_accelerator, prepare_model, use_fsdp_on_cpu
    from hyclora.integrations.fsdp import fsdp2_enabled
    from hyclora.training.callbacks import load_hyclora_state, save_hyclora_state
    from hyclora.integrations.longseq import CausalLMChunkedLoss, longlora_lora_config

    extra = {}
    if args.cuda_graphs:
        from accelerate.utils import AutocastKwargs

        # autocast's cast cache would hold casts made during a capture: hyclora.cuda_graphs refuses it
        extra["kwargs_handlers"] = [AutocastKwargs(cache_enabled=False)]
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:
        # Plain `python launch/longseq.py`: autocast in the weights' half precision, so trainable
        # weights can be kept in fp32 (see keep_trainable_fp32).
        extra["mixed_precision"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(_dtype(args.torch_dtype), "no")
    accelerator = make_accelerator(
        None,  # DeepSpeed (if any) comes from the `accelerate launch` config
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **extra,
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and cpu_backend_needed():
        use_fsdp_on_cpu(accelerator)  # CPU smoke runs: accelerate drops FSDP on gloo (hyclora.integrations.accelerate)
    fsdp2_on = fsdp2_enabled(accelerator)
    if args.cuda_graphs and (why := cuda_graphs_refusal(args, hcfg, accelerator)):
        raise SystemExit(f"error: --cuda_graphs: {why}")
    set_seed(args.seed)
    out_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = accelerator.print

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # -- data (tokenised once, on the main process first; the others read the cache) --
    with accelerator.main_process_first():
        dataset = build_packed_dataset(
            args.dataset, tokenizer, args.seq_len, cache_dir=args.cache_dir, text_field=args.text_field,
            split=args.dataset_split, max_documents=args.max_documents,
            separate_documents=args.separate_documents,
        )
    log(f"data: {len(dataset)} rows x {args.seq_len} tokens")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_batch_size, shuffle=True)

    # -- model --
    model, rope_factor = build_model(args, accelerator, tokenizer)
    import peft

    lora_cfg = longlora_lora_config(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules, trainable_modules=args.trainable_modules, model=model,
    )
    # Under DeepSpeed the LoRA weights must share the base dtype (DeepSpeed holds the fp32 master
    # copies); elsewhere PEFT's default keeps them in fp32 for accuracy under autocast.
    deepspeed_on = getattr(accelerator.state, "deepspeed_plugin", None) is not None
    model = peft.get_peft_model(model, lora_cfg, autocast_adapter_dtype=not deepspeed_on)
    if not deepspeed_on:
        keep_trainable_fp32(model, accelerator)
    apply_memory_features(args, model, hcfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log(f"model: {n_train:,} trainable / {n_total:,} parameters; RoPE factor {rope_factor:g}; "
        f"S²-Attn {'on' if args.s2attn else 'off'}; hyclora {hcfg.to_dict() if hcfg.use_hyclora else 'off'}; "
        f"{accelerator.distributed_type}{' (FSDP2)' if fsdp2_on else ''} x{accelerator.num_processes}")

    wrapper = CausalLMChunkedLoss(model, chunk_size=args.loss_chunk_tokens)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and int(plugin.zero_stage) == 3:
        wrapper.register_zero3()
    if hcfg.use_hyclora or fsdp2_on:
        # ZeRO-3 leaf layers / FSDP2 units by decoder layer (the wrapper has no _no_split_modules)
        prepare_model(accelerator, model)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    wrapper, optimizer, loader, scheduler = accelerator.prepare(wrapper, optimizer, loader, scheduler)
    graphs = None
    if args.cuda_graphs:  # after prepare: the layers sit on their device
        from hyclora import cuda_graphs

        graphs = cuda_graphs.graph_decoder_layers(model)

    # -- resume --
    completed = 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            path = _latest_checkpoint(args.output_dir)
            if path is None:
                raise SystemExit(f"error: --resume_from_checkpoint latest: no checkpoint-* in {args.output_dir}")
        accelerator.load_state(path)
        if fsdp2_on:
            # each rank's own calibration statistics (torch.distributed.checkpoint kept rank 0's)
            load_hyclora_state(model, path, world_size=accelerator.num_processes, rank=accelerator.process_index)
        completed = json.loads((Path(path) / "progress.json").read_text())["step"]
        log(f"resumed from {path} at step {completed}")

    def save_checkpoint(step: int) -> None:
        path = out_dir / f"checkpoint-{step}"
        accelerator.save_state(str(path))
        if fsdp2_on:  # buffers are rank-local under FSDP2 (hyclora.integrations.fsdp)
            save_hyclora_state(model, str(path), world_size=accelerator.num_processes, rank=accelerator.process_index)
        if accelerator.is_main_process:
            (path / "progress.json").write_text(json.dumps({"step": step}))
        accelerator.wait_for_everyone()

    # -- train --
    metrics_path = out_dir / "metrics.jsonl"
    micro_per_epoch = len(loader)
    micro_done = completed * accelerator.gradient_accumulation_steps
    epoch, skip = divmod(micro_done, micro_per_epoch)
    wrapper.train()
    bar = tqdm(total=args.max_steps, initial=completed, desc="train", disable=not accelerator.is_local_main_process)
    # the window's loss sum stays on the device: read once per logging step, not per micro-step
    step, tokens_seen, window_loss, window_micro = completed, 0, torch.zeros((), device=accelerator.device), 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    while step < args.max_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(wrapper):
                loss = wrapper(
                    batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"),
                )
                accelerator.backward(loss)
                # drop the step's autograd graph now: kept alive into the next forward, it pins the
                # gradient accumulators to this step's stream, which a CUDA graph capture cannot join
                loss = loss.detach()
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(wrapper.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
            window_loss += loss.float()
            window_micro += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step == completed + 1:
                # The first step pays for CUDA/kernel warm-up; steady throughput starts after it.
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t_steady, tokens_at_steady = time.perf_counter(), tokens_seen
            if step % args.logging_steps == 0 or step == args.max_steps:
                mean_loss = accelerator.gather((window_loss / window_micro).reshape(1)).mean().item()
                record = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if accelerator.is_main_process:
                    with metrics_path.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                window_loss, window_micro = torch.zeros_like(window_loss), 0
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(step)
            if step >= args.max_steps:
                break
        epoch += 1
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t_end = time.perf_counter()
    graph_counts = graph_summary = None
    if graphs is not None:  # saving and evaluating run the layers' own (eager) forwards
        graph_counts, graph_summary = dict(graphs.counts), graphs.summary()
        graphs.remove()
    elapsed = t_end - t_start
    steady = None
    if step > completed + 1:
        steady = (tokens_seen - tokens_at_steady) / (t_end - t_steady)

    # -- save, evaluate, summarise --
    if args.save_adapter:
        if fsdp2_on:
            from hyclora.integrations.fsdp import save_lora_adapter
        else:
            from hyclora.integrations.deepspeed import save_lora_adapter

        save_lora_adapter(accelerator.unwrap_model(wrapper).model, str(out_dir / "adapter"),
                          is_main_process=accelerator.is_main_process)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(str(out_dir / "adapter"))
    summary = {
        "steps": step, "resumed_from": completed, "seconds": elapsed,
        "tokens_per_second": tokens_seen / elapsed if elapsed > 0 else None,
        "steady_tokens_per_second": steady,  # after the first step (warm-up excluded)
        "seq_len": args.seq_len, "rope_factor": rope_factor, "s2attn": args.s2attn,
        "gradient_checkpointing": args.gradient_checkpointing,
        "checkpoint_boundary_bits": args.checkpoint_boundary_bits, "hyclora": hcfg.to_dict() if hcfg.use_hyclora else None,
        "num_processes": accelerator.num_processes, "trainable_parameters": n_train,
    }
    if graph_counts is not None:
        summary["cuda_graphs"] = graph_counts
    if args.eval_files:
        from hyclora.data.longdocs import load_token_stream
        from hyclora.eval.sliding_ppl import sliding_window_perplexity

        with accelerator.main_process_first():  # tokenise once; the other ranks read the cache
            eval_tokens = load_token_stream(args.eval_files, tokenizer, cache_dir=args.cache_dir)
        # Every rank evaluates the same windows: under ZeRO-3 each forward needs all ranks.
        result = sliding_window_perplexity(
            accelerator.unwrap_model(wrapper), eval_tokens,
            context_length=args.eval_context or args.seq_len, stride=args.eval_stride, mode=args.eval_mode,
            max_windows=args.eval_max_windows, chunk_size=args.loss_chunk_tokens,
            progress=accelerator.is_local_main_process,
        )
        summary["eval"] = result.to_dict()
    summary["memory"] = memory_summary(accelerator)
    if accelerator.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log("\n== summary ==")
        log(f"steps {step} in {elapsed:.1f}s, {summary['tokens_per_second']:.0f} tokens/s"
            + (f" ({steady:.0f} tokens/s after the first step)" if steady else ""))
        if graph_summary is not None:
            log(graph_summary)
        if summary.get("eval"):
            e = summary["eval"]
            log(f"perplexity {e['perplexity']:.3f} ({e['mode']}, L={e['context_length']}, stride {e['stride']}, "
                f"{e['n_windows']} windows)")
        for r in summary["memory"]["per_rank"]:
            gpu = (f", GPU peak allocated {r['peak_allocated_gib']:.2f} GiB / reserved {r['peak_reserved_gib']:.2f} GiB"
                   if "peak_allocated_gib" in r else "")
            log(f"rank {r['rank']}: host peak RSS {r['peak_rss_gib']:.2f} GiB{gpu}")
    accelerator.wait_for_everyone()
    # Engine and process groups torn down while the interpreter is alive: a gloo worker still holding a
    # ZeRO-3 prefetch at interpreter exit aborts the process.
    accelerator.free_memory()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
