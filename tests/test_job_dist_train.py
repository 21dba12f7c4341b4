"""Data-parallel training on CPU: 2 gloo ranks under torchrun against one process at the same global
batch (per-step losses, adapter), SIGKILL on 2 ranks resumed on 1, rank 0 alone
writing the run's files. The smoke model, QLoRA (real bitsandbytes NF4 on CPU), DDP on the adapters."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from contracts import manifest
from contracts.config import load_config
from contracts.events import read_all
from job.prepare import prepare
from job.checkpoints import complete_checkpoints
from conftest import tiny_config
from ranks import kill_after_first_checkpoint, max_diff, run_train, step_losses


# micro-batch 4 on 35 training rows: 9 micro-batches an epoch, an odd count, so the 2-rank run's
# last step of each epoch has one rank with the blank filler batch (RankBatches).
CFG = tiny_config("tiny-dist")
def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    prepare("synthetic:44", root / "data", split="random", seed=1, cfg=load_config(cfg))
    n = sum(1 for _ in open(root / "data" / "train.jsonl"))
    assert n == 35 and -(-n // 4) % 2 == 1, n  # the odd micro-batch count the comment above relies on
    one = root / "one"
    r = run_train(1, cfg, root / "data", one)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, root / "data", one


@pytest.mark.slow
def test_two_gloo_ranks_train_what_one_process_trains(setup, tmp_path):
    cfg, data, one = setup
    two = tmp_path / "two"
    r = run_train(2, cfg, data, two)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    assert len(set(a.values())) > 6  # the losses move: the comparison is not of constants
    assert max_diff(_adapter(one), _adapter(two)) < 1e-5
    # Rank 0 alone wrote: one start, one event per step, one checkpoint event each, one done.
    events = read_all(two / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("done") == 1 and kinds.count("step") == 12
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4, 8, 12]
    assert r.stdout.count('"event":"done"') == 1  # the echo too: rank 1 prints no events
    assert [p.name for p in complete_checkpoints(two / "checkpoints")] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    # each rank's RNG state went into the checkpoint before it was marked complete and renamed
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (two / "checkpoints" / "checkpoint-12").iterdir()}
    assert manifest.verify(two) == []
    m = manifest.load(two)
    assert m["world_size"] == 2 and m["steps"] == 12 and manifest.load(one)["world_size"] == 1


@pytest.mark.slow
def test_sigkill_then_resume_on_another_world_size_ends_with_the_same_adapter(setup, tmp_path):
    # Killed on 2 ranks, resumed on 1: the step and the data position come from the checkpoint whatever the
    # world size (job/dist.py RankBatches splits the same global batches for any), so 1 -> 2 takes the same
    # path and is not run again (1 rank resumed on 1: tests/test_job_train.py).
    first, then = 2, 1
    cfg, data, one = setup
    out = tmp_path / "run"
    kill_after_first_checkpoint(first, cfg, data, out)
    at = int(complete_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert at < 12
    r = run_train(then, cfg, data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.load(out)
    assert m["resumed_from"] == f"checkpoint-{at}" and m["steps"] == 12 and m["world_size"] == then
    ref, got = step_losses(one), step_losses(out)
    assert max(abs(ref[s] - got[s]) for s in range(at + 1, 13)) < 1e-4
    assert max_diff(_adapter(one), _adapter(out)) < 1e-5
