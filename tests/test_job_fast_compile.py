"""Regional torch.compile (TrainSpec.compile): same loss and gradients as eager, and a validated switch."""
from __future__ import annotations

import shutil

import pytest
import torch

from contracts.config import RunConfig
from contracts.errors import ContractError
from bench import reference
from job.levers import Levers, levers_for, set_checkpointing, set_compile
from job.model import causal_lm_of
from lora_helpers import eval_lora_model, lora_examples, loss_and_grads


def test_compile_switch_is_validated_and_reaches_the_levers():
    assert RunConfig().train.compile is False and levers_for(RunConfig().train, "cuda").compile is False
    cfg = RunConfig().with_overrides({"train.compile": True})
    assert levers_for(cfg.train, "cpu").compile is True
    with pytest.raises(ContractError) as e:
        RunConfig().with_overrides({"train.compile": "yes"})
    assert "train.compile" in str(e.value) and "true or false" in str(e.value) and "\n" not in str(e.value)


def test_set_compile_wraps_every_layer_and_undoes_it():
    model = eval_lora_model()
    layers = causal_lm_of(model).model.layers
    assert set_compile(model, True) == len(layers)
    assert all(b._compiled_call_impl is not None for b in layers)
    assert set_compile(model, False) == 0
    assert all(b._compiled_call_impl is None for b in layers)


@pytest.mark.slow  # torch.compile's CPU backend compiles C++: 30-60 s on 2 cores
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile's CPU backend needs a C compiler")
def test_compiled_layers_give_eager_loss_and_grads():
    ex = lora_examples(12, seed=5)
    lv = Levers(row_len=128, attn_implementation="sdpa", liger=False)
    batches = reference.micro_batches(ex, 6, lv, pad_id=0)  # two micro-batches of different row counts/widths
    want_loss, want = loss_and_grads(eval_lora_model(), batches, answer_only=True)

    model = eval_lora_model()
    set_checkpointing(model, True)  # as the job runs it: checkpoint wrapper outside the compiled layer
    model.train()
    for m in model.modules():  # train() for checkpointing; dropout is 0 in eval_lora_model, so still exact
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    set_compile(model, True)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        got_loss, got = loss_and_grads(model, batches, answer_only=True)
    finally:
        set_compile(model, False)
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] >= 1  # the layers really ran compiled, not eager
    assert abs(got_loss - want_loss) < 1e-4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)
