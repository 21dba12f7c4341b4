"""Managed runs (issue 15): the job side across preemptions, through tests/fakesky.py's fake managed-jobs
controller running the REAL job (CPU QLoRA on a tiny random Qwen2) with a file:// bucket.

A run preempted (SIGKILL of its machine) twice, first in the middle of a checkpoint write, then at a
seeded random step, ends SUCCEEDED: the torn checkpoint is skipped, each relaunch resumes from the newest
complete checkpoint in the bucket (at most one checkpoint interval repeated) and says so in its events,
and the final adapter equals an uninterrupted run's. Plus the pieces: the launch
record and deadline kept across relaunches (job/managed.py), a torn checkpoint never complete, the
time-based checkpoint interval.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import tiny_config
from contracts.events import read_all

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

CKPT_EVERY = 4
RUN = "tiny-managed-1"  # the run id: the run lives under <bucket>/<run id>/ (out/, managed/)
TOTAL = 16
TINY = tiny_config("tiny-managed", train={"checkpoint_every": CKPT_EVERY, "keep_checkpoints": 2, "max_steps": TOTAL},
                   data={"source": "synthetic:64", "subset": 1.0}, eval={"enabled": False, "mode": "sample", "rows": 4})


def managed_task(bucket: Path, deadline_s: int = 0) -> dict:
    """The managed task `up --spot` renders (launcher/task.py), with the bucket a local folder and the
    workdir a staged folder beside it, as `up` stages runs/<id>/code."""
    from launcher import stage
    from launcher import task as tasklib
    from launcher.registry import RunOptions

    cfg = load_config_from(TINY)
    run = SimpleNamespace(id=RUN, name="tiny-managed", config=cfg, options=RunOptions(deadline_s=deadline_s))
    code = bucket.parent / "code"
    staged = code if code.is_dir() else stage.build(code).path
    return tasklib.render(run, gpu=None, managed=True, bucket_url=f"file://{bucket}", workdir=staged)


def load_config_from(raw: dict) -> dict:
    import tempfile

    from contracts.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    try:
        return load_config(f.name).to_dict()
    finally:
        os.unlink(f.name)


def fault_python(tmp: Path) -> Path:
    """An interpreter for the job: `-m job ...` runs tests/fault_job.py (the real job, a fault injected
    only when FAKESKY_CKPT_KILL_STEP is set); anything else is this python."""
    exe = tmp / "jobpython"
    exe.write_text("#!/usr/bin/env bash\n"
                   f'if [ "$1 $2" != "-m job" ]; then exec "{sys.executable}" "$@"; fi\n'
                   f'shift 2\nexec "{sys.executable}" "{REPO / "tests" / "fault_job.py"}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """One fake controller for the module (its jobs numbered 1, 2, ...); every job cancelled at the end."""
    root = tmp_path_factory.mktemp("managed")
    env = {"FAKESKY_DIR": str(root / "cloud"), "SOCRATES_JOB_PYTHON": str(fault_python(root))}
    saved = {k: os.environ.get(k) for k in (*env, "FAKESKY_PREEMPT", "FAKESKY_SEED", "FAKESKY_PREEMPT_CKPT",
                                            "FAKESKY_FAIL")}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(env)
    import fakesky

    sky = fakesky.FakeSky()
    try:
        yield sky
    finally:
        for jdir in (root / "cloud" / "jobs").glob("*"):  # nothing of ours left running
            sky.jobs_cancel(int(jdir.name))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def straight(fake, tmp_path_factory):
    """The same run, never preempted: started now, waited for by whoever compares with it."""
    bucket = tmp_path_factory.mktemp("straight") / "bucket"
    return launch(fake, bucket), bucket


def straight_out(fake, straight) -> Path:
    job, bucket = straight
    assert wait_ended(fake, job)["status"] == "SUCCEEDED"
    return bucket / RUN / "out"


def launch(sky, bucket: Path, **env: str) -> int:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return sky.jobs_launch(managed_task(bucket), "tiny-managed", {}, on_request_id=lambda rid: None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_ended(sky, job_id: int, timeout: float = 300) -> dict:
    from fakesky import JOB_ENDED

    deadline = time.time() + timeout
    while time.time() < deadline:
        st = sky.jobs_queue(job_id)
        if st and st["status"] in JOB_ENDED:
            return st
        time.sleep(0.2)
    raise AssertionError(f"managed job {job_id} did not end in {timeout} s: {sky.jobs_queue(job_id)}")


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert set(wa) == set(wb) and wa
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def checkpoint_steps(events: list[dict]) -> list[int]:
    return [e["step"] for e in events if e["event"] == "checkpoint"]


@pytest.fixture
def launcher(fake, tmp_path):
    """Environment for a launcher process whose SkyPilot is tests/fakesky.py (catalog seeded), with the
    module's fake controller and the real job (tests/fault_job.py, no fault unless asked)."""
    from launcher_helpers import fakesky_env

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    env = fakesky_env(tmp_path, Path(os.environ["SOCRATES_JOB_PYTHON"]), cloud=os.environ["FAKESKY_DIR"])
    return SimpleNamespace(env=env, config=cfg, runs=tmp_path / "runs", bucket=tmp_path / "bucket")


@pytest.mark.slow
def test_up_spot_preempted_in_a_checkpoint_write_then_at_a_random_step_ends_done_and_matches_a_straight_run(
        fake, straight, launcher):
    """Acceptance 1: `up --spot` through the fake controller, preempted twice: first in the middle of writing
    checkpoint-8 (its files part-copied, as a bucket's non-atomic rename leaves them), then at a seeded random
    step past it. The torn checkpoint is skipped (back to checkpoint-4), each relaunch resumes from the newest
    complete one, and the adapter equals an uninterrupted run's."""
    from launcher_helpers import cli, only_run

    torn_at = 2 * CKPT_EVERY
    up = ["up", "--infra", "sky", "--gpu", "A100-80GB:1", "--config", str(launcher.config), "--spot",
          "--bucket", f"file://{launcher.bucket}", "--no-eval", "--yes"]
    r = cli(up, {**launcher.env, "FAKESKY_PREEMPT_CKPT": str(torn_at), "FAKESKY_PREEMPT": "1", "FAKESKY_SEED": "7"},
            timeout=600)
    rec = only_run(launcher.runs)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert rec["state"] == "done" and rec["verified"] and rec["options"]["managed_job"] is True
    job = rec["backend_state"]["job_id"]
    st = fake.jobs_queue(job)
    jdir = Path(os.environ["FAKESKY_DIR"]) / "jobs" / str(job)
    log = (jdir / "preemptions.log").read_text()
    assert st["status"] == "SUCCEEDED" and st["recovery_count"] == 2, (st, log)
    assert log.count("launch 1: preempted while writing a checkpoint") == 1 and log.count("preempted at step") == 1, log
    torn_step, _torn_file = (jdir / "killed-in-checkpoint").read_text().split()
    assert int(torn_step) == torn_at
    (point,) = json.loads((jdir / "preempt_at.json").read_text())
    assert torn_at < point < TOTAL
    out = " ".join(r.stdout.split())
    assert out.count("preempted: launch") == 2 and "resumed from step" in out

    # What the launcher recorded, across the relaunches (the log stream restarts on each new machine).
    events = read_all(Path(rec["dir"]) / "events.jsonl")
    pre = [e for e in events if e["event"] == "preempted"]
    res = [e for e in events if e["event"] == "resume"]
    assert [e["launch"] for e in pre] == [2, 3] and [e["launch"] for e in res] == [2, 3]
    # The torn checkpoint-8 (its marker there, a file cut short) was skipped: back to checkpoint-4.
    assert res[0]["step"] == CKPT_EVERY and res[0]["steps_lost"] == torn_at - CKPT_EVERY, res
    starts = [i for i, e in enumerate(events) if e["event"] == "start" and e.get("verb") == "train"]
    assert len(starts) == 3
    for k, (a, b) in enumerate(zip(starts, starts[1:])):
        # Each relaunch resumed from the newest checkpoint complete before its preemption and trained again at
        # most one interval; steps_lost is what was logged past it.
        saved = [0] + checkpoint_steps(events[:b])
        logged = max(e["step"] for e in events[a:b] if e["event"] == "step")
        # (a preemption right after a save's rename, before its event, resumes from that newer one)
        assert max(saved) <= res[k]["step"] <= logged and res[k]["step"] % CKPT_EVERY == 0, (res[k], saved, logged)
        assert res[k]["steps_lost"] == logged - res[k]["step"]
        assert res[k]["step"] == 0 or res[k]["steps_lost"] <= CKPT_EVERY
        after = [e["step"] for e in events[b:] if e["event"] == "step"]
        assert after[0] == res[k]["step"] + 1  # training took up right after the checkpoint
    assert res[1]["step"] > CKPT_EVERY  # the second relaunch from a checkpoint the first relaunch wrote
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 1 and done[0]["steps"] == TOTAL
    assert sorted({e["step"] for e in events if e["event"] == "step"}) == list(range(1, TOTAL + 1))

    # The adapter came from the bucket, verified, and equals the uninterrupted run's; then the run's
    # folder in the bucket was deleted (the bucket itself was the user's: it stays).
    from contracts import manifest

    assert manifest.verify(rec["dir"]) == []
    diff = adapter_diff(Path(rec["dir"]), straight_out(fake, straight))
    assert diff <= 1e-5, diff
    assert launcher.bucket.is_dir() and not (launcher.bucket / rec["id"]).exists()
    assert rec["backend_state"]["bucket_deleted"] is True and rec["machine"] == "gone"


# --- the pieces ------------------------------------------------------------------------------

def test_launch_record_keeps_the_first_deadline_and_counts_relaunches(tmp_path):
    from contracts.events import EventWriter
    from job import managed

    state, events = tmp_path / "bucket" / "managed", tmp_path / "bucket" / "out" / "events.jsonl"
    EventWriter(events).emit("step", step=7, total_steps=10, epoch=1.0, loss=1.0, lr=0.1, tokens_per_s=1.0,
                             gpu_mem_gib=0.0, eta_s=1.0)
    first = managed.start(state, events, deadline_s=3600, t0=1_000_000.0)
    assert first["launches"] == 1 and first["deadline"] == 1_000_000 + 3600
    assert [e["event"] for e in read_all(events)] == ["step"]  # the first launch is no preemption
    again = managed.start(state, events, deadline_s=3600, t0=2_000_000.0)  # a later setup: the cap is not reset
    assert again["launches"] == 2 and again["deadline"] == 1_000_000 + 3600
    pre = [e for e in read_all(events) if e["event"] == "preempted"]
    assert pre and pre[0]["launch"] == 2 and pre[0]["last_step"] == 7
    r = subprocess.run([sys.executable, "-m", "job.managed", "start", "--state", str(state), "--events", str(events),
                        "--deadline-s", "60"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["export", "SOCRATES_LAUNCH=3", "export",
                                                      f"SOCRATES_DEADLINE={1_000_000 + 3600}"], r.stdout + r.stderr
    (state / "launches.json").write_text("{not json")  # a damaged record is refused, never reset
    r = subprocess.run([sys.executable, "-m", "job.managed", "start", "--state", str(state)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not reset" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_checkpoint_whose_files_did_not_all_arrive_is_not_complete(tmp_path):
    from job.checkpoints import complete_checkpoints, is_complete, seal

    root = tmp_path / "checkpoints"
    for step in (4, 8):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (d / "optimizer.pt").write_bytes(b"x" * 1000)
        (d / "adapter_model.safetensors").write_bytes(b"y" * 500)
        seal(d, step)
    assert [p.name for p in complete_checkpoints(root)] == ["checkpoint-4", "checkpoint-8"]
    torn = root / "checkpoint-8"
    with open(torn / "optimizer.pt", "r+b") as f:  # the upload stopped part-way
        f.truncate(400)
    assert not is_complete(torn) and [p.name for p in complete_checkpoints(root)] == ["checkpoint-4"]
    (torn / "optimizer.pt").unlink()  # or never arrived
    assert not is_complete(torn)
    (torn / "COMPLETE").write_text("{\"step\": 8, \"files\": {\"../x\": 1}}")  # a marker pointing outside
    assert not is_complete(torn)
    (root / "checkpoint-4" / "COMPLETE").write_text("4\n")  # an older version's bare marker still counts
    assert is_complete(root / "checkpoint-4")


def test_time_based_checkpoints_default_when_managed_and_follow_the_clock(monkeypatch):
    from job import callbacks
    from job.managed import CHECKPOINT_EVERY_S

    clock = [100.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    cb = callbacks.TimedCheckpointCallback(60)
    cb.on_train_begin(None, None, None)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    clock[0] += 59
    assert cb.on_step_end(None, None, control).should_save is False
    clock[0] += 1
    assert cb.on_step_end(None, None, control).should_save is True
    cb.on_save(None, None, control)
    control.should_save = False
    clock[0] += 30
    assert cb.on_step_end(None, None, control).should_save is False
    clock[0] += 100
    control.should_training_stop = True  # the deadline stopped training: no extra save
    assert cb.on_step_end(None, None, control).should_save is False
    assert 300 <= CHECKPOINT_EVERY_S <= 900  # "about ten minutes" of training between saves on spot
    from contracts.config import load_config

    assert load_config(REPO / "configs" / "smoke.yaml").train.checkpoint_every_s is None  # unset: managed decides


def test_a_mount_that_renames_no_folders_gets_the_checkpoint_file_by_file_marker_last(tmp_path, monkeypatch):
    from job import checkpoints
    from job.checkpoints import COMPLETE, is_complete, move_checkpoint, seal

    src, dst = tmp_path / ".staging" / "checkpoint-4", tmp_path / "checkpoint-4"
    (src / "sub").mkdir(parents=True)
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (src / "sub" / "optimizer.pt").write_bytes(b"z" * 300)
    seal(src, 4)
    real, moved = os.replace, []

    def no_folder_rename(a, b):  # what an object-store mount answers to a folder rename
        if Path(a).is_dir():
            raise OSError(38, "Function not implemented")
        moved.append(Path(a).name)
        assert (Path(a).name == COMPLETE) == (not any(p.is_file() and p.name != COMPLETE for p in src.rglob("*"))
                                              and len(moved) > 1)
        return real(a, b)

    monkeypatch.setattr(checkpoints.os, "replace", no_folder_rename)
    move_checkpoint(src, dst)
    assert moved[-1] == COMPLETE and sorted(moved) == sorted(["trainer_state.json", "optimizer.pt", COMPLETE])
    assert is_complete(dst) and not src.exists()


_RANK_CLOCKS = r'''
import json, os, sys
from types import SimpleNamespace
sys.path.insert(0, os.environ["REPO"])
from job import callbacks, dist

assert dist.init()
r = dist.rank()
ticks = [0.0, 30.0, 59.5, 61.0, 90.0, 119.8, 125.0, 200.0]  # rank 0's clock at train begin, then at each step's end
# rank 1 began training with rank 0 but its clock reads 0.6 s later at every step end (it finished its step later)
now = [0]
clock = lambda: ticks[now[0]] + (0.6 if r == 1 and now[0] > 0 else 0.0)
timed = callbacks.TimedCheckpointCallback(60, clock=clock)
timed.on_train_begin(None, None, None)
deadline = callbacks.DeadlineCallback(clock=clock)
saves, stops = [], []
for k in range(1, len(ticks)):
    now[0] = k
    c = SimpleNamespace(should_save=False, should_training_stop=False)
    timed.on_step_end(None, None, c)
    saves.append(c.should_save)
    if c.should_save:
        timed.on_save(None, None, c)
    stops.append(deadline.on_step_end(None, None, SimpleNamespace(should_save=False, should_training_stop=False)).should_training_stop)
json.dump({"saves": saves, "stops": stops}, open(os.path.join(os.environ["OUTDIR"], f"rank{r}.json"), "w"))
dist.destroy()
'''


@pytest.mark.slow
def test_timed_save_and_deadline_are_decided_on_rank_0_for_every_rank(tmp_path):
    """2 gloo ranks whose clocks differ by 0.6 s: each rank deciding alone would save (or stop) one step
    apart, one rank in a save's collectives while the other is in the all-reduce (an NCCL hang). Rank 0's
    clock decides for both: saves after steps 3, 6, 7 (61 s, 64 s, 75 s since the last save), the
    deadline at 60 s (rank 1 reads 60.1 s at step 2) stops both at step 3."""
    import socket

    script = tmp_path / "ranks.py"
    script.write_text(_RANK_CLOCKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "REPO": str(REPO), "OUTDIR": str(tmp_path), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "SOCRATES_DEADLINE": "60", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected_saves = [False, False, True, False, False, True, True]  # steps 1..7 on rank 0's clock
    assert got[0]["saves"] == got[1]["saves"] == expected_saves, got
    assert got[0]["stops"] == got[1]["stops"] == [False, False, True, True, True, True, True], got
