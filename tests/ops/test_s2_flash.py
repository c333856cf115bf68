"""S²-Attn by flash calls on strided views (``hyclora.ops.s2attn.s2_flash_forward/backward``), the
path the decoder block's backward takes for unmasked MHA S²-Attn.

Checked: outputs and gradients equal ``s2_attention`` under autograd (the reference the S²-Attn
tests pin to LongLoRA's definition) for group sizes that do and do not divide the sequence, odd
head counts and batches; gradients written over q/k/v when asked (no new tensors) and never
otherwise; which inputs are eligible; inside hyclora's block the path is taken, gradients equal
the generic path's, a saved (baseline) v is not overwritten, and the backward's live peak drops.
"""

from __future__ import annotations

import pytest
import torch

import hyclora.ops.blocks as blocks
from hyclora.config import HyCLoRAConfig
from hyclora.ops.s2attn import (resolve_group_size, s2_attention, s2_flash_backward, s2_flash_eligible,
                                s2_flash_forward)


def _reference(q, k, v, do, ratio):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = s2_attention(*leaves, group_ratio=ratio)
    out.backward(do)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("heads_per_call", ["all", 1, 3])
@pytest.mark.parametrize("b,h,s,ratio", [(1, 8, 64, 0.25), (2, 4, 70, 0.25), (1, 6, 33, 0.25), (1, 2, 7, 0.25),
                                         (3, 4, 40, 0.5)])
def test_flash_views_equal_the_autograd_reference(b, h, s, ratio, heads_per_call, monkeypatch):
    import hyclora.ops.s2attn as s2attn

    if heads_per_call != "all":  # long-sequence regime: a span's heads over several flash calls
        monkeypatch.setattr(s2attn, "_FLASH_CALL_ELEMENTS", heads_per_call * s * 16)
    gen = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(b, h, s, 16, generator=gen) for _ in range(3))
    do = torch.randn(b, h, s, 16, generator=gen)
    ref_out, ref_grads = _reference(q, k, v, do, ratio)
    group = resolve_group_size(s, ratio, None)
    assert s2_flash_eligible(q, k, v, None)
    o, saved = s2_flash_forward(q, k, v, group)
    assert o.shape == (b, s, h, 16) and o.is_contiguous()
    torch.testing.assert_close(o.transpose(1, 2), ref_out, rtol=1e-5, atol=1e-5)
    qc, kc, vc = (t.clone() for t in (q, k, v))
    grads = s2_flash_backward(qc, kc, vc, o, do.transpose(1, 2), saved, group, overwrite=(True, False, True))
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert grads[0] is qc and grads[2] is vc  # written over the caller's q and v
    assert grads[1] is not kc and torch.equal(kc, k)  # k was not the caller's to overwrite


@pytest.mark.parametrize("b,h,s,ratio", [(1, 8, 64, 0.25), (2, 4, 70, 0.25), (1, 6, 33, 0.25), (3, 4, 40, 0.5)])
def test_sdpa_blocks_equal_the_autograd_reference(b, h, s, ratio):
    from hyclora.ops.s2attn import s2_sdpa_backward, s2_sdpa_output

    gen = torch.Generator().manual_seed(s + 1)
    q, k, v = (torch.randn(b, h, s, 16, generator=gen) for _ in range(3))
    do = torch.randn(b, h, s, 16, generator=gen)
    ref_out, ref_grads = _reference(q, k, v, do, ratio)
    group = resolve_group_size(s, ratio, None)
    o = s2_sdpa_output(q, k, v, group)
    assert o.shape == (b, s, h, 16) and o.is_contiguous()
    torch.testing.assert_close(o.transpose(1, 2), ref_out, rtol=1e-5, atol=1e-5)
    qc, kc, vc = (t.clone() for t in (q, k, v))
    out = torch.full((b, s, h, 16), float("nan"))
    grads = s2_sdpa_backward(qc, kc, vc, do.transpose(1, 2), group, overwrite=(True, False, True), out=out)
    torch.testing.assert_close(out, o, rtol=1e-5, atol=1e-5)  # every block's output written
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert grads[0] is qc and grads[2] is vc and grads[1] is not kc and torch.equal(kc, k)


def test_eligibility():
    q = torch.randn(1, 4, 16, 8)
    assert s2_flash_eligible(q, q.clone(), q.clone(), None)
    assert not s2_flash_eligible(q, q, q, torch.ones(1, 16, dtype=torch.bool))  # masks: generic path
    assert not s2_flash_eligible(q, q[:, :2], q[:, :2], None)  # GQA
    assert not s2_flash_eligible(q, q, q, None, dropout_p=0.1)
    assert not s2_flash_eligible(q[..., ::2], q[..., ::2], q[..., ::2], None)  # last dim not contiguous
    assert not s2_flash_eligible(q[:, :1], q[:, :1], q[:, :1], None)  # one head: nothing to shift


def _llama_s2(layer_type, checkpointing=False, kernels="auto", lm_loss="auto"):
    from helpers.models import lora_model, tiny_model

    from hyclora.config import HyCLoRAConfig
    from hyclora.integrations.longseq import enable_s2attn
    from hyclora.models import apply_hyclora

    model = lora_model(tiny_model("llama", "sdpa", num_key_value_heads=4), r=4)  # MHA: eligible
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_s2attn(model)
    apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, q_bit=8, iteration_threshold=0, s2_block_kernels=kernels,
                                       lm_loss=lm_loss))
    return model


def _batch():
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(7))  # group 8 does not divide 30
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("min_block, expected", [(8, "sdpa"), (9, "flash")])
def test_auto_block_kernels_pick_by_block_length(min_block, expected, monkeypatch):
    # the default picks sdpa for blocks of at least S2_SDPA_MIN_BLOCK tokens (the tiny model's
    # group is 8 tokens), in the block's backward and in its no-grad forwards
    import hyclora.ops.s2attn as s2attn
    from helpers.models import step_grads

    assert HyCLoRAConfig().s2_block_kernels == "auto"
    monkeypatch.setattr(s2attn, "S2_SDPA_MIN_BLOCK", min_block)
    assert s2attn.s2_block_kernels(min_block) == "sdpa" and s2attn.s2_block_kernels(min_block - 1) == "flash"
    used = []
    for name in ("s2_sdpa_backward", "s2_flash_backward"):
        real = getattr(blocks, name)
        monkeypatch.setattr(blocks, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    for name in ("s2_sdpa_output", "s2_flash_forward"):
        real = getattr(s2attn, name)
        monkeypatch.setattr(s2attn, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    step_grads(_llama_s2("intra_inter_full_fuse", True), _batch())
    want = ("s2_sdpa_backward", "s2_sdpa_output") if expected == "sdpa" else ("s2_flash_backward", "s2_flash_forward")
    assert used and set(used) <= set(want) and want[0] in used


def test_unknown_block_kernels_name_the_choices():
    import hyclora.ops.s2attn as s2attn

    with pytest.raises(ValueError, match="'auto', 'sdpa' or 'flash'"):
        s2attn.s2_block_kernels(4096, "cudnn")
    with pytest.raises(ValueError, match="s2_block_kernels='cudnn'.*auto, sdpa, flash"):
        HyCLoRAConfig(s2_block_kernels="cudnn")


@pytest.mark.parametrize("kernels", ["sdpa", "flash"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layer_type", ["baseline", "intra_inter", "intra_inter_full_fuse"])
def test_block_takes_the_flash_path_with_equal_gradients(layer_type, checkpointing, kernels, monkeypatch):
    import hyclora.ops.s2attn as s2attn
    from helpers.models import step_grads
    from helpers.numerics import worst_rel_err

    model = _llama_s2(layer_type, checkpointing, kernels)
    calls = []
    bwd_name = "s2_sdpa_backward" if kernels == "sdpa" else "s2_flash_backward"
    real = getattr(blocks, bwd_name)

    def spy(*args, **kwargs):
        calls.append(args[-1])  # the overwrite flags (the last positional argument of both)
        return real(*args, **kwargs)

    forwards = []  # every no-grad S²-Attn output on views goes through s2attn._blockwise_output
    real_fwd = s2attn._blockwise_output
    monkeypatch.setattr(blocks, bwd_name, spy)
    monkeypatch.setattr(s2attn, "_blockwise_output", lambda *a, **k: forwards.append(1) or real_fwd(*a, **k))
    loss, grads = step_grads(model, _batch())
    assert len(calls) == 2  # both layers
    # forward, (checkpoint recompute,) and for "flash" the backward's recompute (the "sdpa" backward
    # recomputes inside s2_sdpa_backward): every attention call takes the view path
    assert len(forwards) == 2 * ((3 if checkpointing else 2) - (kernels == "sdpa"))
    # q and k are the backward's own; v is a saved tensor in baseline (kept exactly), else rebuilt
    assert all(own == (True, True, layer_type != "baseline") for own in calls)
    monkeypatch.setattr(blocks, "s2_flash_eligible", lambda *a, **k: False)
    ref_loss, ref_grads = step_grads(model, _batch())
    assert float(loss) == float(ref_loss)
    assert worst_rel_err(grads, ref_grads) < 1e-5


def test_baseline_saved_v_survives_a_retained_second_backward():
    from helpers.numerics import worst_rel_err

    model = _llama_s2("baseline", lm_loss="model")  # the chunked loss refuses a second backward
    model.train()
    loss = model(**_batch()).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    loss.backward()
    second = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert worst_rel_err(second, first) < 1e-6


def test_flash_path_holds_fewer_temporaries(monkeypatch):
    """Forward + backward of S²-Attn, counting q/k/v (cloned inside): the autograd path peaks at 10
    full-size tensors (block copies, full-size slice_backward zeros added together), the view path
    at under 5 (q/k/v turning into their gradients, o, one call's temporaries) in the long-sequence
    regime where a span's heads go through several flash calls (here: one head per call)."""
    import hyclora.ops.s2attn as s2attn
    from hyclora.memory import measure_live_peak

    monkeypatch.setattr(s2attn, "_FLASH_CALL_ELEMENTS", 512 * 16)

    q, k, v, do = (torch.randn(1, 8, 512, 16, generator=torch.Generator().manual_seed(i)) for i in range(4))
    group = resolve_group_size(512, 0.25, None)
    full = q.numel() * q.element_size()

    def generic():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        s2_attention(*leaves, group_ratio=0.25).backward(do)

    def flash():
        qc, kc, vc = (t.clone() for t in (q, k, v))
        o, saved = s2_flash_forward(qc, kc, vc, group)
        s2_flash_backward(qc, kc, vc, o, do.transpose(1, 2), saved, group, overwrite=(True, True, True))

    def sdpa():  # the block variant the decoder block takes for long blocks (s2attn.s2_block_kernels)
        from hyclora.ops.s2attn import s2_sdpa_backward, s2_sdpa_output

        qc, kc, vc = (t.clone() for t in (q, k, v))
        o = s2_sdpa_output(qc, kc, vc, group)
        s2_sdpa_backward(qc, kc, vc, do.transpose(1, 2), group, overwrite=(True, True, True), out=o)

    generic_peak = measure_live_peak(generic, snapshot=False)[1].peak_bytes / full
    flash_peak = measure_live_peak(flash, snapshot=False)[1].peak_bytes / full
    sdpa_peak = measure_live_peak(sdpa, snapshot=False)[1].peak_bytes / full
    assert flash_peak < 5 and flash_peak < 0.6 * generic_peak, (flash_peak, generic_peak)
    assert sdpa_peak < 5 and sdpa_peak < 0.6 * generic_peak, (sdpa_peak, generic_peak)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernels", ["sdpa", "flash"])
@pytest.mark.parametrize("s", [4096, 4100])
def test_cuda_views_equal_the_reference(s, kernels):
    from hyclora.ops.s2attn import s2_sdpa_backward, s2_sdpa_output

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    ref_out, ref_grads = _reference(q, k, v, do, 0.25)
    group = resolve_group_size(s, 0.25, None)
    assert s2_flash_eligible(q, k, v, None)
    own = (True, True, True)
    if kernels == "sdpa":
        o = s2_sdpa_output(q, k, v, group)
        grads = s2_sdpa_backward(q.clone(), k.clone(), v.clone(), do.transpose(1, 2), group, overwrite=own)
    else:
        o, saved = s2_flash_forward(q, k, v, group)
        grads = s2_flash_backward(q.clone(), k.clone(), v.clone(), o, do.transpose(1, 2), saved, group, overwrite=own)
    torch.testing.assert_close(o.transpose(1, 2), ref_out, rtol=2e-2, atol=2e-2)
    for got, ref in zip(grads, ref_grads):
        err = float((got.float() - ref.float()).norm() / ref.float().norm())
        assert err < 1e-2, err
