"""Data-parallel training on CPU: 2 gloo ranks under torchrun against one process at the same global
batch (per-step losses, adapter), SIGKILL of one world size resumed with the other, rank 0 alone
writing the run's files. The smoke model, QLoRA (real bitsandbytes NF4 on CPU), DDP on the adapters."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from contracts import manifest
from contracts.config import load_config
from contracts.events import read_all
from job.prepare import prepare
from job.train import complete_checkpoints
from conftest import REPO


# micro-batch 4 on 35 training rows: 9 micro-batches an epoch, an odd count, so the 2-rank run's
# last step of each epoch has one rank with the blank filler batch (RankBatches).
CFG = {
    "name": "tiny-dist", "allow_cpu": True,
    "model": {"id": "tiny", "init": "random", "tokenizer": "qwen2.5-offline",
              "arch": {"preset": "qwen2-tiny", "initializer_range": 0.25}},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "train": {"method": "qlora", "epochs": 3, "global_batch": 8, "micro_batch": 4, "lr": 1.0e-2, "optim": "adamw_torch",
              "precision": "fp32", "max_length": 512, "packing": True, "gradient_checkpointing": False,
              "checkpoint_every": 4, "keep_checkpoints": 3, "max_steps": 12, "seed": 5},
    "data": {"source": "synthetic:44", "split": "random", "seed": 1},
}
ENV = {"OMP_NUM_THREADS": "1", "SOCRATES_CPU_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(ranks: int, *args: str) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "job", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "job", *args]


def _train(ranks: int, cfg: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(ranks, "train", "--config", str(cfg), "--data", str(data), "--out", str(out)), cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **ENV}, timeout=240)


def _losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_all(out / "events.jsonl") if e["event"] == "step"}


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    prepare("synthetic:44", root / "data", split="random", seed=1, cfg=load_config(cfg))
    n = sum(1 for _ in open(root / "data" / "train.jsonl"))
    assert n == 35 and -(-n // 4) % 2 == 1, n  # the odd micro-batch count the comment above relies on
    one = root / "one"
    r = _train(1, cfg, root / "data", one)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, root / "data", one


@pytest.mark.slow
def test_two_gloo_ranks_train_what_one_process_trains(setup, tmp_path):
    cfg, data, one = setup
    two = tmp_path / "two"
    r = _train(2, cfg, data, two)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    assert len(set(a.values())) > 6  # the losses move: the comparison is not of constants
    assert _max_diff(_adapter(one), _adapter(two)) < 1e-5
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


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every rank (torchrun starts its workers in their own process groups)."""
    import psutil

    procs = psutil.Process(pid).children(recursive=True)
    os.kill(pid, signal.SIGKILL)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _kill_after_first_checkpoint(ranks: int, cfg: Path, data: Path, out: Path) -> None:
    proc = subprocess.Popen(_cmd(ranks, "train", "--config", str(cfg), "--data", str(data), "--out", str(out)), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ENV},
                            start_new_session=True)
    deadline = time.time() + 200
    killed = False
    while proc.poll() is None and time.time() < deadline:
        if (out / "events.jsonl").is_file() and any(e["event"] == "checkpoint" for e in read_all(out / "events.jsonl")):
            _kill_tree(proc.pid)
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed, "the run ended (or never checkpointed) before it could be killed"
    assert not (out / "manifest.json").exists()
    assert complete_checkpoints(out / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_sigkill_then_resume_on_another_world_size_ends_with_the_same_adapter(setup, tmp_path, first, then):
    cfg, data, one = setup
    out = tmp_path / "run"
    _kill_after_first_checkpoint(first, cfg, data, out)
    at = int(complete_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert at < 12
    r = _train(then, cfg, data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.load(out)
    assert m["resumed_from"] == f"checkpoint-{at}" and m["steps"] == 12 and m["world_size"] == then
    ref, got = _losses(one), _losses(out)
    assert max(abs(ref[s] - got[s]) for s in range(at + 1, 13)) < 1e-4
    assert _max_diff(_adapter(one), _adapter(out)) < 1e-5
