"""Shared by every test module (`from conftest import REPO, SHARED, REAL_SAMPLE, needs_real_sample,
run_cli, one_line, wait_until, tiny_config, random_adapter`), and the
`sky_home` fixture (an offline SkyPilot API server with a seeded catalog, tests/skyfix.py).

The repository root is on sys.path, so tests import the benchmarks' references (bench/reference.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from skyfix import sky_home, stop_shared  # noqa: E402,F401  (sky_home re-exported for every test module)

import pytest  # noqa: E402

# Under pytest-xdist every worker's torch (and the jobs its tests start) uses one thread: three workers on two
# cores with two threads each spent their time waiting on each other, not computing.
if os.environ.get("PYTEST_XDIST_WORKER") is not None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# ../shared beside the checkout, or the folder SOCRATES_SHARED names: the one way tests find it.
SHARED = Path(os.environ.get("SOCRATES_SHARED") or REPO.parent / "shared")
REAL_SAMPLE = SHARED / "fixtures" / "socsci210_real_sample.jsonl"
needs_real_sample = pytest.mark.skipif(not REAL_SAMPLE.is_file(),
                                       reason=f"{REAL_SAMPLE} absent (set SOCRATES_SHARED to a folder holding fixtures/)")

T = TypeVar("T")


# The modules whose slow tests take longest on 2 cores (minutes each), longest first (`make test --durations`,
# per module): handed out first of all.
LONGEST = ("test_rehearsal", "test_managed_jobs", "test_full_train", "test_launcher_firsthour", "test_job_train",
           "test_job_dist_train", "test_ssh_e2e", "test_readme_commands", "test_job_dist_eval", "test_job_evaluate",
           "test_bench_scale", "test_package", "test_launcher_scale", "test_job_deadline")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reports the collected order
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 3 --dist loadscope`: each module on one worker, so a module-scoped
    fixture is made once and its tests run in file order): the modules with tests marked slow handed out first,
    LONGEST first of all, so the longest (the rehearsal, the managed runs) start at once instead of ending the
    run last. (`--dist loadgroup` is not used: with pytest 9.2, xdist 3.8's group suffix on the node id has no
    effect, so its groups were silently ignored.)"""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return

    def order(item):  # stable sort: file order kept within each rank
        module = item.module.__name__
        return (item.get_closest_marker("slow") is None,
                LONGEST.index(module) if module in LONGEST else len(LONGEST))

    items.sort(key=order)


def pytest_sessionfinish(session):
    """The xdist controller stops the SkyPilot API server its workers shared (tests/skyfix.py)."""
    if not hasattr(session.config, "workerinput") and hasattr(session.config, "_tmp_path_factory"):
        stop_shared(session.config._tmp_path_factory.getbasetemp())


def run_cli(args: list[str], env: dict | None = None, *, module: str = "launcher", cwd: Path = REPO,
            timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` (the launcher's CLI by default, or `job`) in a subprocess, text output
    captured; `kw` goes to subprocess.run (input=..., stdout=...)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def one_line(r: subprocess.CompletedProcess, *needles: str, rc: int | None = 2, both: bool = False) -> str:
    """The project's bad-input rule: exit `rc` (None: any), exactly one non-blank line on stderr (`both`:
    on stdout and stderr together) holding every needle, and no traceback. Returns that line."""
    text = (r.stdout or "") + (r.stderr or "") if both else (r.stderr or "")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    shown = (r.returncode, (r.stdout or "")[-2000:], (r.stderr or "")[-2000:])
    assert "Traceback" not in (r.stderr or ""), shown
    assert rc is None or r.returncode == rc, shown
    assert len(lines) == 1, shown
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def wait_until(condition: Callable[[], T], timeout: float = 30, interval: float = 0.05,
               what: str = "the condition") -> T:
    """Poll `condition` until it returns something truthy (returned) or `timeout` seconds pass
    (AssertionError naming `what`): how a test waits for another process, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


TINY_CONFIG = {
    "allow_cpu": True,
    "model": {"id": "tiny", "init": "random", "tokenizer": "qwen2.5-offline",
              "arch": {"preset": "qwen2-tiny", "initializer_range": 0.25}},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "train": {"method": "qlora", "epochs": 3, "global_batch": 8, "micro_batch": 4, "lr": 1.0e-2, "optim": "adamw_torch",
              "precision": "fp32", "max_length": 512, "packing": True, "gradient_checkpointing": False,
              "checkpoint_every": 4, "keep_checkpoints": 3, "max_steps": 12, "seed": 5},
    "data": {"source": "synthetic:44", "split": "random", "seed": 1},
}


def tiny_config(name: str, **sections: dict | None) -> dict:
    """The run config the CPU training tests share (a tiny random Qwen2, real QLoRA with NF4 on the CPU, a
    loss that falls in a few steps), named `name`: each of `sections` updates that section key by key
    (train={"max_steps": 6}); None leaves the section out (lora=None for a full fine-tune)."""
    import copy

    cfg = {"name": name, **copy.deepcopy(TINY_CONFIG)}
    for key, update in sections.items():
        if update is None:
            cfg.pop(key, None)
        else:
            cfg[key] = {**cfg.get(key, {}), **update}
    return cfg


def short_smoke(tmp: Path, **sections: dict) -> Path:
    """configs/smoke.yaml with each of `sections` updated key by key (train={"max_steps": 4}), written to
    tmp/short.yaml: for tests about the launcher, SSH or torchrun, not the training; its path."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    for key, update in sections.items():
        cfg[key] = {**cfg.get(key, {}), **update}
    path = tmp / "short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def random_adapter(cfg, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter on `cfg`'s base (built on the CPU as train builds it) whose B matrices are random
    (peft starts them at zero: this adapter changes the model), saved to `out`; returns `out`."""
    import torch

    from job import model as JM
    from job.tokenizer import load_tokenizer

    model = JM.build(cfg, load_tokenizer(cfg.model.tokenizer, cfg.model.id), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out)
    return out
