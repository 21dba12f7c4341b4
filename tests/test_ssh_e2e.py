"""`socrates-launch up --infra ssh://...` end to end over a real sshd on 127.0.0.1, the real smoke job.

Acceptance (issue #6): a verified adapter comes back and nothing is left on the host; a launcher
killed mid-run leaves the job running, `logs` re-attaches and finishes the run, `down` is a no-op
after; refusals (host key, credentials, disk) exit 2 with one line and create no run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, short_smoke
from contracts import manifest
from sshd import PYTHON, REPO, SshServer, sshd, sshd_available  # noqa: F401

pytestmark = pytest.mark.ssh


def cli(*args: str, env: dict, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    return run_cli(list(args), env, timeout=timeout, **kw)


def up_args(srv: SshServer, tmp: Path, *extra: str, user: str = "root", config: str = "configs/smoke.yaml") -> list[str]:
    return ["up", "--infra", f"ssh://{user}@127.0.0.1:{srv.port}", "--allow-cpu", "--config", config,
            "--yes", "--ssh-key", str(srv.client_key), "--known-hosts", str(srv.known_hosts),
            "--remote-python", PYTHON, "--remote-dir", str(tmp / "remote"), *extra]


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory):
    """--remote-dir shared by the runs of this module: its sync cache outlives each run, like on a real host."""
    return tmp_path_factory.mktemp("host") / "socrates"


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "SOCRATES_RUNS_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(REPO), "COLUMNS": "120"}


def only_run(tmp: Path) -> dict:
    (record,) = (tmp / "runs").glob("*/run.json")
    return json.loads(record.read_text())


def host_processes_under(path: Path) -> list[int]:
    """Processes on the host (this machine) whose working directory is under `path`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(path)):
                found.append(int(pid))
        except OSError:
            pass
    return found


def changed_since_cache(cache: Path, tmp: Path) -> tuple[int, int]:
    """Files (and bytes) of the synced code (a run's staged folder) whose size or sha256 differ from the
    host's cache copy."""
    from contracts._io import sha256_file
    from launcher import stage
    from launcher.ssh_transport import local_files

    staged = stage.build(tmp / "staged").path
    files = local_files(staged, stage.entries(staged))
    changed = [f for rel, f in files.items() if not (cache / rel).is_file()
               or (cache / rel).stat().st_size != f.stat().st_size or sha256_file(cache / rel) != sha256_file(f)]
    return len(changed), sum(f.stat().st_size for f in changed)


def needs_job():
    if not (REPO / "job" / "check.py").is_file() or not (REPO / "job" / "train.py").is_file():
        pytest.skip("the real job (job/check.py, job/train.py) is not in this tree yet")


# --- refusals: exit 2, one line, no run created --------------------------------------------------

def test_refusals_exit_2_one_line_and_create_nothing(sshd, tmp_path, env):
    cases = [
        # unknown host key (a known_hosts of its own: the module's other runs trust the test host in the shared one)
        (["--known-hosts", str(tmp_path / "known_hosts")], "is not in .*--trust-new-host"),
        (["--trust-new-host", "--remote-dir", "/sys/socrates"], "not writable"),
        (["--trust-new-host", "--min-free-gb", "1e9"], "GB free under"),       # "nearly full": less free than needed
        (["--trust-new-host", "--ssh-key", str(tmp_path / "nope")], "no such file"),
    ]
    for extra, pattern in cases:
        p = cli(*up_args(sshd, tmp_path, *extra), env=env)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (extra, p.stderr)
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    locked = tmp_path / "locked_key"  # a key with a passphrase: said so, not "authentication refused"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    p = cli(*up_args(sshd, tmp_path, "--trust-new-host", "--ssh-key", str(locked)), env=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "key is passphrase-protected (load it into ssh-agent" in p.stderr, p.stderr
    p = cli(*up_args(sshd, tmp_path, "--trust-new-host", user="nobody"), env=env)
    assert p.returncode == 2 and "authentication refused for user 'nobody'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    assert not (tmp_path / "remote" / "runs").exists()


def test_changed_host_key_refused_by_up(tmp_path, env):
    why = sshd_available()
    if why:
        pytest.skip(why)
    srv = SshServer.start(tmp_path / "sshd")
    try:
        p = cli(*up_args(srv, tmp_path, "--trust-new-host", "--min-free-gb", "1e9"), env=env)
        assert p.returncode == 2 and "GB free" in p.stderr  # the key was remembered: we got past it
        srv.new_host_key()
        p = cli(*up_args(srv, tmp_path, "--trust-new-host"), env=env)
        assert p.returncode == 2 and "host key CHANGED" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    finally:
        srv.stop()


# --- acceptance 1 and the killed launcher, with the real smoke job --------------------------------

@pytest.mark.slow
def test_up_over_ssh_brings_back_a_verified_adapter_and_leaves_nothing(sshd, tmp_path, env, host_dir):
    needs_job()
    canary = "hf_" + "SshCanary" * 4
    env = {**env, "HF_TOKEN": canary}
    p = cli(*up_args(sshd, tmp_path, "--trust-new-host", "--remote-dir", str(host_dir),  # evaluation included
                     config=str(short_smoke(tmp_path, train={"max_steps": 4}, eval={"rows": 8}))), env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    run = only_run(tmp_path)
    assert run["state"] == "done" and run["verified"] and run["machine"] == "gone"
    adapter = Path(run["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file()
    manifest.verify_or_raise(Path(run["dir"]))
    assert (Path(run["dir"]) / "eval").is_dir()  # the run block's evaluation came back too
    state = run["backend_state"]
    assert state["torn_down"] and state["remote_clean"] and state["sync"]["files_sent"] + state["sync"]["files_skipped"] > 20
    assert not Path(state["work"]).exists()
    assert not host_processes_under(host_dir)
    assert list((host_dir / "runs").iterdir()) == []
    for f in [*(tmp_path / "runs").rglob("*"), *host_dir.rglob("*")]:  # the token went nowhere
        assert not f.is_file() or canary not in f.read_text(errors="replace"), f
    assert canary not in p.stdout + p.stderr
    print(f"\nsync: {state['sync']}, downloaded {state['bytes_downloaded']} B")


@pytest.mark.slow
def test_launcher_killed_mid_run_then_logs_reattaches_and_down_cleans(sshd, tmp_path, env, host_dir):
    needs_job()
    # what a sync now has to send: the files whose content differs from the host's cache (left by the test above)
    codes = host_dir / "cache" / "code"  # code folders by content; `latest` names the last one made
    expect_files, expect_bytes = changed_since_cache(codes / (codes / "latest").read_text(), tmp_path)
    short = str(short_smoke(tmp_path, train={"max_steps": 4, "checkpoint_every": 2}, eval={"rows": 8}))
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *up_args(sshd, tmp_path, "--trust-new-host", "--no-eval", "--remote-dir", str(host_dir),
                                                                  config=short)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill the launcher outright once the job has started on the host
        records = list((tmp_path / "runs").glob("*/run.json"))
        if records and json.loads(records[0].read_text())["backend_state"].get("pid"):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # at once: the record may still say provisioning; logs must cope
    proc.wait(10)
    run = only_run(tmp_path)
    work = Path(run["backend_state"]["work"])
    pgid = run["backend_state"]["pgid"]
    os.killpg(pgid, 0)  # the job survived its launcher (raises if the group is gone)

    st = cli("status", run["id"], env=env)
    assert st.returncode == 0 and "machine:  up" in st.stdout, st.stdout
    p = cli("logs", run["id"], env=env)  # re-attach: follow to the end, download, verify, tear down
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    after = only_run(tmp_path)
    assert after["state"] == "done" and after["verified"] and after["machine"] == "gone"
    manifest.verify_or_raise(Path(after["dir"]))
    assert not work.exists() and not host_processes_under(host_dir)
    sync = after["backend_state"]["sync"]
    print(f"\nsecond up's sync: {sync}; changed since the cache: {expect_files} files, {expect_bytes} B")
    assert (sync["files_sent"], sync["bytes_sent"]) == (expect_files, expect_bytes)  # only what changed (0 in CI)
    d = cli("down", run["id"], env=env)  # idempotent
    assert d.returncode == 0, d.stdout + d.stderr
    recorded = [json.loads(line) for line in (Path(after["dir"]) / "events.jsonl").read_text().splitlines()]
    steps = [e for e in recorded if e["event"] == "step"]
    # every step recorded exactly once across the kill and the re-attach, in order, up to the last
    assert [e["step"] for e in steps] == list(range(1, steps[-1]["total_steps"] + 1))
