"""Issue #25 against a real sshd on 127.0.0.1 (tests/sshd.py): `down` finds the job's processes by the run
id on the host (never run.json's pgid), a silent network drop is detected and detached from, and each run
gets its own code folder. The host is this machine, so the remote side is inspected directly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contracts.config import load_config
from launcher import registry
from launcher.backends.base import BackendError, StreamLost
from sshd import PYTHON, REPO, SshServer, sshd, sshd_available  # noqa: F401

pytestmark = pytest.mark.ssh
paramiko = pytest.importorskip("paramiko")

from launcher.backends.ssh import SshBackend  # noqa: E402

# A job that runs until it is killed, printing a step every 50 ms.
LONG_JOB = "for i in $(seq 100000); do echo tick $i; sleep 0.05; done\n"


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))


def backend(srv: SshServer, tmp: Path, run_block: str | None = LONG_JOB, **kw) -> SshBackend:
    opts = dict(key=str(srv.client_key), known_hosts=str(srv.known_hosts), trust_new_host=True, allow_cpu=True,
                remote_python=PYTHON, remote_dir=str(tmp / "remote"), poll_s=0.1)
    opts.update(kw)
    return SshBackend(f"ssh://root@127.0.0.1:{srv.port}", run_block=run_block, **opts)


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
