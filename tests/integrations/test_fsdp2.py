"""FSDP2 (``fully_shard``) with 2 gloo processes on CPU, and with 1, equals a 1-process run without
FSDP, for hyclora baseline and intra_inter, through a plain loop (``shard_model``), accelerate and
HF Trainer; parameter CPU offload, bf16 compute with fp32 reduction and compressed checkpoint
boundaries change nothing (and the layers really are checkpointed under FSDP2); Trainer resume
under FSDP2 continues the loss curve (calibrated statistics included); the adapter gathered from the shards is a plain PEFT adapter; the compressed
activation bytes are those of the unsharded run; a hyclora layer whose child is its own FSDP unit
fails loudly.

All runs are fp32 except the bf16 one, whose reference is a 1-process FSDP2 run with the same
policy. The 1-process references accumulate over the micro-batches the two ranks see (see
``_dist_worker``), so differences are summation order: parity is asserted to fp32 rounding. Each
test launches its scenarios together in one set of ranks (process start-up dominates the cost).
"""

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")

from helpers.dist import TESTS, Launch, load_adapter_tensors, save_tiny_llama  # noqa: E402

WORKER = TESTS / "integrations" / "_fsdp2_worker.py"
STEPS, MB = 3, 2
# As in test_zero_parity (fp32, 2 ranks vs 1 process): a real fault moves weights by ~lr = 1e-2.
LOSS_RTOL, W_ATOL = 2e-6, 1e-5
BF16_LOSS_RTOL, BF16_W_ATOL = 1e-3, 2e-3

# the model's own LM loss: the chunked one runs only where the LM head is not sharded (not under
# ZeRO-3 / FSDP2), and a parity test needs the same loss arithmetic on both sides
BASELINE = {"layer_type": "baseline", "lm_loss": "model"}
# iteration_threshold=0: statistics from each micro-batch, so a rank quantises its micro-batch as
# the 1-process run does.
INTRA_INTER = {"layer_type": "intra_inter", "q_bit": 4, "iteration_threshold": 0, "lm_loss": "model"}
CALIBRATED = {"layer_type": "intra_inter", "q_bit": 4, "iteration_threshold": 2, "lm_loss": "model"}
BOUNDARY = {"every_k": 1, "boundary_bits": 8}

# scenario name -> reference name
PARITY = {
    "f_base": "ref_base", "f_ii": "ref_ii", "f1_ii": "ref_ii", "f_ii_ckpt": "ref_ii_ckpt",
    "f_ii_offload": "ref_ii", "acc_ii": "ref_ii", "acc_ii_ckpt": "ref_ii_ckpt", "t_ii": "tref_ii",
}
CHECKPOINTED = ("ref_ii_ckpt", "f_ii_ckpt", "acc_ii_ckpt")
LAYERS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


def _ok(result, name):
    assert name in result, f"scenario {name} wrote no result"
    err = result[name]["error"]
    assert err is None, f"{name} failed:\n{err and err['traceback']}"
    return result[name]


def _assert_adapter_equal(got_dir, want_dir, atol=W_ATOL):
    got, want = load_adapter_tensors(got_dir), load_adapter_tensors(want_dir)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for name in want:
        assert got[name].shape == want[name].shape, f"{name} saved as a shard"
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def _assert_losses_equal(got, want, rtol=LOSS_RTOL):
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=rtol, atol=0)


def _check_all(checks):
    failures = []
    for name, check in checks:
        try:
            check()
        except AssertionError as err:
            failures.append(f"[{name}] {err}")
    assert not failures, "\n\n".join(failures)


def test_fsdp2_parity_offload_bf16_checkpointing_resume(model_dir, tmp_path):
    loop = dict(mode="loop", steps=STEPS, mb=MB)
    trainer = dict(mode="trainer", steps=4, mb=MB)
    ref_launch = Launch(1, [
        dict(name="ref_base", ga=2, hyclora=BASELINE, measure=True, **loop),
        dict(name="ref_ii", ga=2, hyclora=INTRA_INTER, measure=True, **loop),
        dict(name="ref_ii_ckpt", ga=2, hyclora=INTRA_INTER, ckpt=BOUNDARY, **loop),
        # FSDP2 in one process (a 1-rank mesh), fp32 and bf16 compute / fp32 reduce
        dict(name="f1_ii", ga=2, fsdp=True, hyclora=INTRA_INTER, **loop),
        dict(name="ref_ii_bf16", ga=2, fsdp=True, mp="bf16", hyclora=INTRA_INTER, **loop),
        dict(name="tref_ii", ga=2, hyclora=INTRA_INTER, **trainer),
    ], tmp_path / "ref", model_dir, worker=WORKER, distributed=True, timeout=500)
    dist_dir = tmp_path / "dist"
    checkpoint = dist_dir / "t_cal" / "trainer" / "checkpoint-2"
    dist_launch = Launch(2, [
        dict(name="f_base", fsdp=True, hyclora=BASELINE, measure=True, **loop),
        dict(name="f_ii", fsdp=True, hyclora=INTRA_INTER, measure=True, **loop),
        dict(name="f_ii_ckpt", fsdp=True, hyclora=INTRA_INTER, ckpt=BOUNDARY, **loop),
        dict(name="f_ii_offload", fsdp=True, offload=True, hyclora=INTRA_INTER, **loop),
        dict(name="f_ii_bf16", fsdp=True, mp="bf16", hyclora=INTRA_INTER, **loop),
        dict(name="acc_ii", mode="accelerate", steps=STEPS, mb=MB, hyclora=INTRA_INTER),
        dict(name="acc_ii_ckpt", mode="accelerate", steps=STEPS, mb=MB, hyclora=INTRA_INTER, ckpt=BOUNDARY),
        dict(name="t_ii", fsdp=True, hyclora=INTRA_INTER, **trainer),
        # Calibrated statistics (frozen after 2 forwards) are per-rank state: resuming from step 2
        # must restore each rank's own, or steps 3-4 would quantise differently.
        dict(name="t_cal", fsdp=True, hyclora=CALIBRATED, save_steps=2, **trainer),
        dict(name="t_cal_resume", fsdp=True, hyclora=CALIBRATED, resume=str(checkpoint), **trainer),
        # Last: a hyclora layer whose MLP is its own FSDP unit must fail, naming FSDP2.
        dict(name="f_child", fsdp=True, guard_child="mlp", hyclora=BASELINE, expect_error=True,
             **dict(loop, steps=1)),
    ], dist_dir, model_dir, worker=WORKER, distributed=True, timeout=500)
    refs, runs = ref_launch.wait(), dist_launch.wait()
    ref_dir = tmp_path / "ref"
    results = {**refs, **runs}

    def where(name):
        return (ref_dir if name in refs else dist_dir) / name / "adapter"

    def parity(name):
        ref_name = PARITY[name]
        got, want = _ok(results, name), _ok(results, ref_name)
        assert got["param_types"] == ["DTensor"], f"{name} did not run sharded: {got['param_types']}"
        assert len(got["losses"]) == len(want["losses"]) >= STEPS
        assert got["losses"][-1] != want["losses"][0], "the loss must move, or the comparison proves nothing"
        _assert_losses_equal(got["losses"], want["losses"])
        _assert_adapter_equal(where(name), where(ref_name))

    def bf16():
        got, want = _ok(runs, "f_ii_bf16"), _ok(refs, "ref_ii_bf16")
        _assert_losses_equal(got["losses"], want["losses"], BF16_LOSS_RTOL)
        _assert_adapter_equal(where("f_ii_bf16"), where("ref_ii_bf16"), BF16_W_ATOL)
        # bf16 compute really differs from fp32 (else this compares nothing new)
        assert got["losses"] != _ok(refs, "ref_ii")["losses"]

    def checkpointing_ran():
        # transformers >= 5.23 checkpoints in the layer's class forward, which only the outermost
        # class runs: a wrapper bound before fully_shard subclasses the layer switched it off unseen.
        for name in CHECKPOINTED:
            got = _ok(results, name)
            assert got["ckpt_calls"] == LAYERS * got["micro_batches"] > 0, (name, got["ckpt_calls"], got["micro_batches"])

    def offload_on_host():
        assert _ok(runs, "f_ii_offload")["param_devices"] == ["cpu"]

    def compressed_bytes_unchanged():
        # What autograd keeps per decoder layer is the same with and without FSDP2 (the weights it
        # gathers are parameters, not activations), and intra_inter keeps less than baseline.
        for sharded, plain in (("f_base", "ref_base"), ("f_ii", "ref_ii")):
            got, want = _ok(runs, sharded)["saved_bytes"], _ok(refs, plain)["saved_bytes"]
            assert got == want and len(got) == 2, (sharded, got, want)
        assert sum(_ok(refs, "ref_ii")["saved_bytes"]) < 0.6 * sum(_ok(refs, "ref_base")["saved_bytes"])

    def resume_continues():
        full, resumed = _ok(runs, "t_cal"), _ok(runs, "t_cal_resume")
        assert full["fsdp"] and resumed["fsdp"]
        assert resumed["steps"] == [3, 4], "resume must start after the checkpointed step"
        _assert_losses_equal(resumed["losses"], full["losses"][2:])
        _assert_adapter_equal(where("t_cal_resume"), where("t_cal"))

    def child_unit_names_fsdp():
        err = runs["f_child"]["error"]
        assert err is not None, "a hyclora layer reading FSDP2 shards must not run silently"
        assert err["type"] == "FSDPShardError", err
        assert "FSDP2" in err["message"] and "mlp.gate_proj" in err["message"]

    def adapter_loads_without_fsdp():
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        adapter = where("f_ii")
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        x = torch.arange(16).view(1, 16)
        with torch.no_grad():
            before = base(input_ids=x).logits
        model = PeftModel.from_pretrained(base, str(adapter))
        loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        for name, tensor in load_adapter_tensors(adapter).items():
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
        with torch.no_grad():
            after = model(input_ids=x).logits
        assert (after - before).abs().max() > 1e-4

    _check_all(
        [(name, lambda name=name: parity(name)) for name in sorted(PARITY)]
        + [("checkpointing_ran", checkpointing_ran), ("bf16", bf16), ("offload", offload_on_host),
           ("memory", compressed_bytes_unchanged), ("resume", resume_continues), ("child_unit", child_unit_names_fsdp),
           ("adapter_load", adapter_loads_without_fsdp)]
    )


class _Block(torch.nn.Module):
    gradient_checkpointing = True

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


def _subclass_like_fully_shard(module):
    # fully_shard swaps in a subclass; transformers >= 5.23 gives it its own (checkpointing) forward
    base = type(module)
    module.__class__ = type(f"FSDP{base.__name__}", (base,), {"forward": lambda self, *a, **k: base.forward(self, *a, **k)})


def test_shard_guards_are_hooks_and_refuse_a_stale_instance_forward():
    import functools

    from hyclora.integrations.fsdp import install_shard_guards, stale_instance_forward

    x = torch.randn(2, 4, requires_grad=True)
    block = _Block().train()
    handle = install_shard_guards(None, [block])
    _subclass_like_fully_shard(block)
    # the guards leave the class forward (where transformers checkpoints) reachable
    assert "forward" not in block.__dict__ and not stale_instance_forward(block)
    out = block(x)
    assert out._base is None, "FSDP2 warns about (and loses its hook on in-place ops of) view outputs"
    out.sum().backward()
    torch.testing.assert_close(x.grad, block.proj.weight.sum(0).expand(2, 4))
    handle.remove()
    assert not block._forward_pre_hooks and not block._forward_hooks

    stale = _Block().train()
    bound = stale.forward
    stale.forward = functools.wraps(bound)(lambda *a, **k: bound(*a, **k))  # bound before the subclass
    install_shard_guards(None, [stale])
    assert not stale_instance_forward(stale)  # nothing overrides it yet
    _subclass_like_fully_shard(stale)
    assert stale_instance_forward(stale)
    with pytest.raises(RuntimeError, match="instance-level forward .* activation checkpointing would silently not run"):
        stale(x)
    stale.gradient_checkpointing = False  # without checkpointing skipping the class forward loses nothing
    stale(x)
