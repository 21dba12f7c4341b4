"""The real job (`python -m job VERB ...`) as one process or N gloo ranks under torchrun, on CPU, and
what two runs wrote compared: the shared helpers of the distributed tests (test_job_dist_train.py,
test_full_train.py, test_job_dist_eval.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO
from contracts.events import read_all
from job.checkpoints import complete_checkpoints
from ports import free_port

# ranks x threads within the CI's 2 cores; the events on stdout as @@socrates-event lines, as the run block has them
CPU_ENV = {"OMP_NUM_THREADS": "1", "SOCRATES_CPU_THREADS": "1", "SOCRATES_EVENT_LINES": "1"}


def job_cmd(ranks: int, *args: str) -> list[str]:
    """`python -m job ARGS` as one process (ranks 1) or under torchrun with `ranks` local ranks."""
    if ranks == 1:
        return [sys.executable, "-m", "job", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "job", *args]


def job_env(**extra: str) -> dict:
    return {**os.environ, **CPU_ENV, **extra}


def run_job(ranks: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(job_cmd(ranks, *args), cwd=REPO, capture_output=True, text=True, env=job_env(), timeout=timeout)


def train_args(cfg: Path, data: Path, out: Path) -> tuple[str, ...]:
    return ("train", "--config", str(cfg), "--data", str(data), "--out", str(out))


def run_train(ranks: int, cfg: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    return run_job(ranks, *train_args(cfg, data, out))


def step_losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_all(out / "events.jsonl") if e["event"] == "step"}


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun (or the one process) and every rank (torchrun starts its workers in their own
    process groups): nothing gets to clean up."""
    import psutil

    procs = psutil.Process(pid).children(recursive=True)
    os.kill(pid, signal.SIGKILL)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def kill_after_first_checkpoint(ranks: int, cfg: Path, data: Path, out: Path) -> None:
    """Train on `ranks` ranks and SIGKILL the lot once the first checkpoint event is written; the run
    must have been killed (not ended) and left a complete checkpoint and no manifest."""
    proc = subprocess.Popen(job_cmd(ranks, *train_args(cfg, data, out)), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=job_env(), start_new_session=True)
    deadline = time.time() + 200
    killed = False
    while proc.poll() is None and time.time() < deadline:
        if (out / "events.jsonl").is_file() and any(e["event"] == "checkpoint" for e in read_all(out / "events.jsonl")):
            kill_tree(proc.pid)
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed, "the run ended (or never checkpointed) before it could be killed"
    assert not (out / "manifest.json").exists()
    assert complete_checkpoints(out / "checkpoints")
