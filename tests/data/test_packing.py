"""hyclora.data.packing: packed rows (TRL's best-fit decreasing), the fixed-shape packed batch, and
``--packing true --tokens_per_batch N`` in the examples."""

from __future__ import annotations

import pytest
import torch

from hyclora.data import CausalLMCollator
from hyclora.data.packing import PackedBatchCollator, max_documents, pack_examples
from hyclora.ops.attention import check_documents, document_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _row(*lengths, start=1):
    ids, value = [], start
    for n in lengths:
        ids += list(range(value, value + n))
        value += n
    return {"input_ids": ids, "labels": list(ids), "seq_lengths": list(lengths)}


def test_batch_layout():
    collate = PackedBatchCollator(10, pad_token_id=0, max_documents=3, rows=3)
    batch = collate([_row(4, 3), _row(10)])
    assert batch["input_ids"].shape == (3, 10) and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], list(range(10)), list(range(10))]
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    # no document's first token is a target (the shifted loss never crosses documents); no padding is
    assert batch["labels"][0].tolist() == [-100, 2, 3, 4, -100, 6, 7, -100, -100, -100]
    assert batch["labels"][2].eq(-100).all()  # the empty row that keeps the shape
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu.shape == (3 * (3 + 1) + 1,)
    assert cu.tolist() == [0, 4, 7, 10, 20] + [30] * 8
    assert batch["cu_seq_lens_k"] is cu and batch["max_length_q"] == 10
    check_documents(cu, 3, 10, "cpu")  # what the layers accept
    assert document_ids(cu, 3, 10)[0].tolist() == [0] * 4 + [1] * 3 + [2] * 3
    # another batch with other boundaries: the same shapes (one CUDA graph)
    other = collate([_row(1, 1, 8), _row(2, 2, 2), _row(5)])
    assert {k: tuple(v.shape) for k, v in other.items() if torch.is_tensor(v)} == \
        {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)}


def test_unpacked_features_and_the_padded_fallback():
    collate = PackedBatchCollator(8, pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])  # one document per row
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5]]
    padded = PackedBatchCollator(8, pad_token_id=0, padded=CausalLMCollator(0))
    assert "attention_mask" in padded([{"input_ids": [5, 6, 7]}])  # evaluation sets stay padded
    assert "cu_seq_lens_q" in padded([_row(3)])


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="tokens_per_batch"):
        PackedBatchCollator(1, pad_token_id=0)
    with pytest.raises(ValueError, match="max_documents"):
        PackedBatchCollator(10, pad_token_id=0, max_documents=2)([_row(2, 2, 2)])
    with pytest.raises(ValueError, match="seq_lengths summing to"):
        PackedBatchCollator(10, pad_token_id=0, max_documents=2)([dict(_row(2, 2), seq_lengths=[2, 3])])
    with pytest.raises(ValueError, match="rows=1"):
        PackedBatchCollator(10, pad_token_id=0, rows=1)([_row(2), _row(2)])


def test_pack_examples_keeps_every_document_whole():
    pytest.importorskip("trl")
    import datasets

    lengths = [5, 2, 3, 1, 6, 4, 6]
    docs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]
    dataset = datasets.Dataset.from_dict({"input_ids": docs, "labels": docs, "extra": list(range(len(docs)))})
    packed = pack_examples(dataset, 8)
    assert sorted(packed.column_names) == ["input_ids", "labels", "seq_lengths"]
    assert all(len(ids) <= 8 for ids in packed["input_ids"]) and len(packed) < len(docs)
    found = []
    for ids, seq in zip(packed["input_ids"], packed["seq_lengths"]):
        offset = 0
        for n in seq:
            found.append(ids[offset:offset + n])
            offset += n
    assert sorted(found) == sorted(docs)
    assert max_documents(packed) == max(len(s) for s in packed["seq_lengths"])
    batch = PackedBatchCollator(8, 0, max_documents(packed))(packed.select(range(2)).to_list())
    assert batch["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="raise --tokens_per_batch"):
        pack_examples(dataset, 5)


COMMON = ["--model_name_or_path", "tiny-random-llama", "--data", "synthetic:24", "--max_steps", "2",
          "--per_device_train_batch_size", "2", "--logging_steps", "1", "--max_eval_samples", "4",
          "--max_generate_samples", "0", "--progress", "false", "--save_strategy", "no", "--warmup_steps", "0",
          "--max_length", "128"]


def test_examples_train_packed(tmp_path):
    pytest.importorskip("trl")
    from helpers.examples import tokenizer
    from hyclora.training import parse_finetune_args, run_finetune

    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            batch = self.inner(features)
            seen.append({k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)})
            return batch

    args = parse_finetune_args("gsm8k", [*COMMON, "--output_dir", str(tmp_path), "--packing", "true",
                                         "--tokens_per_batch", "512", "--chunked_lm_loss", "true",
                                         "--layer_type", "intra_inter", "--q_bit", "4"])
    from hyclora.training import run as run_module

    original = run_module.PackedBatchCollator
    run_module.PackedBatchCollator = lambda *a, **k: Spy(original(*a, **k))
    try:
        metrics = run_finetune(args, tokenizer=tokenizer())
    finally:
        run_module.PackedBatchCollator = original
    assert len(metrics["loss_history"]) == 2 and all(loss == loss for _, loss in metrics["loss_history"])
    assert metrics["eval_loss"] == metrics["eval_loss"]  # evaluation ran on padded batches
    train_shapes = [s for s in seen if "cu_seq_lens_q" in s]
    assert train_shapes and all(s["input_ids"] == (2, 256) for s in train_shapes)
    assert len({tuple(sorted(s.items())) for s in train_shapes}) == 1  # one shape for every micro-batch


def test_example_flags_are_checked():
    from hyclora.training import parse_finetune_args
    from hyclora.training.run import _packed

    with pytest.raises(ValueError, match="drop --packing false"):
        parse_finetune_args("gsm8k", ["--packing", "false", "--tokens_per_batch", "512"])
    assert parse_finetune_args("gsm8k", ["--tokens_per_batch", "1024"]).data.packing is True
    args = parse_finetune_args("gsm8k", ["--packing", "true", "--tokens_per_batch", "300",
                                         "--per_device_train_batch_size", "2", "--max_length", "256"])
    with pytest.raises(ValueError, match="multiple of --per_device_train_batch_size 2"):
        args.data.packed_row_tokens(2)
    wiki = parse_finetune_args("wikitext2", ["--packing", "true"])
    with pytest.raises(ValueError, match="already full rows"):
        _packed(wiki, None, None, None)
