"""A fault-injecting stand-in for launcher.sky_adapter.SkyAdapter (tests only).

The 'cloud' is a folder ($FAKESKY_DIR): each cluster is a directory holding a copy of the task's
workdir, where the real rendered `run:` block runs with bash in its own session (the job is
tests/fakejob.py through a fake interpreter, or the real job). Provisioning runs in a detached
'server' process, like SkyPilot's API server, so it outlives a killed launcher. State is all in
files, so several launcher processes (up, then status/logs/down) see the same clusters.

Faults ($FAKESKY_FAIL, comma-separated): provision, sync, setup (the launch fails in that step,
leaving the cluster up, as SkyPilot does), stream (the log stream drops once after 3 lines),
outage (after 3 lines the whole API is unreachable for $FAKESKY_OUTAGE_S seconds: log stream,
job status, cluster status), stale-data (a file is added to the mounted --data folder), download (every rsync fails), download-once (the first rsync fails), down (teardown fails),
node-lost (a task of num_nodes > 1: node 1 dies once training wrote its manifest, the job fails). $FAKESKY_PROVISION_S and
$FAKESKY_DOWNLOAD_S slow those steps down so a test can kill the launcher inside them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from launcher import task as tasklib  # noqa: E402


def _root() -> Path:
    root = Path(os.environ["FAKESKY_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    return root


def _faults() -> set[str]:
    return {f for f in os.environ.get("FAKESKY_FAIL", "").split(",") if f}


def _outage(after_start: bool = False) -> None:
    """Raise while an injected outage lasts (fault 'outage'); `after_start` starts it now."""
    if "outage" not in _faults():
        return
    mark = _root() / "outage-started"
    if after_start and not mark.exists():
        mark.write_text(str(time.time()))
    if mark.exists() and time.time() < float(mark.read_text()) + float(os.environ.get("FAKESKY_OUTAGE_S", "120")):
        with open(_root() / "outage-refused", "a") as f:
            f.write("1\n")
        raise ConnectionError("fake: the API server is unreachable")


def _record(kind: str, cluster: str) -> None:
    with open(_root() / "calls.log", "a") as f:
        f.write(f"{kind} {cluster}\n")


class ClusterSetUpError(RuntimeError):
    """Named like SkyPilot's, so the backend files it under 'installing'."""


class FakeSky:
    def __init__(self):
        self.log: Callable[[str], None] = lambda line: None

    def launch(self, task_config: dict, cluster_name: str, secrets: dict, idle_minutes: int,
               on_request_id: Callable[[str], None]) -> int:
        cdir = _root() / cluster_name
        cdir.mkdir()
        (cdir / "task.json").write_text(json.dumps({"task": task_config, "idle_minutes": idle_minutes}))
        _record("launch", cluster_name)
        env = {**os.environ, **secrets}
        proc = subprocess.Popen([sys.executable, __file__, "provision", str(cdir)], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (cdir / "provisioner.pid").write_text(str(proc.pid))
        on_request_id(f"req-{cluster_name}")
        return self.wait_launch(f"req-{cluster_name}")

    def wait_launch(self, request_id: str) -> int:
        cdir = _root() / request_id.removeprefix("req-")
        while True:
            state = (cdir / "launch_state").read_text() if (cdir / "launch_state").is_file() else ""
            if state.startswith("running"):
                return 1
            if state.startswith("failed"):
                _, phase, message = state.split(":", 2)
                if phase == "installing":
                    raise ClusterSetUpError(message)
                raise RuntimeError(f"{phase}: {message}")
            if not cdir.is_dir():
                raise RuntimeError("cluster vanished during launch")
            time.sleep(0.05)

    def request_in_flight(self, request_id: str) -> bool:
        pid_file = _root() / request_id.removeprefix("req-") / "provisioner.pid"
        return pid_file.is_file() and _alive(int(pid_file.read_text()))

    def cancel(self, request_id: str) -> None:
        pid_file = _root() / request_id.removeprefix("req-") / "provisioner.pid"
        if pid_file.is_file():
            _kill_group(int(pid_file.read_text()))

    def tail(self, cluster_name: str, job_id: int) -> Iterator[str]:
        _outage()
        cdir = _root() / cluster_name
        log = cdir / "workdir" / "job.log"
        drop = "stream" in _faults() and not (_root() / "dropped").exists()
        pos, sent, buf = 0, 0, b""
        while True:
            ended = (cdir / "workdir" / "exit_code").is_file()
            if log.is_file():
                with open(log, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                pos += len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
                    sent += 1
                    if sent == 3 and "outage" in _faults() and not (_root() / "outage-started").exists():
                        _outage(after_start=True)
                    if drop and sent == 3:
                        (_root() / "dropped").write_text("1")
                        raise ConnectionError("fake: log stream dropped")
            if ended:
                return
            if not cdir.is_dir():
                raise ConnectionError("fake: cluster is gone")
            time.sleep(0.05)

    def job_exit_code(self, cluster_name: str, job_id: int) -> int | None:
        _outage()
        path = _root() / cluster_name / "workdir" / "exit_code"
        return int(path.read_text().strip() or 1) if path.is_file() else None

    def cluster_state(self, cluster_name: str) -> str:
        _outage()
        return "up" if (_root() / cluster_name).is_dir() else "gone"

    def rsync_down(self, cluster_name: str, remote_dir: str, local_dir: Path) -> None:
        _record("rsync", cluster_name)
        time.sleep(float(os.environ.get("FAKESKY_DOWNLOAD_S", "0")))
        faults = _faults()
        once = _root() / "download-failed-once"
        if "download" in faults or ("download-once" in faults and not once.exists()):
            once.write_text("1")
            raise RuntimeError("fake: rsync: connection closed")
        src = _root() / cluster_name / "workdir" / "out"
        # Links are copied as links (what `rsync -a` did): the launcher's verification must refuse them.
        shutil.copytree(src, local_dir, dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))

    def down(self, cluster_name: str) -> None:
        if "down" in _faults():
            _record("down-failed", cluster_name)
            raise RuntimeError("fake: the cloud API refused the termination")
        _record("down", cluster_name)
        cdir = _root() / cluster_name
        for name in ("provisioner.pid", "job.pid"):
            if (cdir / name).is_file():
                _kill_group(int((cdir / name).read_text()))
        shutil.rmtree(cdir, ignore_errors=True)

    def enabled_clouds(self) -> list[str]:
        return [] if "no-cloud" in _faults() else ["Fake"]

    def dryrun(self, task_config: dict, cluster_name: str, secrets: dict | None = None) -> dict:
        return {"cloud": "Fake", "region": "here", "instance": "fake-1x", "accelerators": "A100:1",
                "price_per_hour": 1.0, "spot": False}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def provision(cdir: Path) -> None:
    """The detached 'server' side of a launch: provision, sync, set up, start the run block."""
    spec = json.loads((cdir / "task.json").read_text())
    task = spec["task"]
    faults = _faults()

    def fail(phase: str, message: str) -> None:
        (cdir / "launch_state").write_text(f"failed:{phase}:{message}")
        sys.exit(1)

    time.sleep(float(os.environ.get("FAKESKY_PROVISION_S", "0")))
    if "provision" in faults:
        fail("provisioning", "fake: no capacity for A100:1 anywhere")
    workdir = cdir / "workdir"
    for name in tasklib.CODE_PATHS:  # what the launcher ships; SkyPilot syncs the whole workdir
        src = Path(task["workdir"]) / name
        if src.is_dir():
            shutil.copytree(src, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
    for dest, src in (task.get("file_mounts") or {}).items():
        target = cdir / "mounts" / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, target)
    if "stale-data" in faults:  # what a data cache shared across runs did: an earlier run's file is left in
        for dest, src in (task.get("file_mounts") or {}).items():
            target = cdir / "mounts" / dest.lstrip("/")
            if target.is_dir():
                (target / "left-by-an-earlier-run.jsonl").write_text("{}\n")
    if "sync" in faults:
        fail("syncing", "fake: rsync of the workdir failed")
    if "setup" in faults:
        fail("installing", "fake: setup exited with status 1")
    nodes = int(task.get("num_nodes") or 1)
    for i in range(nodes):  # every node of the cluster; down removes them all with the cluster
        (cdir / "nodes").mkdir(exist_ok=True)
        (cdir / "nodes" / f"node-{i}").write_text("up\n")
    overrides = {"JOB_PYTHON": os.environ["SOCRATES_JOB_PYTHON"]}
    lose_node = "node-lost" in faults and nodes > 1
    if lose_node:
        overrides["FAKEJOB_HANG"] = "evaluate"  # the job is mid-evaluation when the node goes
    for dest in task.get("file_mounts") or {}:
        if task["envs"].get("DATA") == dest:
            overrides["DATA"] = str(cdir / "mounts" / dest.lstrip("/"))
    (workdir / "run.sh").write_text(tasklib.run_script(task, **overrides))
    wrapper = "bash run.sh > job.log 2>&1; echo $? > exit_code.tmp; mv exit_code.tmp exit_code"
    env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["bash", "-c", wrapper], cwd=workdir, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (cdir / "job.pid").write_text(str(proc.pid))
    if lose_node:
        subprocess.Popen([sys.executable, __file__, "lose-node", str(cdir)], env=os.environ, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (cdir / "launch_state").write_text("running")


def lose_node(cdir: Path) -> None:
    """Node 1 dies after training: the job on every node ends (torchrun's rendezvous breaks), failed."""
    workdir = cdir / "workdir"
    deadline = time.time() + 120
    while not (workdir / "out" / "manifest.json").is_file():
        if time.time() > deadline or not cdir.is_dir():
            return
        time.sleep(0.05)
    (cdir / "nodes" / "node-1").write_text("lost\n")
    _kill_group(int((cdir / "job.pid").read_text()))
    with open(workdir / "job.log", "a") as f:
        f.write("fake: node 1 lost (instance terminated); the job ends on every node\n")
    (workdir / "exit_code").write_text("137\n")


if __name__ == "__main__":
    if sys.argv[1] == "provision":
        provision(Path(sys.argv[2]))
    elif sys.argv[1] == "lose-node":
        lose_node(Path(sys.argv[2]))
