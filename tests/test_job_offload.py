"""Checkpoint inputs parked in host memory: same loss and gradients, every layer's input moved once
and brought back ahead of its turn (the CPU runs the same bookkeeping with plain copies)."""
from __future__ import annotations

import pytest
import torch

from bench import reference
from job.levers import Levers, set_checkpointing
from job.model import causal_lm_of
from job.offload import HostOffload, install
from lora_helpers import ARCH, lora_examples, run_saved, train_lora_model

pytest.importorskip("peft")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_checkpoints_give_the_same_gradients(dropout):
    batches = reference.micro_batches(lora_examples(9, seed=7), 3, Levers(row_len=128), pad_id=0)
    model = train_lora_model(dropout)
    want = [run_saved(model, b, checkpointing=True)[:2] for b in batches]

    blocks = causal_lm_of(model).model.layers
    offload = install(blocks, HostOffload(min_bytes=0, copy_cpu=True))  # what set_checkpointing(offload=True) installs
    got = []
    for b in batches:
        set_checkpointing(model, True)  # re-enabling resets the layers' checkpoint function...
        install(blocks, offload)             # ...so install again, as set_checkpointing(offload=True) does last
        got.append(run_saved(model, b, checkpointing=None)[:2])
    for (wl, wg), (gl, gg) in zip(want, got):
        assert gl == pytest.approx(wl, rel=1e-6)
        for g, w in zip(gg, wg):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    layers = ARCH["num_hidden_layers"]
    # One saved input per checkpointed layer per micro-batch; all but the first layer's brought back
    # by the layer after it (the first one backward reaches has nobody after it to prefetch for it).
    assert offload.stats["packed"] == layers * len(batches)
    assert offload.stats["prefetched"] == (layers - 1) * len(batches)


def test_set_checkpointing_installs_the_offload_and_small_tensors_stay():
    model = train_lora_model(0.0)
    assert set_checkpointing(model, True, 1, offload=True) == 1
    blocks = causal_lm_of(model).model.layers
    funcs = {id(getattr(b._gradient_checkpointing_func, "keywords", {}).get("offload")) for b in blocks}
    assert len(funcs) == 1 and None not in {getattr(b._gradient_checkpointing_func, "keywords", {}).get("offload") for b in blocks}
    small, big = torch.ones(4), torch.ones(1 << 19)
    off = HostOffload(min_bytes=1 << 20, copy_cpu=True)
    assert off.pack(small) is small and off.unpack(small) is small and off.stats["packed"] == 0
    assert off.pack(big) is not big and off.stats["packed"] == 1
    assert HostOffload().pack(big) is big  # a CPU run keeps its tensors where they are
