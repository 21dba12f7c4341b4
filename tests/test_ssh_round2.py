"""Issue #25 against a real sshd on 127.0.0.1 (tests/sshd.py): `down` finds the job's processes by the run
id on the host (never run.json's pgid), a silent network drop is detected and detached from, and each run
gets its own code folder. The host is this machine, so the remote side is inspected directly."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contracts.config import load_config
from launcher import registry
from launcher.backends.base import StreamLost
from sshd import PYTHON, REPO, SshServer, ssh_backend, sshd, sshd_available  # noqa: F401

pytestmark = pytest.mark.ssh
paramiko = pytest.importorskip("paramiko")

from launcher.backends.ssh import SshBackend  # noqa: E402

# A job that runs until it is killed, printing a step every 50 ms.
LONG_JOB = "for i in $(seq 100000); do echo tick $i; sleep 0.05; done\n"


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))


def backend(srv: SshServer, tmp: Path, run_block: str | None = LONG_JOB, **kw) -> SshBackend:
    return ssh_backend(srv, tmp, run_block, **kw)


def new_run(srv: SshServer, name: str) -> registry.Run:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    return registry.new_run(name, f"ssh://root@127.0.0.1:{srv.port}", config=cfg.to_dict())


def run_processes(run_id: str) -> list[int]:
    """Live processes on this machine (the host) whose environment carries the run's SOCRATES_RUN_ID."""
    want = f"SOCRATES_RUN_ID={run_id}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if want in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except (OSError, IndexError):
            continue
    return found


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stranger() -> subprocess.Popen:
    """Someone else's process group on the host: no SOCRATES_RUN_ID in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "SOCRATES_RUN_ID"}
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True, env=env)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- item 1: the process group comes from the host, by the run id ------------------------------------

def test_down_kills_the_runs_job_found_by_its_id_and_spares_the_group_run_json_names(sshd, tmp_path):
    """run.json's pgid names a stranger's process group (an edited record, a reused pid): `down` ends the
    run's own job (found on the host by SOCRATES_RUN_ID) and leaves the stranger alone."""
    other = stranger()
    try:
        run = new_run(sshd, "pgid")
        b = backend(sshd, tmp_path)
        b.launch(run)
        wait_until(lambda: run_processes(run.id), 10, "the job running on the host")
        run.update(backend_state={**run.backend_state, "pid": other.pid, "pgid": other.pid})
        SshBackend(run.infra).down(registry.load(run.id))  # a fresh launcher, only run.json to go on
        assert alive(other.pid), "down killed the process group run.json named, not the run's"
        wait_until(lambda: not run_processes(run.id), 10, "the run's job to end")
        assert not Path(run.backend_state["work"]).exists()
    finally:
        other.kill()
        other.wait(10)


# --- item 8: a silent network drop is noticed and detached from ---------------------------------------

def _descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def test_a_silent_drop_detaches_after_reconnect_s_instead_of_hanging(tmp_path):
    """The server (listener and every session) is stopped with SIGSTOP mid-run: nothing closes, nothing
    answers, as when a network path dies silently. `follow` notices (the SFTP read times out), retries for
    reconnect_s, then detaches (StreamLost: the job is not known to have failed), in bounded time."""
    import threading

    why = sshd_available()
    if why:
        pytest.skip(why)
    srv = SshServer.start(tmp_path / "sshd")
    stopped: list[int] = []
    run = new_run(srv, "silent")
    from contracts.events import LINE_PREFIX, dumps, make

    hello = shlex.quote(LINE_PREFIX + dumps(make("log", message="hello")))
    b = backend(srv, tmp_path, run_block=f"echo {hello}\n" + LONG_JOB, reconnect_s=3.0, timeout_s=2.0)
    try:
        b.launch(run)
        outcome: list[BaseException | int] = []

        def on_event(e):
            if not stopped:
                stopped.extend(_descendants(srv.proc.pid))
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)

        def follow():
            try:
                outcome.append(b.follow(run, on_event))
            except BaseException as e:  # noqa: BLE001  (what follow raised is the result)
                outcome.append(e)

        t = threading.Thread(target=follow, daemon=True)
        t0 = time.monotonic()
        t.start()
        t.join(60)
        took = time.monotonic() - t0
        assert not t.is_alive(), "follow still hangs 60 s into a silent drop"
        assert isinstance(outcome[0], StreamLost) and "lost" in str(outcome[0]), outcome
        assert took < 40, took
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        try:
            SshBackend(run.infra).down(registry.load(run.id))
        finally:
            srv.stop()


# --- item 9: each run's code is its own checkout's ----------------------------------------------------

def _checkout(root: Path, marker: str) -> Path:
    (root / "job").mkdir(parents=True)
    (root / "job" / "train.py").write_text(f"# checkout {marker}\n")
    (root / "job" / "same.py").write_text("# the same in both\n")
    return root


def test_two_ups_from_different_checkouts_each_run_their_own_code(sshd, tmp_path, monkeypatch):
    """`up` A syncs its code; before it builds its run folder, `up` B (another checkout) syncs and starts. A's
    run folder must hold A's job/train.py (the shared cache/code gave it B's), and B's B's."""
    a_code, b_code = _checkout(tmp_path / "a", "A"), _checkout(tmp_path / "b", "B")
    run_a, run_b = new_run(sshd, "code-a"), new_run(sshd, "code-b")
    b_backend = backend(sshd, tmp_path, run_block="true\n", code_root=b_code)
    a_backend = backend(sshd, tmp_path, run_block="true\n", code_root=a_code)
    real = SshBackend._prepare_work
    cut_in = []

    def b_cuts_in(self, *args, **kw):  # A synced its code; now B's whole launch happens, then A goes on
        if self is a_backend and not cut_in:
            cut_in.append(1)
            b_backend.launch(run_b)
        return real(self, *args, **kw)

    try:
        with monkeypatch.context() as m:
            m.setattr(SshBackend, "_prepare_work", b_cuts_in)
            a_backend.launch(run_a)
        assert cut_in
        for run, marker in ((run_a, "A"), (run_b, "B")):
            work = Path(run.backend_state["work"])
            assert (work / "job" / "train.py").read_text() == f"# checkout {marker}\n", run.id
    finally:
        for run in (run_a, run_b):
            SshBackend(run.infra).down(registry.load(run.id))
