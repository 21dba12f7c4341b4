"""Packing must not change what is learned: packed, padded and one-by-one batches give one loss."""
from __future__ import annotations

import pytest
import torch

from bench import reference
from job.batches import IGNORE_INDEX, PackedCollator, collate_packed, count_targets, pack_rows
from job.levers import Levers, set_attention, set_checkpointing
from job.model import causal_lm_of
from job.loss import answer_loss_sum
from lora_helpers import eval_lora_model, lora_examples, loss_and_grads


def test_packed_equals_padded_equals_one_by_one():
    model, ex = eval_lora_model(), lora_examples(13)
    one = [reference.collate_padded([e], pad_id=0) for e in ex]
    padded = [reference.collate_padded(ex[i:i + 4], pad_id=0) for i in range(0, len(ex), 4)]
    packed = reference.micro_batches(ex, 5, Levers(row_len=96), pad_id=0)
    assert sum(int((b["position_ids"] == 0).sum()) for b in packed) >= len(ex)
    assert any(int((b["position_ids"][r] == 0).sum()) > 1 for b in packed for r in range(len(b["input_ids"]))), \
        "the test must actually pack"

    ref, ref_g = loss_and_grads(model, one, answer_only=True)
    assert 5.0 < ref < 8.0  # ~ln(512) with random weights: a real loss, not zero
    for batches in (padded, packed):
        loss, grads = loss_and_grads(model, batches, answer_only=True)
        _assert_same(loss, grads, ref, ref_g)


def test_answer_only_loss_equals_stock_hf_loss():
    model, ex = eval_lora_model(), lora_examples(6, seed=3)
    batch = [reference.collate_padded(ex, pad_id=0)]
    a, ga = loss_and_grads(model, batch, answer_only=True)
    b, gb = loss_and_grads(model, batch, answer_only=False)
    _assert_same(a, ga, b, gb)


def _assert_same(loss, grads, ref_loss, ref_grads):
    """Same loss to 1e-4 and the same gradients (atol 1e-5, rtol 1e-4)."""
    assert loss == pytest.approx(ref_loss, abs=1e-4)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_packing_does_not_leak_across_sequences():
    # Changing one sequence must not change another's loss when they share a packed row.
    model, ex = eval_lora_model(), lora_examples(2, seed=5)
    rows = [[0, 1]]
    base = collate_packed(ex, rows, pad_id=0)
    alone = reference.collate_padded([ex[1]], pad_id=0)
    changed = [dict(e) for e in ex]
    changed[0] = {"input_ids": [7] * len(ex[0]["input_ids"]), "labels": ex[0]["labels"]}
    other = collate_packed(changed, rows, pad_id=0)
    with torch.no_grad():
        l_alone = float(answer_loss_sum(model, alone))
        # Sequence 1's share of the packed loss: mask out sequence 0's targets.
        for b in (base, other):
            b["labels"][0, : len(ex[0]["input_ids"])] = IGNORE_INDEX
            assert float(answer_loss_sum(model, b)) == pytest.approx(l_alone, abs=1e-4)


def test_pack_rows_fits_every_sequence_once():
    lengths = [300, 250, 500, 120, 90, 2000, 60, 700]
    rows = pack_rows(lengths, row_len=1024)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))
    cap = max(1024, max(lengths))
    assert all(sum(lengths[i] for i in r) <= cap for r in rows)
    # The cap grows to the longest (2000): 2000 | 700+500+300+250+120+90 | 60.
    assert [sorted(lengths[i] for i in r) for r in rows] == [[2000], [90, 120, 250, 300, 500, 700], [60]]


def test_step_checkpointing_and_frozen_cast():
    model = eval_lora_model()
    assert set_checkpointing(model, True, layers=1) == 1
    blocks = causal_lm_of(model).model.layers
    assert [b.gradient_checkpointing for b in blocks] == [True, False]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ex = lora_examples(8, seed=7)
    batches = reference.micro_batches(ex, 4, Levers(row_len=128), pad_id=0)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss = reference.step(model, opt, batches, Levers(liger=False), device="cpu", dtype=torch.float32)
    assert 5.0 < loss < 8.0
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    n = reference.frozen_to(model, torch.bfloat16)
    assert n > 0 and causal_lm_of(model).lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_packed_collator_reads_trl_completion_mask():
    ex = lora_examples(3, seed=9)
    feats = [{"input_ids": e["input_ids"], "completion_mask": [int(y != IGNORE_INDEX) for y in e["labels"]]}
             for e in ex]
    a = PackedCollator(pad_id=0, row_len=256)(feats)
    b = PackedCollator(pad_id=0, row_len=256)(ex)
    assert a["input_ids"].shape[0] == 1  # all three fit one row
    for k in ("input_ids", "position_ids", "labels"):
        assert torch.equal(a[k], b[k])
    assert count_targets(a) == sum(y != IGNORE_INDEX for e in ex for y in e["labels"])


@pytest.mark.slow  # flex_attention compiles its block mask: ~12 s on 2 cores
def test_flex_attention_packed_rows_give_the_sdpa_loss():
    # flex_attention (the CUDA default) on fixed-width packed rows: same loss as sdpa (forward only:
    # flex has no CPU backward). Its compile makes this the slowest test here (~30 s on 2 cores).
    model, ex = eval_lora_model(), lora_examples(9, seed=2)
    sdpa = reference.micro_batches(ex, 9, Levers(row_len=128), pad_id=0)[0]
    flex = reference.micro_batches(ex, 9, Levers(row_len=128, attn_implementation="flex_attention"), pad_id=0)[0]
    assert flex["input_ids"].shape[1] == 128 > sdpa["input_ids"].shape[1]  # fixed width: one compile
    with torch.no_grad():
        want = float(answer_loss_sum(model, sdpa))
        set_attention(model, "flex_attention")
        got = float(answer_loss_sum(model, flex))
    assert got == pytest.approx(want, abs=1e-4)
