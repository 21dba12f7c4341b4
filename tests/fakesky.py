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

Managed jobs (`jobs_launch`, `jobs_queue`, `jobs_tail`, `jobs_cancel`, like sky.jobs.*): a detached
controller process ($FAKESKY_DIR/jobs/<id>/) runs the real rendered run block on a fresh 'machine'
(launch-N/, a new workdir: nothing on the old one's disk survives) with the task's bucket mount
(a file:// folder) shared by every launch, as SkyPilot's controller does. It preempts the job
(SIGKILL of its whole process group) $FAKESKY_PREEMPT times, each at a step drawn with
random.Random($FAKESKY_SEED) once the job's first step event says how many there are, and starts it
again, counting recoveries. $FAKESKY_PREEMPT_CKPT=N preempts the first launch in the middle of
writing the first checkpoint at step >= N (tests/fault_job.py: the checkpoint's files and marker
are part-copied into checkpoints/, as a non-atomic bucket rename would leave them); with both, the
random preemptions come on the launches after it, at steps past N. A job that exits
non-zero by itself is FAILED (max_restarts_on_errors: 0).
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


class _Growing:
    """A log file read as it grows: each new_lines() returns the complete lines written since the last
    call (a partial last line waits for its newline); `grew` says whether that call read anything."""

    def __init__(self, path: Path):
        self.path, self.pos, self.buf, self.grew = path, 0, b"", False

    def new_lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            chunk = f.read()
        self.pos += len(chunk)
        self.grew = bool(chunk)
        *lines, self.buf = (self.buf + chunk).split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]


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

    def request_cluster(self, request_id: str) -> str | None:
        """As SkyPilot's request record: the cluster a launch request (req-<cluster>) was made for."""
        cdir = _root() / request_id.removeprefix("req-")
        return cdir.name if request_id.startswith("req-") and (cdir / "task.json").is_file() else None

    def cancel(self, request_id: str) -> None:
        pid_file = _root() / request_id.removeprefix("req-") / "provisioner.pid"
        if pid_file.is_file():
            _kill_group(int(pid_file.read_text()))

    def tail(self, cluster_name: str, job_id: int) -> Iterator[str]:
        _outage()
        cdir = _root() / cluster_name
        log = cdir / "workdir" / "job.log"
        drop = "stream" in _faults() and not (_root() / "dropped").exists()
        sent, growing = 0, _Growing(log)
        while True:
            ended = (cdir / "workdir" / "exit_code").is_file()
            if log.is_file():
                for line in growing.new_lines():
                    yield line
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


    # --- managed jobs (sky.jobs.launch / queue / tail_logs / cancel) ---------------------------

    def jobs_launch(self, task_config: dict, name: str, secrets: dict, on_request_id: Callable[[str], None]) -> int:
        jobs = _root() / "jobs"
        jobs.mkdir(parents=True, exist_ok=True)
        job_id = 1 + max((int(p.name) for p in jobs.iterdir() if p.name.isdigit()), default=0)
        jdir = jobs / str(job_id)
        jdir.mkdir()
        (jdir / "task.json").write_text(json.dumps({"task": task_config, "name": name}))
        _write_job_state(jdir, status="PENDING", recovery_count=0, launch=0)
        _record("jobs-launch", name)
        if "request" in _faults():  # the launch request itself fails: no job was made
            shutil.rmtree(jdir)
            on_request_id(f"jobreq-{job_id}")
            raise RuntimeError("fake: the managed-job launch request failed (injected)")
        on_request_id(f"jobreq-{job_id}")
        if "provision" in _faults():
            _write_job_state(jdir, status="FAILED_NO_RESOURCE", recovery_count=0, launch=0)
            raise RuntimeError("fake: no capacity for the managed job anywhere")
        env = {**os.environ, **secrets}
        proc = subprocess.Popen([sys.executable, __file__, "controller", str(jdir)], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (jdir / "controller.pid").write_text(str(proc.pid))
        return job_id

    def wait_jobs_launch(self, request_id: str) -> int:
        job_id = int(request_id.removeprefix("jobreq-"))
        if not (_root() / "jobs" / str(job_id) / "state.json").is_file():
            from launcher.sky_adapter import LaunchRequestFailed

            raise LaunchRequestFailed(f"fake: launch request {request_id} failed: it made no job")
        return job_id

    def jobs_queue(self, job_id: int, refresh: bool = False) -> dict | None:
        """The job's record: status (SkyPilot's ManagedJobStatus names), recovery_count; None: no such job."""
        _outage()
        path = _root() / "jobs" / str(job_id) / "state.json"
        if not path.is_file():
            return None
        task = json.loads((path.parent / "task.json").read_text())
        return {**json.loads(path.read_text()), "job_name": task["name"]}  # as SkyPilot's queue has it

    def jobs_tail(self, job_id: int) -> Iterator[str]:
        """Like `sky jobs logs --follow`: the current launch's log from its start, then each relaunch's
        (a reconnect starts at the launch running then: earlier machines' logs are gone with them)."""
        _outage()
        jdir = _root() / "jobs" / str(job_id)
        if not jdir.is_dir():
            raise ValueError(f"fake: no managed job {job_id}")
        launch = max(1, _job_state(jdir).get("launch", 0))
        while True:
            log = jdir / f"launch-{launch}" / "workdir" / "job.log"
            while not log.is_file():
                st = _job_state(jdir)
                if st["status"] in JOB_ENDED and st.get("launch", 0) < launch:
                    return
                time.sleep(0.05)
            growing = _Growing(log)
            while True:
                st = _job_state(jdir)
                ended = st["status"] in JOB_ENDED or st.get("launch", 0) > launch  # this launch is over
                yield from growing.new_lines()
                if ended and not growing.grew:
                    break
                time.sleep(0.05)
            st = _job_state(jdir)
            if st["status"] in JOB_ENDED and st.get("launch", 0) <= launch:
                return
            launch += 1
            yield f"(controller) managed job {job_id} is recovering: launch {launch} on new capacity"

    def jobs_cancel(self, job_id: int) -> None:
        jdir = _root() / "jobs" / str(job_id)
        _record("jobs-cancel", str(job_id))
        if not jdir.is_dir():
            return
        st = _job_state(jdir)
        if st["status"] in JOB_ENDED:
            return
        (jdir / "cancelled").write_text("1")
        for name in ("controller.pid", "job.pid"):
            if (jdir / name).is_file():
                _kill_group(int((jdir / name).read_text()))
        _write_job_state(jdir, status="CANCELLED", recovery_count=st.get("recovery_count", 0),
                         launch=st.get("launch", 0))


JOB_ENDED = ("SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_NO_RESOURCE", "FAILED_CONTROLLER", "CANCELLED")


def _job_state(jdir: Path) -> dict:
    for _ in range(50):  # written atomically, but a reader may race the very first write
        try:
            return json.loads((jdir / "state.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise RuntimeError(f"fake: {jdir}/state.json unreadable")


def _write_job_state(jdir: Path, **state: Any) -> None:
    tmp = jdir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, jdir / "state.json")


def _bucket_dir(task: dict) -> tuple[str, Path] | None:
    """The task's bucket mount (a file:// source) as (mount path, local folder)."""
    for dest, src in (task.get("file_mounts") or {}).items():
        if isinstance(src, dict) and str(src.get("source", "")).startswith("file://"):
            return dest, Path(src["source"][len("file://"):])
    return None


def _step_events(log: Path, offset: int) -> tuple[list[dict], int]:
    from contracts.events import EventReader

    reader = EventReader(log, offset, skips=None)
    evs = reader.read_new()
    return [e for e in evs if e["event"] == "step"], reader.offset


def controller(jdir: Path) -> None:
    """The managed-jobs controller: launch, watch, preempt (as planned), relaunch, until the job ends."""
    import random

    spec = json.loads((jdir / "task.json").read_text())
    task = spec["task"]
    mount = _bucket_dir(task)
    if mount is None:
        _write_job_state(jdir, status="FAILED_CONTROLLER", recovery_count=0, launch=0)
        return
    mount_path, bucket = mount
    bucket.mkdir(parents=True, exist_ok=True)
    preemptions = int(os.environ.get("FAKESKY_PREEMPT", "0"))
    rng = random.Random(int(os.environ.get("FAKESKY_SEED", "0")))
    ckpt_kill = os.environ.get("FAKESKY_PREEMPT_CKPT")
    points: list[int] | None = None
    recoveries = 0
    launch = 0
    while True:
        launch += 1
        _write_job_state(jdir, status="STARTING" if launch == 1 else "RECOVERING", recovery_count=recoveries,
                         launch=launch)
        machine = jdir / f"launch-{launch}"
        workdir = machine / "workdir"
        # a fresh machine: the workdir (the run's staged folder) synced again, nothing else from the last one
        shutil.copytree(task["workdir"], workdir, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        (workdir / ".socrates-t0").write_text(f"{int(time.time())}\n")  # what setup's first line writes
        overrides = {"JOB_PYTHON": os.environ["SOCRATES_JOB_PYTHON"],  # OUT as the mount maps it here
                     "OUT": str(bucket / task["envs"]["OUT"][len(mount_path):].lstrip("/"))}
        if ckpt_kill and launch == 1:
            overrides.update({"FAKESKY_CKPT_KILL_STEP": ckpt_kill, "FAKESKY_CKPT_MARK": str(jdir / "killed-in-checkpoint")})
        (workdir / "run.sh").write_text(tasklib.run_script(task, **overrides))
        wrapper = "bash run.sh > job.log 2>&1; echo $? > exit_code.tmp; mv exit_code.tmp exit_code"
        env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONUNBUFFERED": "1"}
        offset = 0  # this launch's own log: the steps it printed (the real job and tests/fakejob.py alike)
        proc = subprocess.Popen(["bash", "-c", wrapper], cwd=workdir, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (jdir / "job.pid").write_text(str(proc.pid))
        _write_job_state(jdir, status="RUNNING", recovery_count=recoveries, launch=launch)
        preempted = False
        while proc.poll() is None:
            steps, offset = _step_events(workdir / "job.log", offset)
            if steps and points is None and preemptions:
                total = int(steps[0]["total_steps"])
                points = sorted(rng.sample(range(int(ckpt_kill) + 1 if ckpt_kill else 2, total), preemptions))
                (jdir / "preempt_at.json").write_text(json.dumps(points))
            nth = recoveries - (1 if ckpt_kill else 0)  # with ckpt_kill, launch 1 is the checkpoint write's
            target = points[nth] if points and 0 <= nth < len(points) else None
            mid_checkpoint = bool(ckpt_kill) and launch == 1 and (jdir / "killed-in-checkpoint").exists()
            if mid_checkpoint or (target is not None and any(e["step"] >= target for e in steps)):
                _kill_group(proc.pid)  # the machine is gone: no handler, no flush, mid-step
                preempted = True
                with open(jdir / "preemptions.log", "a") as f:
                    f.write(f"launch {launch}: preempted " + ("while writing a checkpoint\n" if mid_checkpoint else
                                                             f"at step {max(e['step'] for e in steps)}\n"))
                break
            time.sleep(0.02)
        proc.wait()
        if (jdir / "cancelled").exists():
            return
        if preempted:
            recoveries += 1
            continue
        code = (workdir / "exit_code").read_text().strip() if (workdir / "exit_code").is_file() else "1"
        _write_job_state(jdir, status="SUCCEEDED" if code == "0" else "FAILED", recovery_count=recoveries,
                         launch=launch, exit_code=int(code or 1))
        return


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
    # SkyPilot syncs the whole workdir: the run's staged folder (launcher/stage.py)
    shutil.copytree(task["workdir"], workdir, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
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
    elif sys.argv[1] == "controller":
        controller(Path(sys.argv[2]))
    elif sys.argv[1] == "lose-node":
        lose_node(Path(sys.argv[2]))
