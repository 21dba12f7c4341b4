"""The rehearsal (`make rehearse`; also part of `make test`): the task `up --dryrun` renders, run the way
SkyPilot runs it on simulated fresh nodes (tests/rehearsal.py says what is real and what stands in).

One node: setup installs the real lock into the job's venv, the run block trains, evaluates and writes
a tree the launcher's own verification accepts, the adapter loads with PEFT, no secret value lands in
what comes back. Two nodes: torchrun forms the group across the two run blocks and the adapter equals
the one-node run's. A managed run: killed after its first checkpoint, started again on a fresh node (the
bucket its only link to the first), it resumes and keeps the first start's deadline. Only the one-node test
installs the lock into an empty HOME; the later nodes get that venv before their setup runs (Node.seed_venv).
The image path: the Dockerfile's install steps as a script into a fresh venv, then the job's CLI with it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, wait_until
from launcher_helpers import cli
from ports import free_port
from rehearsal import (Node, Task, alive, bootstrap_uv, find_python, kill_tree, network_env, run_envs, setup_envs,
                       tail, wait)

pytestmark = [pytest.mark.slow, pytest.mark.sky]

# A CPU config: the tiny Qwen2 is made on the spot (random init); the real QLoRA path (NF4 on the CPU).
CFG = tiny_config("rehearsal", train={"epochs": 1, "checkpoint_every": 2, "keep_checkpoints": 2, "max_steps": 6},
                  data={"source": "synthetic:60"}, eval={"mode": "sample", "rows": 8})
MANAGED_CFG = {**CFG, "train": {**CFG["train"], "epochs": 4, "max_steps": 24}}  # 48 rows, batch 8: 6 steps an epoch
SECRET = "rehearsal-canary-7f3a91"  # HF_TOKEN's value: it must reach the job's environment and nothing else
SETUP_S, RUN_S = 900, 900


@pytest.fixture(scope="module")
def pythons(tmp_path_factory):
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (SkyPilot's workdir sync; `make sysdeps` installs it)")
    old, job = find_python("3.10"), find_python("3.12")
    if old is None or job is None:
        pytest.skip("the rehearsal needs CPython 3.10 (the node's python3) and 3.12 (the lock's, which uv "
                    "would download on the cloud) on this machine")
    uv = bootstrap_uv(tmp_path_factory.mktemp("uv"))
    return {"old": old, "job": job, "uv": uv}


def render(sky_home, tmp: Path, *argv: str, config: dict = CFG) -> tuple[Task, str]:
    """`up ... --dryrun --save-task` as a user runs it, the task parsed by SkyPilot; also the dry run's output."""
    cfg = tmp / "rehearsal.yaml"
    cfg.write_text(yaml.safe_dump(config))
    saved = tmp / "task.yaml"
    env = {**sky_home.env, "HF_TOKEN": SECRET, "SOCRATES_RUNS_DIR": str(tmp / "runs")}
    r = cli(["up", "--config", str(cfg), *argv, "--dryrun", "--yes", "--save-task", str(saved)], env, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = saved.read_text()
    assert SECRET not in text and SECRET not in r.stdout + r.stderr
    assert text.strip() in r.stdout.replace("\r", ""), "the saved task is not the one the dry run shows"
    return Task.from_file(saved, {"HF_TOKEN": SECRET}), r.stdout


def provision(root: Path, task: Task, pythons: dict, ips: list[str], rank: int = 0, venv_from: Node | None = None) -> Node:
    """A fresh node of `ips` (SkyPilot's user env made), the workdir synced and both blocks' scripts written;
    `venv_from`: with that node's job venv already there (Node.seed_venv: setup then finds the lock satisfied)."""
    node = Node(root / f"node{rank}", rank=rank)
    node.provision(pythons["old"], pythons["job"], pythons["uv"])
    if venv_from is not None:
        node.seed_venv(venv_from)
    node.receive(task.workdir, {"setup": (task.setup, setup_envs(task, rank, ips, gpus=1)),
                                "run": (task.run, run_envs(task, rank, ips, gpus=1))})
    return node


def setup(node: Node) -> subprocess.Popen:
    return node.block("setup", node.root / "setup.log", SETUP_S)


def run(node: Node, **extra: str) -> subprocess.Popen:
    return node.block("run", node.root / "run.log", RUN_S, extra_env=extra)


def ok(proc: subprocess.Popen, node: Node, kind: str, timeout: float) -> None:
    rc = wait(proc, timeout)
    assert rc == 0, f"{kind} on node {node.rank} exited {rc}:\n{tail(node.root / f'{kind}.log', 60)}"


def verify_out(out: Path) -> dict:
    """The launcher's own verification of a pulled tree, then PEFT loading the adapter."""
    from contracts import manifest as manifest_lib
    from launcher.registry import RESERVED

    manifest = manifest_lib.verify_or_raise(out, tree=True, reserved=RESERVED)
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from contracts.config import from_dict
    from job import model as JM
    from job.tokenizer import load_tokenizer

    cfg = from_dict(CFG)
    tok = load_tokenizer(cfg.model.tokenizer, cfg.model.id)
    base = JM.build_base(cfg, tok, torch.device("cpu"))
    peft = PeftModel.from_pretrained(base, str(out / "adapter"))
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    state = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    some = next(k for k in saved if "lora_B" in k)
    loaded = next(v for k, v in state.items() if k.replace(".default", "").endswith(some.split("base_model.model.", 1)[-1]))
    assert torch.equal(loaded.cpu(), saved[some]), "the adapter PEFT loaded is not the one on disk"
    assert float(saved[some].abs().max()) > 0, "lora_B is all zeros: nothing was trained"
    return manifest


def no_secret_in(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert SECRET.encode() not in p.read_bytes(), f"{p} holds the secret's value"


# --- one node ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_node(sky_home, pythons, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    task, shown = render(sky_home, tmp, "--gpu", "A100:1")
    node = provision(tmp, task, pythons, ["127.0.0.1"])
    started = time.monotonic()
    ok(setup(node), node, "setup", SETUP_S)
    setup_s = time.monotonic() - started
    ok(run(node), node, "run", RUN_S)
    return {"task": task, "node": node, "out": node.workdir / task.envs["OUT"], "setup_s": setup_s, "shown": shown}


def test_setup_builds_the_jobs_venv_from_the_lock_and_leaves_the_nodes_python_alone(one_node, pythons):
    node = one_node["node"]
    venv_py = node.home / "socrates-venv" / "bin" / "python"
    # (setup's last line, job.stack, imported every package of the lock with it: the log line asserted below)
    probe = subprocess.run([str(venv_py), "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, env=node.env(), timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() == "(3, 12)", probe.stderr[-2000:]
    # The node's own python3 (SkyPilot's user env) got none of the lock: no torch, no transformers.
    user_py = node.home / "sky-user-env" / "bin" / "python"
    for name in ("torch", "transformers", "uv"):
        r = subprocess.run([str(user_py), "-c", f"import {name}"], capture_output=True, text=True, env=node.env())
        assert r.returncode != 0, f"the node's python3 can import {name}: setup installed into it"
    log = (node.root / "setup.log").read_text()
    assert "setup: the job's stack imports in" in log and str(venv_py.parent) in log


def test_the_run_block_trains_evaluates_and_the_launcher_verifies_what_it_wrote(one_node):
    out = one_node["out"]
    manifest = verify_out(out)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("step") == 6 and kinds.count("done") == 1
    assert (out / "eval" / "metrics.json").exists()
    listed = {e["path"] for e in manifest["files"]}
    assert "eval/metrics.json" in listed, "the run block's EXIT trap did not list the evaluation"
    log = (one_node["node"].root / "run.log").read_text()
    assert "speed levers:" in log  # job check ran with the job's python
    no_secret_in(out)
    no_secret_in(one_node["node"].root / "run.log")


def test_the_secret_reaches_the_jobs_environment(one_node):
    # The run block exports it (SkyPilot passes secrets as envs); the job's process sees it.
    script = next(one_node["node"].root.glob("sky_run_0.sh")).read_text()
    assert re.search(r"^export HF_TOKEN=", script, re.M)


# --- two nodes ----------------------------------------------------------------------------------

def test_two_nodes_form_one_torchrun_group_and_train_what_one_node_trains(sky_home, pythons, one_node, tmp_path):
    # --no-eval: evaluation under torchrun through this run block is tests/test_launcher_scale.py's (2 ranks)
    task, _ = render(sky_home, tmp_path, "--gpu", "A100:1", "--nodes", "2", "--no-eval")
    assert task.num_nodes == 2
    ips = ["127.0.0.1", "127.0.0.1"]
    # Each node's setup runs; the venv the one-node test installed from the lock is on both already.
    nodes = [provision(tmp_path, task, pythons, ips, rank, venv_from=one_node["node"]) for rank in (0, 1)]
    for proc, node in [(setup(n), n) for n in nodes]:
        ok(proc, node, "setup", SETUP_S)
    port = str(free_port())  # both nodes on one host: a free rendezvous port instead of the default 29500
    procs = [run(n, MASTER_PORT=port, OMP_NUM_THREADS="1") for n in nodes]
    for proc, node in zip(procs, nodes):
        ok(proc, node, "run", RUN_S)
    for node in nodes:
        assert "torchrun: 2 node(s) x 1 rank(s)" in (node.root / "run.log").read_text()
    out0 = nodes[0].workdir / task.envs["OUT"]
    verify_out(out0)
    from safetensors.torch import load_file

    from ranks import max_diff, step_losses

    one, two = one_node["out"], out0
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    assert max_diff(load_file(one / "adapter" / "adapter_model.safetensors"),
                    load_file(two / "adapter" / "adapter_model.safetensors")) < 1e-5


# --- a managed run --------------------------------------------------------------------------------

def test_a_managed_run_killed_after_its_first_checkpoint_resumes_on_a_fresh_node_with_the_same_deadline(
        sky_home, pythons, one_node, tmp_path):
    from launcher.task import BUCKET_MOUNT

    # Steps take ~0.15 s on the CPU: 24 of them leave seconds of training after the first checkpoint for the kill.
    task, _ = render(sky_home, tmp_path, "--gpu", "A100-80GB:1", "--spot", "--max-hours", "2", "--no-eval",
                     config=MANAGED_CFG)
    assert task.envs["SOCRATES_MANAGED"] == "1" and task.envs["OUT"].startswith(BUCKET_MOUNT + "/")
    bucket = tmp_path / "bucket"  # stands for the bucket SkyPilot mounts (rclone) on every node
    for k, v in list(task.envs.items()):
        if isinstance(v, str) and v.startswith(BUCKET_MOUNT):
            task.envs[k] = str(bucket) + v[len(BUCKET_MOUNT):]
    out = Path(task.envs["OUT"])
    state = out.parent / "managed" / "launches.json"

    # Fresh nodes but for the job's venv (the one-node test's, installed from the lock): the second has none of
    # the first's files, only the bucket.
    first = provision(tmp_path / "launch1", task, pythons, ["127.0.0.1"], venv_from=one_node["node"])
    ok(setup(first), first, "setup", SETUP_S)
    proc = run(first)
    try:
        wait_until(lambda: any((out / "checkpoints").glob("checkpoint-*/COMPLETE")), timeout=RUN_S,
                   what="the first complete checkpoint in the bucket")
    finally:
        killed = kill_tree(proc)  # the preemption: the machine ends, nothing on it gets to clean up
    assert len(killed) > 2, killed  # bash, job.deadline, the job (at least)
    deadline_1 = json.loads(state.read_text())["deadline"]
    wait_until(lambda: not any(map(alive, killed)), timeout=30, what="every process of the killed node gone")
    before = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert not (out / "adapter").exists() and not any(e["event"] == "done" for e in before)
    last_step = max(e["step"] for e in before if e["event"] == "step")

    second = provision(tmp_path / "launch2", task, pythons, ["127.0.0.1"], venv_from=one_node["node"])
    ok(setup(second), second, "setup", SETUP_S)
    ok(run(second), second, "run", RUN_S)
    record = json.loads(state.read_text())
    t0_1, t0_2 = (int((n.workdir / ".socrates-t0").read_text()) for n in (first, second))
    assert t0_2 > t0_1  # the relaunch's setup started later (it ran setup again)
    cap_s = int(task.envs["DEADLINE_S"])  # --max-hours 2 less what the launcher keeps for the pull and teardown
    assert 0 < cap_s <= 2 * 3600
    assert record["launches"] == 2 and record["deadline"] == deadline_1 == t0_1 + cap_s, \
        "the relaunch took a deadline from its own start"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[:len(before)] == before, "the first machine's job wrote on after it was killed"
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed and 2 <= resumed[-1]["step"] <= last_step < 24
    after = [e["step"] for e in events[len(before):] if e["event"] == "step"]
    assert after == list(range(resumed[-1]["step"] + 1, 25)), after  # the relaunch trained the rest, in order
    assert any(e["event"] == "preempted" for e in events)
    verify_out(out)


# --- the image path -------------------------------------------------------------------------------

def test_the_dockerfiles_install_steps_build_a_venv_that_runs_the_job(pythons, tmp_path):
    """No Docker daemon here: the Dockerfile's COPY and RUN steps (all but apt-get) as a script, from the build
    context `image build` uses (the staged folder), /opt replaced by a temp folder, the image's python3
    (Ubuntu 24.04: 3.12) standing in; the last RUN is the image's own `python -m job.stack`."""
    from launcher import stage
    from launcher.resources import DOCKERFILE, path
    from rehearsal import build_image_as_script

    context = stage.build(tmp_path / "context").path
    opt, app, bin_dir = tmp_path / "opt", tmp_path / "app", tmp_path / "bin"
    app.mkdir()
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(pythons["job"])
    env = {**network_env(), "HOME": str(tmp_path), "PATH": f"{opt}/venv/bin:{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8",
           "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR") or str(Path.home() / ".cache" / "uv"),
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")}
    build_image_as_script(path(DOCKERFILE), context, app, opt, env)
    py = opt / "venv" / "bin" / "python"
    r = subprocess.run([str(py), "-m", "job", "check", "--help"], cwd=app, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr[-2000:]
