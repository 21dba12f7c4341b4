"""The fused LoRA forward is peft's function: same loss and gradients, dropout included; less saved."""
from __future__ import annotations

import pytest
import torch

from bench import reference
from job.fused_lora import fuse_lora
from job.loss import answer_loss_sum
from lora_helpers import ARCH, TARGETS, lora_examples, run_saved, train_lora_model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_equals_peft_loss_and_gradients(dropout, checkpointing):
    batch = reference.collate_padded(lora_examples(6, seed=3), pad_id=0)
    model = train_lora_model(dropout)
    want = run_saved(model, batch, checkpointing)
    assert fuse_lora(model) == 2 * len(TARGETS)
    got = run_saved(model, batch, checkpointing)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert len(got[1]) == len(want[1]) > 0
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    # The mask really is drawn: another seed gives another loss when there is dropout.
    torch.manual_seed(6)
    other = float(answer_loss_sum(model, batch).detach())
    assert (other != pytest.approx(got[0], rel=1e-6)) == (dropout > 0)


def test_fused_keeps_no_dropout_copy_for_backward():
    ex = lora_examples(6, seed=3)
    batch = reference.collate_padded(ex, pad_id=0)
    model = train_lora_model(0.3)
    peft_bytes = run_saved(model, batch, checkpointing=False)[2]
    fuse_lora(model)
    fused_bytes = run_saved(model, batch, checkpointing=False)[2]
    # peft keeps, per LoRA layer, dropout(x) (fp32 here) and its mask: one input-width copy each.
    tokens = batch["input_ids"].numel()
    widths = ARCH["num_hidden_layers"] * (5 * ARCH["hidden_size"] + ARCH["hidden_size"] + ARCH["intermediate_size"])
    dropout_copies = tokens * widths * 4  # the fp32 copies alone, masks not counted
    assert peft_bytes - fused_bytes >= dropout_copies, (peft_bytes, fused_bytes, dropout_copies)


def test_unusual_cases_take_peft_own_forward_and_unfuse_restores_it():
    batch = reference.collate_padded(lora_examples(3, seed=4), pad_id=0)
    model = train_lora_model(0.0)
    model.eval()
    with torch.no_grad():
        plain = model(**batch).logits
        with model.disable_adapter():
            base_only = model(**batch).logits
        fuse_lora(model)
        torch.testing.assert_close(model(**batch).logits, plain, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():  # adapters off: the fused op must not add the branch
            torch.testing.assert_close(model(**batch).logits, base_only)
    assert not torch.allclose(plain, base_only)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert all("forward" in m.__dict__ for m in layers)
    assert fuse_lora(model, enabled=False) == len(layers)
    assert not any("forward" in m.__dict__ for m in layers)


def test_fused_on_the_4bit_layer_equals_peft():
    pytest.importorskip("bitsandbytes")
    from transformers import Qwen2Config

    from job.model import PRESETS, build_random

    base = build_random(Qwen2Config(**dict(PRESETS["qwen2-tiny"], vocab_size=ARCH["vocab_size"])), torch.device("cpu"),
                        torch.float32, quantize=True, seed=0)
    model = train_lora_model(0.1, base=base)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    batch = reference.collate_padded(lora_examples(4, seed=5), pad_id=0)
    want = run_saved(model, batch, checkpointing=True)
    fuse_lora(model)
    got = run_saved(model, batch, checkpointing=True)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
