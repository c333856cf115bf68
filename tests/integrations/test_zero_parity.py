"""DeepSpeed ZeRO-1/2/3 with 2 gloo processes on CPU equals a 1-process run, for plain LoRA and
hyclora baseline / intra_inter, through a plain ``deepspeed.initialize`` loop, HF Trainer and
accelerate; DeepSpeed activation checkpointing under ZeRO-3 changes nothing; ZeRO-3 resume
continues the loss curve (calibrated statistics included); the adapter saved under ZeRO-3 is a
plain PEFT adapter.

All runs are fp32 (one is bf16) on a tiny random Llama with LoRA on every linear. The 1-process reference
accumulates over the same micro-batches the ranks see (see _dist_worker), so any difference is
summation order: parity is asserted to fp32 rounding.

Process start-up dominates the cost, so each test launches its scenarios together in one set of
ranks, with its 1-process reference running alongside; the checks of one launch live in one test
(each failing scenario is named), so pytest-xdist never repeats a launch on two workers.
"""

import pytest
import torch

pytest.importorskip("deepspeed")

from helpers.dist import Launch, load_adapter_tensors, save_tiny_llama  # noqa: E402

# Every LoRA tensor is partitioned under ZeRO-3 (the default threshold would keep these tiny
# tensors whole), so gathering and saving are really exercised.
Z3 = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
STEPS, TRAINER_STEPS, MB = 4, 6, 2
# Measured (fp32, 2 ranks vs 1 process): losses equal to 2e-7 relative, adapter weights to 2.9e-6
# absolute (|w| <= 0.15; Adam turns summation-order noise in near-zero gradients into tiny
# updates). A real fault moves weights by ~lr = 1e-2 per step, 1000x these bounds.
LOSS_RTOL, W_ATOL, W_RTOL = 2e-6, 1e-5, 0.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


# hyclora layer types. iteration_threshold=0 recomputes the quantisation statistics from each
# micro-batch, so a rank and the 1-process run quantise the same micro-batch identically. (With
# a threshold > 0 each rank calibrates on its own micro-batches, which legitimately differs from
# one process calibrating on all of them.)
# the model's own LM loss: the chunked one runs only where the LM head is not sharded (not under
# ZeRO-3 / FSDP2), and a parity test needs the same loss arithmetic on both sides
BASELINE = {"layer_type": "baseline", "lm_loss": "model"}
INTRA_INTER = {"layer_type": "intra_inter", "q_bit": 4, "iteration_threshold": 0, "lm_loss": "model"}
CALIBRATED = {"layer_type": "intra_inter", "q_bit": 4, "iteration_threshold": 2, "lm_loss": "model"}
LEAF = {"zero3_prep": "leaf"}

# scenario name -> reference scenario name
LOOP_PARITY = {
    "z2": "ref", "z3": "ref",
    "hy_base_z2": "ref_base", "hy_base_z3": "ref_base",
    "hy_ii_z1": "ref_ii", "hy_ii_z2": "ref_ii", "hy_ii_z3": "ref_ii",
    "hy_base_z3_ckpt": "ref_base", "acc_hy_ii_z3": "ref_ii",
    "hy_ii_z3_bf16": "ref_ii_bf16",
}
BF16 = {"bf16": {"enabled": True}}



def _ok(result, name):
    assert name in result, f"scenario {name} wrote no result"
    err = result[name]["error"]
    assert err is None, f"{name} failed:\n{err and err['traceback']}"
    return result[name]


def _assert_adapter_equal(got_dir, want_dir):
    got, want = load_adapter_tensors(got_dir), load_adapter_tensors(want_dir)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for name in want:
        assert got[name].numel() > 0, f"{name} saved as an empty ZeRO-3 shard"
        torch.testing.assert_close(got[name], want[name], rtol=W_RTOL, atol=W_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _assert_losses_equal(got, want):
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=LOSS_RTOL, atol=0)


def _check_all(checks):
    """Run every named check; fail once, naming each failing one."""
    failures = []
    for name, check in checks:
        try:
            check()
        except AssertionError as err:
            failures.append(f"[{name}] {err}")
    assert not failures, "\n\n".join(failures)


def test_loop_and_accelerate_zero_parity(model_dir, tmp_path):
    common = dict(mode="loop", steps=STEPS, mb=MB)
    ref_launch = Launch(1, [
        dict(name="ref", ga=2, **common),
        dict(name="ref_base", ga=2, hyclora=BASELINE, **common),
        dict(name="ref_ii", ga=2, hyclora=INTRA_INTER, **common),
        # bf16 needs DeepSpeed's bf16 engine on both sides: one process, ZeRO-2, same micro-batches.
        dict(name="ref_ii_bf16", ga=2, ds="zero2", ds_overrides=BF16, hyclora=INTRA_INTER, **common),
    ], tmp_path / "ref", model_dir)
    dist_launch = Launch(2, [
        dict(name="z2", ds="zero2", **common),
        dict(name="z3", ds="zero3", ds_overrides=Z3, **common),
        dict(name="hy_base_z2", ds="zero2", hyclora=BASELINE, **common),
        dict(name="hy_base_z3", ds="zero3", ds_overrides=Z3, hyclora=BASELINE, **LEAF, **common),
        dict(name="hy_ii_z1", ds="zero1", hyclora=INTRA_INTER, **common),
        dict(name="hy_ii_z2", ds="zero2", hyclora=INTRA_INTER, **common),
        dict(name="hy_ii_z3", ds="zero3", ds_overrides=Z3, hyclora=INTRA_INTER, **LEAF, **common),
        dict(name="hy_ii_z3_bf16", ds="zero3", ds_overrides=dict(Z3, **BF16), hyclora=INTRA_INTER, **LEAF,
             **common),
        # DeepSpeed activation checkpointing from the JSON block (cpu_checkpointing, which on a
        # CPU-only run needs partitioning), every 2nd layer, under ZeRO-3.
        dict(name="hy_base_z3_ckpt", ds="zero3_actckpt_cpu", ds_overrides=Z3, hyclora=BASELINE,
             ckpt=dict(backend="deepspeed", every_k=2, partition_activations=True), **LEAF, **common),
        dict(name="acc_hy_ii_z3", mode="accelerate", ds="zero3", ds_overrides=Z3, steps=STEPS, mb=MB,
             hyclora=INTRA_INTER, **LEAF),
        # Last: hyclora under ZeRO-3 without leaf registration must fail loudly, naming ZeRO-3.
        dict(name="hy_z3_noleaf", ds="zero3", ds_overrides=Z3, hyclora=BASELINE, zero3_prep="guard",
             expect_error=True, **dict(common, steps=1)),
    ], tmp_path / "dist", model_dir)
    refs, runs = ref_launch.wait(), dist_launch.wait()
    ref_dir, dist_dir = tmp_path / "ref", tmp_path / "dist"

    def parity(name):
        ref_name = LOOP_PARITY[name]
        got, want = _ok(runs, name)["losses"], _ok(refs, ref_name)["losses"]
        assert len(got) == len(want) == STEPS
        assert got[-1] != want[0], "the loss must move, or the comparison proves nothing"
        _assert_losses_equal(got, want)
        _assert_adapter_equal(dist_dir / name / "adapter", ref_dir / ref_name / "adapter")
        if name.startswith("acc"):
            assert runs[name]["distributed_type"] == "DistributedType.DEEPSPEED"

    def references_differ_where_they_should():
        # hyclora baseline is plain LoRA to rounding; intra_inter is lossy, so its curve moves
        # (if it did not, the intra_inter parity would not show compression under ZeRO).
        _assert_losses_equal(_ok(refs, "ref_base")["losses"], _ok(refs, "ref")["losses"])
        _assert_adapter_equal(ref_dir / "ref_base" / "adapter", ref_dir / "ref" / "adapter")
        plain, ii = _ok(refs, "ref")["losses"], _ok(refs, "ref_ii")["losses"]
        assert plain[0] == ii[0], "forward outputs are exact, so the first loss is equal"
        assert max(abs(a - b) for a, b in zip(plain[1:], ii[1:])) > 1e-5

    def noleaf_names_zero3():
        err = runs["hy_z3_noleaf"]["error"]
        assert err is not None, "a hyclora layer reading ZeRO-3 shards must not run silently"
        assert err["type"] == "ZeRO3GatherError", err
        assert "ZeRO-3" in err["message"] and "prepare_zero3" in err["message"]

    def zero3_adapter_loads_without_deepspeed():
        # The adapter written under ZeRO-3 is a plain PEFT adapter: it loads into a plain model
        # and changes its output as its weights say.
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        _ok(runs, "hy_ii_z3")
        adapter = dist_dir / "hy_ii_z3" / "adapter"
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
        [(name, lambda name=name: parity(name)) for name in sorted(LOOP_PARITY)]
        + [("references", references_differ_where_they_should), ("noleaf", noleaf_names_zero3),
           ("adapter_load", zero3_adapter_loads_without_deepspeed)]
    )


def test_trainer_zero_parity_checkpoint_and_resume(model_dir, tmp_path):
    ref_launch = Launch(1, [
        dict(name="tref", mode="trainer", steps=STEPS, mb=MB, ga=2),
        dict(name="tref_ii", mode="trainer", steps=TRAINER_STEPS, mb=MB, ga=2, hyclora=INTRA_INTER),
    ], tmp_path / "ref", model_dir, timeout=500)
    dist_dir = tmp_path / "dist"
    checkpoint = dist_dir / "t3_cal" / "trainer" / "checkpoint-3"
    z3 = dict(mode="trainer", ds="zero3", ds_overrides=Z3, steps=TRAINER_STEPS, mb=MB, **LEAF)
    dist_launch = Launch(2, [
        dict(name="t2", mode="trainer", ds="zero2", steps=STEPS, mb=MB),
        dict(name="t3_ii", hyclora=INTRA_INTER, **z3),
        # Calibrated statistics (frozen after 2 forwards) are state: resuming from step 3 must
        # restore them, or steps 4-6 would quantise differently.
        dict(name="t3_cal", hyclora=CALIBRATED, save_steps=3, **z3),
        dict(name="t3_cal_resume", hyclora=CALIBRATED, resume=str(checkpoint), **z3),
    ], dist_dir, model_dir, timeout=500)
    refs, runs = ref_launch.wait(), dist_launch.wait()
    ref_dir = tmp_path / "ref"

    def zero2():
        t2 = _ok(runs, "t2")
        assert t2["deepspeed"] and t2["steps"] == list(range(1, STEPS + 1))
        _assert_losses_equal(t2["losses"], _ok(refs, "tref")["losses"])
        _assert_adapter_equal(dist_dir / "t2" / "adapter", ref_dir / "tref" / "adapter")

    def zero3():
        t3 = _ok(runs, "t3_ii")
        assert t3["deepspeed"] and len(t3["losses"]) == TRAINER_STEPS
        _assert_losses_equal(t3["losses"], _ok(refs, "tref_ii")["losses"])
        _assert_adapter_equal(dist_dir / "t3_ii" / "adapter", ref_dir / "tref_ii" / "adapter")

    def checkpoint_holds_plain_adapter():
        # Trainer's own save under ZeRO-3 (stage3_gather_16bit_weights_on_model_save) writes the
        # gathered adapter, equal to what save_lora_adapter writes at the end.
        _ok(runs, "t3_cal")
        _assert_adapter_equal(dist_dir / "t3_cal" / "trainer" / f"checkpoint-{TRAINER_STEPS}",
                              dist_dir / "t3_cal" / "adapter")

    def resume_continues():
        full, resumed = _ok(runs, "t3_cal"), _ok(runs, "t3_cal_resume")
        assert len(full["losses"]) == TRAINER_STEPS
        assert resumed["steps"] == [4, 5, 6], "resume must start after the checkpointed step"
        _assert_losses_equal(resumed["losses"], full["losses"][3:])
        _assert_adapter_equal(dist_dir / "t3_cal_resume" / "adapter", dist_dir / "t3_cal" / "adapter")

    _check_all([("trainer_zero2", zero2), ("trainer_zero3", zero3),
                ("checkpoint_adapter", checkpoint_holds_plain_adapter), ("resume", resume_continues)])
