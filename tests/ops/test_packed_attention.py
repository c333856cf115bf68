"""Packed (padding-free) batches through hyclora's attention: per-document attention, exact.

* the ``cu_seqlens`` helpers against brute force; the varlen plumbing (a CPU reference kernel stands
  in for flash-attention's) equals the block-diagonal mask path; bad ``cu_seqlens`` refused by name;
* tiny Llama, fp32: with compression off a packed batch of 3 documents gives per-document losses and
  LoRA gradients equal to the unpatched model's padded run (cu_seq_lens_q with and without KV cache,
  or position_ids alone without one, sdpa and eager); with compression on, cosines like the fidelity tests;
  RoPE positions restart per document;
* S²-Attn and the chunked LM loss with packing; CUDA-graph emulation replays one graph for
  micro-batches with different document boundaries.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hyclora import HyCLoRAConfig, apply_hyclora
from hyclora.data.packing import PackedBatchCollator
from hyclora.ops import attention
from hyclora.ops.attention import (attention_forward, check_documents, document_ids, document_mask,
                                   packed_attention_forward, packed_documents)
from hyclora.ops.s2attn import S2ATTN_NAME, s2_attention

from helpers.graph_emulation import chain_grapher
from helpers.models import draw_lora_b, lora_model, tiny_model
from helpers.numerics import cosine, worst_rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = (7, 4, 9)
ROW = 24  # one packed row: 20 tokens of documents + 4 of padding


def _docs(seed=0, lengths=LENGTHS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen) for n in lengths]


def _reference_varlen(q, k, v, cu, max_len, scale):
    """flash_attn_varlen_func's contract on the CPU: causal attention inside each [cu[i], cu[i+1])."""
    out = torch.zeros_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            blk = lambda t: t[a:b].transpose(0, 1)  # noqa: E731
            out[a:b] = F.scaled_dot_product_attention(blk(q), blk(k), blk(v), is_causal=True, scale=scale,
                                                      enable_gqa=True).transpose(0, 1)
    return out


# -- helpers and plumbing ----------------------------------------------------------------------------


def test_document_ids_and_mask_against_brute_force():
    cu = torch.tensor([0, 3, 5, 8, 10, 12, 12, 12], dtype=torch.int32)  # 2 rows of 6; padded capacity
    ids = document_ids(cu, 2, 6)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2], [2, 2, 3, 3, 4, 4]]
    mask = document_mask(cu, 2, 6)
    brute = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    flat = ids.flatten()
    for r in range(2):
        for i in range(6):
            for j in range(i + 1):
                brute[r, 0, i, j] = bool(flat[r * 6 + i] == flat[r * 6 + j])
    assert torch.equal(mask, brute)
    assert not mask[0, 0, 3, 2] and mask[0, 0, 4, 3]  # document 1 starts at token 3


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_varlen_plumbing_equals_mask_path(heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    b, s, d = 2, 10, 8
    q = torch.randn(b, heads, s, d, generator=gen)
    k, v = (torch.randn(b, kv_heads, s, d, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 4, 10, 13, 20, 20, 20], dtype=torch.int32)
    via_mask = packed_attention_forward(q, k, v, cu, 0.3)  # CPU: no varlen kernel -> the mask
    assert attention.varlen_kernel(q) is None
    via_varlen = packed_attention_forward(q, k, v, cu, 0.3, kernel=_reference_varlen)
    torch.testing.assert_close(via_varlen, via_mask, rtol=1e-5, atol=1e-6)
    # every document alone, with plain causal sdpa
    for a, e in ((0, 4), (4, 10)):
        alone = attention_forward("sdpa", q[:1, :, a:e], k[:1, :, a:e], v[:1, :, a:e], None, 0.3)
        torch.testing.assert_close(via_mask[:1, a:e], alone, rtol=1e-5, atol=1e-6)


def test_bad_documents_are_refused():
    good = torch.tensor([0, 3, 6, 6], dtype=torch.int32)
    check_documents(good, 2, 3, "cpu")
    with pytest.raises(ValueError, match="1-D int32"):
        check_documents(good.long(), 2, 3, "cpu")
    with pytest.raises(ValueError, match="end at 6 and contain every row start"):
        check_documents(torch.tensor([0, 2, 6], dtype=torch.int32), 2, 3, "cpu")  # a document across rows
    with pytest.raises(ValueError, match="end at 6"):
        check_documents(torch.tensor([0, 3, 5], dtype=torch.int32), 2, 3, "cpu")
    padding = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()
    padding[0, :, :, 2] = False  # a padding key inside a document
    with pytest.raises(ValueError, match="drop it"):
        packed_documents(padding, good, 2, 3, "cpu", "layer 0")
    assert packed_documents(padding, None, 2, 3, "cpu") is None  # not packed: the mask as it is
    causal = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()  # hides nothing inside a document
    assert packed_documents(causal, good, 2, 3, "cpu") is good


def test_s2attn_packed_equals_s2_with_the_document_mask():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 16, 8, generator=gen)
    k, v = torch.randn(1, 2, 16, 8, generator=gen), torch.randn(1, 2, 16, 8, generator=gen)
    cu = torch.tensor([0, 5, 11, 16, 16], dtype=torch.int32)
    got = attention_forward(S2ATTN_NAME, q, k, v, cu, 0.35, group_size=4)
    ref = s2_attention(q, k, v, group_size=4, attention_mask=document_mask(cu, 1, 16), scaling=0.35)
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(1, 16, 32), rtol=1e-5, atol=1e-6)
    # and it differs from S²-Attn over the whole row (the documents really cut it)
    whole = s2_attention(q, k, v, group_size=4, scaling=0.35).transpose(1, 2).reshape(1, 16, 32)
    assert (got - whole).abs().max() > 1e-3


# -- tiny Llama: packed == padded per document ----------------------------------------------------------


def _model(impl="sdpa", layer_type=None, seed=0, **cfg):
    model = lora_model(tiny_model(impl=impl, seed=seed, max_position_embeddings=64))
    draw_lora_b(model, 0.05, seed)
    if layer_type is not None:
        apply_hyclora(model, HyCLoRAConfig(layer_type=layer_type, **cfg))
    model.train()
    return model


def _packed_batch(docs, row=ROW):
    feature = {"input_ids": torch.cat(docs).tolist(), "seq_lengths": [len(d) for d in docs]}
    return PackedBatchCollator(row, pad_token_id=0, max_documents=6)([feature])


def _per_doc_losses(logits, ids, spans):
    """Summed next-token losses of each document (tokens [a, e) of row r)."""
    out = []
    for r, a, e in spans:
        out.append(F.cross_entropy(logits[r, a:e - 1].float(), ids[r, a + 1:e], reduction="sum"))
    return torch.stack(out)


def _padded_run(model, docs):
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, d in enumerate(docs):
        ids[r, :len(d)], mask[r, :len(d)] = d, 1
    model.zero_grad(set_to_none=True)
    losses = _per_doc_losses(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids,
                             [(r, 0, len(d)) for r, d in enumerate(docs)])
    losses.sum().backward()
    return losses.detach(), _grads(model)


def _packed_run(model, docs, keys=("position_ids", "cu_seq_lens_q"), use_cache=True, row=ROW):
    batch = _packed_batch(docs, row)
    ids = batch["input_ids"]
    kwargs = {k: batch[k] for k in keys}
    starts = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).tolist()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=use_cache, **kwargs).logits
    losses = _per_doc_losses(logits, ids, [(0, a, e) for a, e in zip(starts[:-1], starts[1:])])
    losses.sum().backward()
    return losses.detach(), _grads(model)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("impl,keys,use_cache", [
    ("sdpa", ("position_ids", "cu_seq_lens_q"), True),   # no mask reaches the layers: the documents alone
    ("sdpa", ("position_ids", "cu_seq_lens_q"), False),  # transformers' packed mask beside them
    ("sdpa", ("position_ids",), False),   # transformers' packed mask alone
    ("eager", ("position_ids", "cu_seq_lens_q"), True),   # a plain causal mask beside them
    ("eager", ("position_ids",), False),
])
def test_baseline_packed_equals_unpatched_padded(impl, keys, use_cache):
    docs = _docs()
    ref_losses, ref_grads = _padded_run(_model(impl), docs)  # the unpatched PEFT model, padded
    model = _model(impl, layer_type="baseline")
    losses, grads = _packed_run(model, docs, keys, use_cache)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert worst_rel_err(grads, ref_grads) < 1e-5
    # the same packed batch through hyclora's padded path agrees too
    pad_losses, _ = _padded_run(model, docs)
    torch.testing.assert_close(losses, pad_losses, rtol=1e-5, atol=1e-5)


def test_varlen_path_equals_mask_path_in_the_model(monkeypatch):
    docs = _docs(1)
    model = _model("sdpa", layer_type="baseline")
    mask_losses, mask_grads = _packed_run(model, docs)
    used = []

    def kernel(q, k, v, cu, n, scale):
        used.append(n)
        return _reference_varlen(q, k, v, cu, n, scale)

    monkeypatch.setattr(attention, "varlen_kernel", lambda q: kernel)  # what CUDA would pick
    losses, grads = _packed_run(model, docs)
    assert used and set(used) == {ROW}  # forward and the backward's recompute, per layer
    torch.testing.assert_close(losses, mask_losses, rtol=1e-5, atol=1e-5)
    assert worst_rel_err(grads, mask_grads) < 1e-5


def test_compressed_packed_close_to_padded():
    docs = _docs(2, (13, 6, 10))
    ref_losses, ref_grads = _padded_run(_model("sdpa"), docs)
    model = _model("sdpa", layer_type="intra_inter", q_bit=4, iteration_threshold=1)
    _packed_run(model, docs, row=32)  # calibrates
    losses, grads = _packed_run(model, docs, row=32)
    torch.testing.assert_close(losses, ref_losses, rtol=0.02, atol=0.02)
    cosines = torch.tensor([cosine(grads[n], ref_grads[n]) for n in ref_grads])
    assert cosines.mean() > 0.99 and cosines.min() > 0.95, cosines
    assert worst_rel_err(grads, ref_grads) > 1e-4  # compression really ran


def test_rope_positions_restart_per_document():
    docs = _docs(3)
    model = _model("sdpa", layer_type="baseline")
    batch = _packed_batch(docs)
    assert batch["position_ids"][0].tolist() == list(range(7)) + list(range(4)) + list(range(9)) + list(range(4))
    packed = model(**{k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}).logits
    alone = model(input_ids=docs[1][None]).logits  # document 2 alone, positions 0..3
    torch.testing.assert_close(packed[0, 7:11], alone[0], rtol=1e-5, atol=1e-5)
    # the RoPE tables the decoder layers get restart at every document start (attention alone
    # cannot show it: RoPE scores depend on relative positions only)
    seen = []
    layer = model.base_model.model.model.layers[0]
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_embeddings"][0]), with_kwargs=True)
    model(**{k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")})
    hook.remove()
    cos = seen[0][0]
    rotary = model.base_model.model.model.rotary_emb
    fresh = rotary(cos[None], position_ids=torch.arange(ROW)[None])[0][0]  # positions 0, 1, 2, ...
    for start, n in ((0, 7), (7, 4), (11, 9), (20, 4)):
        torch.testing.assert_close(cos[start:start + n], fresh[:n], rtol=0, atol=0)
    assert (cos[7] - cos[6]).abs().max() > 1e-3


def test_s2attn_with_packing_never_crosses_documents():
    from hyclora.integrations.longseq import enable_s2attn

    docs = _docs(4)
    model = _model("sdpa", layer_type="baseline")
    enable_s2attn(model, group_size=8)
    base, _ = _packed_run(model, docs)
    changed = [docs[0].flip(0), docs[1], docs[2]]  # the first document's tokens differ
    other, _ = _packed_run(model, changed)
    torch.testing.assert_close(other[1:], base[1:], rtol=1e-6, atol=1e-6)
    assert (other[0] - base[0]).abs() > 1e-4


def test_chunked_loss_with_packing():
    from hyclora.integrations.longseq import CausalLMChunkedLoss

    docs = _docs(5)
    model = _model("sdpa", layer_type="baseline")
    batch = _packed_batch(docs)
    kwargs = {k: batch[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
    ref = model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = CausalLMChunkedLoss(model, chunk_size=5)(batch["input_ids"], labels=batch["labels"], **kwargs)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert worst_rel_err(_grads(model), ref_grads) < 1e-5
    # the loss is the mean of the per-document losses of the padded run
    ref_losses, _ = _padded_run(_model("sdpa"), docs)
    torch.testing.assert_close(loss.detach(), ref_losses.sum() / (sum(LENGTHS) - 3), rtol=1e-5, atol=1e-6)


# -- CUDA graphs (CPU emulation) ---------------------------------------------------------------------------


def test_graphs_replay_one_graph_for_other_document_boundaries():
    from hyclora.cuda_graphs import DecoderLayerGraphs

    eager = _model("sdpa", layer_type="intra_inter_full_fuse", q_bit=2, iteration_threshold=2)
    graphed = copy.deepcopy(eager)
    graphs = DecoderLayerGraphs(graphed, _grapher=chain_grapher, num_warmup_iters=1)
    splits = [(7, 4, 9), (12, 8), (3, 3, 3, 3, 3), (20,), (5, 15)]  # 1 calibrating step, then capture + replays
    for step, lengths in enumerate(splits):
        docs = _docs(10 + step, lengths)
        results = [_packed_run(m, docs) for m in (eager, graphed)]
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
        assert worst_rel_err(results[1][1], results[0][1]) < 1e-5, step
    layers = 2
    assert graphs.counts["capture"] == 1, dict(graphs.counts)
    assert graphs.counts["replay"] == 4 * layers and graphs.counts["eager: statistics calibrating"] == 1 * layers
    assert not any(k.startswith("eager: input shape") or k == "eager: attention_mask" for k in graphs.counts)
    graphs.remove()


def test_bench_smoke(tmp_path):
    import os
    import subprocess
    import sys

    from helpers.repo import REPO

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_packing.py"), "--smoke", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| padded | False |" in out.stdout and "| packed (mask) | False |" in out.stdout
    assert "FAILED" not in out.stdout
    assert (tmp_path / "packing.csv").read_text().count("\n") == 6  # header + 5 variants
