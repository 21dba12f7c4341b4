"""The levers wired into TRL's SFTTrainer (job/sft.py, what job/train.py runs) give the gradient bench/reference.py's step gives."""
from __future__ import annotations

import pytest
import torch

from contracts.config import RunConfig, TrainSpec
from contracts.events import EventWriter
from bench import reference
from job import sft
from job.batches import PackedCollator, count_targets
from job.levers import levers_for
from job.loss import answer_loss_sum
from lora_helpers import eval_lora_model, lora_examples

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _trainer(model, ex, tmp_path, spec):
    """The trainer job/train.py builds (job/sft.py), its levers switched on in `model`."""
    ds = datasets.Dataset.from_dict({"input_ids": [e["input_ids"] for e in ex], "labels": [e["labels"] for e in ex]})
    cfg = RunConfig(train=spec)
    trainer, _ = sft.build(cfg, model, _Tok(), ds, tmp_path / "checkpoints", total_steps=1, world=1,
                           device=torch.device("cpu"), events=EventWriter(tmp_path / "events.jsonl"), run_fp={})
    return trainer


def _Tok():
    """A word-level tokenizer: SFTTrainer wants one, the dataset is already tokenized."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 512)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def test_sft_trainer_with_levers_matches_fast_step(tmp_path):
    ex = lora_examples(8, seed=11)
    mb, accum = 4, 2
    spec = TrainSpec(micro_batch=mb, global_batch=mb * accum, max_length=128, gradient_checkpointing=False)

    ref = eval_lora_model()
    lv = levers_for(spec, "cpu")
    assert lv.attn_implementation == "sdpa" and lv.row_len == 128 and lv.packing
    batches = reference.micro_batches(ex, mb, lv, pad_id=0)
    total = sum(count_targets(b) for b in batches)
    for b in batches:
        (answer_loss_sum(ref, b) / total).backward()
    want = [p.grad for p in ref.parameters() if p.requires_grad]

    model = eval_lora_model()
    trainer = _trainer(model, ex, tmp_path, spec)
    assert isinstance(trainer.data_collator, PackedCollator) and trainer.data_collator.row_len == lv.row_len
    loader = trainer.get_train_dataloader()
    trainer.model.train()
    seen = list(loader)
    # The Trainer's sampler shuffles: compare against the same sequences in the same micro-batches.
    n = sum(count_targets(b) for b in seen)
    ref.zero_grad(set_to_none=True)
    for b in seen:
        (answer_loss_sum(ref, b) / n).backward()
    want = [p.grad.clone() for p in ref.parameters() if p.requires_grad]
    trainer.current_gradient_accumulation_steps = accum
    for b in seen:
        trainer.training_step(trainer.model, b, num_items_in_batch=torch.tensor(n))
    got = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_loss_is_scaled_like_trainer_under_ddp(tmp_path):
    # With several processes the token count is global and DDP averages: the loss is scaled back up.
    from types import SimpleNamespace

    ex = lora_examples(4, seed=13)
    spec = TrainSpec(micro_batch=4, global_batch=4, max_length=128, gradient_checkpointing=False)
    model = eval_lora_model()
    trainer = _trainer(model, ex, tmp_path, spec)
    batch = PackedCollator(0, 128)(ex)
    n = torch.tensor(count_targets(batch))
    one = float(trainer.compute_loss(model, batch, num_items_in_batch=n))
    trainer.args.average_tokens_across_devices = True
    trainer.accelerator = SimpleNamespace(num_processes=2)
    assert float(trainer.compute_loss(model, batch, num_items_in_batch=n)) == pytest.approx(2 * one, rel=1e-6)
