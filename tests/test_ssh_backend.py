"""The SSH backend against a real sshd on 127.0.0.1: host keys, credentials, disk, sync, faults.

The job here is a small stand-in that writes contract events at a steady pace (the transport is
what's under test); tests/test_ssh_e2e.py runs the real smoke job.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paramiko
import pytest

from contracts import events as ev
from contracts import manifest
from contracts.errors import ContractError
from launcher.backends.base import BackendError
from launcher.backends.ssh import SshBackend, SshOptions
from launcher.ssh_transport import parse_infra
from sshd import PYTHON, REPO, FileRun, SshServer, sshd, sshd_available  # noqa: F401

pytestmark = pytest.mark.ssh

# Writes STEPS step events (one every DELAY s), then an adapter and a manifest, like the job.
FAKE_JOB = textwrap.dedent("""\
    python - <<'PY'
    import os, time
    from pathlib import Path
    from contracts import events, manifest
    out = Path(os.environ["OUT"]); w = events.EventWriter(out / "events.jsonl")
    steps, delay = int(os.environ.get("STEPS", "{steps}")), float(os.environ.get("DELAY", "{delay}"))
    w.emit("start", verb="train")
    for s in range(1, steps + 1):
        time.sleep(delay)
        w.emit("step", step=s, total_steps=steps, epoch=s / steps, loss=1.0 / s, lr=1e-3,
               tokens_per_s=10.0, gpu_mem_gib=0.0, eta_s=(steps - s) * delay)
    (out / "adapter").mkdir(exist_ok=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    manifest.write(out, meta={{"run": os.environ["SOCRATES_RUN_ID"]}})
    w.emit("done", reason="completed")
    PY
    """)


def fake_job(steps: int = 10, delay: float = 0.05) -> str:
    return FAKE_JOB.format(steps=steps, delay=delay)


def options(srv: SshServer, tmp: Path, **kw) -> SshOptions:
    base = dict(infra=f"ssh://root@127.0.0.1:{srv.port}", key=str(srv.client_key), known_hosts=str(srv.known_hosts),
                trust_new_host=True, allow_cpu=True, remote_python=PYTHON, remote_dir=str(tmp / "remote"),
                poll_s=0.1)
    base.update(kw)
    return SshOptions(**base)


def new_run(tmp: Path, run_id: str, data: Path | None = None) -> FileRun:
    return FileRun(id=run_id, dir=tmp / "runs" / run_id, config_path=REPO / "configs" / "smoke.yaml",
                   data=str(data) if data else None)


def job_processes(run_id: str) -> list[str]:
    """Processes on this machine (the host) whose command line or cwd belong to the run."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if f"/runs/{run_id}" in cwd:
            found.append(pid)
    return found


# --- input and refusals -----------------------------------------------------------------------

@pytest.mark.parametrize("infra", ["ssh://host", "ssh://@host", "http://root@host", "ssh://root@host:99999",
                                   "ssh://root:pw@host", "ssh://root@host/path"])
def test_bad_infra_is_one_line(infra):
    with pytest.raises(ContractError) as e:
        parse_infra(infra)
    assert infra in str(e.value) and "\n" not in str(e.value)


def test_parse_infra_default_port():
    t = parse_infra("ssh://ubuntu@gpu-box")
    assert (t.user, t.host, t.port) == ("ubuntu", "gpu-box", 22)
    assert parse_infra("ssh://root@127.0.0.1:2222").known_hosts_name == "[127.0.0.1]:2222"


def test_unknown_host_refused_then_trusted_and_remembered(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    b = SshBackend(options(sshd, tmp_path, known_hosts=str(kh), trust_new_host=False))
    with pytest.raises(ContractError, match="not in .*--trust-new-host"):
        b._connect()
    assert not kh.exists()
    SshBackend(options(sshd, tmp_path, known_hosts=str(kh), trust_new_host=True))._connect().close()
    assert kh.read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
    # remembered: no --trust-new-host needed the second time
    SshBackend(options(sshd, tmp_path, known_hosts=str(kh), trust_new_host=False))._connect().close()


def test_wrong_key_and_wrong_user_refused_one_line(sshd, tmp_path):
    from sshd import keygen

    other = keygen(tmp_path / "other_key")
    for kw, who in ((dict(key=str(other)), "root"), (dict(infra=f"ssh://nobody@127.0.0.1:{sshd.port}"), "nobody")):
        with pytest.raises(ContractError) as e:
            SshBackend(options(sshd, tmp_path, **kw))._connect()
        msg = str(e.value)
        assert "authentication refused" in msg and repr(who) in msg and "\n" not in msg
    with pytest.raises(ContractError, match="no such file"):
        SshBackend(options(sshd, tmp_path, key=str(tmp_path / "missing")))._connect()


def test_changed_host_key_always_refused(tmp_path):
    why = sshd_available()
    if why:
        pytest.skip(why)
    srv = SshServer.start(tmp_path / "sshd")
    try:
        SshBackend(options(srv, tmp_path, trust_new_host=True))._connect().close()
        remembered = srv.known_hosts.read_text()
        srv.new_host_key()
        for trust in (False, True):  # --trust-new-host never covers a changed key
            with pytest.raises(ContractError) as e:
                SshBackend(options(srv, tmp_path, trust_new_host=trust))._connect()
            assert "host key CHANGED" in str(e.value) and "\n" not in str(e.value)
        assert srv.known_hosts.read_text() == remembered
    finally:
        srv.stop()


def test_unwritable_remote_dir_refused_before_anything(sshd, tmp_path):
    run = new_run(tmp_path, "r-unwritable")
    b = SshBackend(options(sshd, tmp_path, remote_dir="/sys/socrates-test"), run_block=fake_job())
    with pytest.raises(ContractError, match="not writable"):
        b.launch(run)
    assert "pid" not in run.backend_state and "sync" not in run.backend_state


def test_nearly_full_disk_refused_before_anything(sshd, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        run = new_run(tmp_path, "r-full")
        b = SshBackend(options(sshd, tmp_path, remote_dir=str(mnt / "remote")), run_block=fake_job())
        with pytest.raises(ContractError, match=r"only 0\.00 GB free .* needs 1\.00 GB"):
            b.launch(run)
        assert "pid" not in run.backend_state
        assert not (mnt / "remote" / "runs").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --- sync ------------------------------------------------------------------------------------

def test_second_launch_sends_only_what_changed(sshd, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"x": 1}\n' * 50_000)
    opts = options(sshd, tmp_path)
    sent = []
    for i, run_id in enumerate(("r-sync1", "r-sync2", "r-sync3")):
        if i == 2:
            data.write_bytes(data.read_bytes() + b'{"x": 2}\n')  # the data changed; the code did not
        run = new_run(tmp_path, run_id, data)
        b = SshBackend(opts, run_block=fake_job(steps=1, delay=0))
        b.launch(run)
        assert b.follow(run, lambda e: None) == 0
        b.down(run)
        sent.append(run.backend_state["sync"])
    first, second, third = sent
    print("\nsync byte counts:", *(f"{k}: sent {s['bytes_sent']} B in {s['files_sent']} files, skipped "
                                   f"{s['bytes_skipped']} B" for k, s in zip(("1st", "2nd", "3rd"), sent)), sep="\n  ")
    assert first["bytes_sent"] > data.stat().st_size - 100 and first["files_sent"] > 10
    assert second["bytes_sent"] == 0 and second["files_sent"] == 0
    assert second["bytes_skipped"] == first["bytes_sent"] + first["bytes_skipped"]
    assert third["files_sent"] == 1 and third["bytes_sent"] == data.stat().st_size


# --- the lifecycle and its faults ---------------------------------------------------------------

def test_connection_killed_mid_stream_loses_and_doubles_nothing(sshd, tmp_path):
    run = new_run(tmp_path, "r-drop")
    b = SshBackend(options(sshd, tmp_path), run_block=fake_job(steps=40, delay=0.05))
    b.launch(run)
    got, kills = [], []

    def on_event(e):
        got.append(e)
        if e["event"] == "step" and e["step"] in (5, 20) and len(kills) < 2:
            kills.append(sshd.kill_sessions())  # every SSH connection dies, the job's doesn't care

    try:
        assert b.follow(run, on_event) == 0
        job_events = [e for e in got if e.get("source") != "launcher"]
        remote = ev.read_all(Path(run.backend_state["events"]))  # the host is this machine
        assert job_events == remote
        assert [e["step"] for e in job_events if e["event"] == "step"] == list(range(1, 41))
        assert all(kills) and b.reconnects >= 2 and run.backend_state["reconnects"] >= 2
        assert sum(1 for e in got if e.get("source") == "launcher") == b.reconnects
        dest = tmp_path / "pulled"
        b.download(run, dest)
        manifest.verify_or_raise(dest)
    finally:
        b.down(run)
    assert not Path(run.backend_state["work"]).exists() and not job_processes(run.id)


LAUNCHER = textwrap.dedent("""\
    import sys, pickle
    sys.path.insert(0, {tests!r})
    from sshd import FileRun
    from launcher.backends.ssh import SshBackend
    opts, block, run = pickle.load(open(sys.argv[1], 'rb'))
    b = SshBackend(opts, run_block=block)
    b.launch(run)
    b.follow(run, lambda e: print(e["event"], e.get("step", ""), flush=True))
    """)


def test_launcher_killed_mid_run_job_survives_logs_reattaches_down_cleans(sshd, tmp_path):
    import pickle

    run = new_run(tmp_path, "r-killed")
    opts = options(sshd, tmp_path)
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps((opts, fake_job(steps=60, delay=0.05), run)))
    script = tmp_path / "drive_ssh_run.py"
    script.write_text(LAUNCHER.format(tests=str(Path(__file__).parent)))
    p = subprocess.Popen([sys.executable, str(script), str(args)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in p.stdout:  # wait until the launcher is streaming steps, then kill it outright
        if line.startswith("step 3"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(10)
    assert p.returncode == -signal.SIGKILL

    reloaded = FileRun.load(run.dir)  # a fresh launcher: only run.json to go on
    b = SshBackend.from_state(reloaded.backend_state)
    assert b.machine_state(reloaded) == "up" and b._alive(reloaded.backend_state["pgid"])
    got = []
    assert b.follow(reloaded, got.append) == 0  # `logs` re-attaches from the first byte
    assert [e["step"] for e in got if e["event"] == "step"] == list(range(1, 61))
    b.down(reloaded)
    work = Path(reloaded.backend_state["work"])
    assert not work.exists() and not job_processes(run.id)
    assert b.machine_state(FileRun.load(run.dir)) == "gone"
    b.down(FileRun.load(run.dir))  # idempotent


def test_down_stops_a_running_job_and_runs_on_teardown(sshd, tmp_path):
    marker = tmp_path / "stopped"
    run = new_run(tmp_path, "r-down")
    b = SshBackend(options(sshd, tmp_path, on_teardown=f"touch {marker}"), run_block=fake_job(steps=1000, delay=0.05))
    b.launch(run)
    time.sleep(0.5)
    assert job_processes(run.id)
    b.down(run)
    assert not job_processes(run.id) and not Path(run.backend_state["work"]).exists()
    assert marker.exists() and run.backend_state["on_teardown"]["ok"] is True

    failing = new_run(tmp_path, "r-down-hook-fails")
    b2 = SshBackend(options(sshd, tmp_path, on_teardown="exit 7"), run_block=fake_job(steps=1, delay=0))
    b2.launch(failing)
    with pytest.raises(BackendError, match="--on-teardown .* exited 7"):
        b2.down(failing)
    assert failing.backend_state["on_teardown"] == {"cmd": "exit 7", "rc": 7, "ok": False, "output": ""}
    assert failing.backend_state["remote_clean"] is True and not failing.backend_state["torn_down"]


def test_secrets_travel_only_in_the_environment(sshd, tmp_path, monkeypatch):
    canary = "hf_" + "C4n4ry" * 6
    monkeypatch.setenv("HF_TOKEN", canary)
    run = new_run(tmp_path, "r-secret")
    block = 'test "$HF_TOKEN" = "' + canary + '" && echo token-seen\n' + fake_job(steps=1, delay=0)
    b = SshBackend(options(sshd, tmp_path), run_block=block.replace(canary, "$EXPECTED"))
    # the run block compares against its own env copy, so the canary is never written into a file
    b.run_block = 'test -n "$HF_TOKEN" && echo "token-seen ${#HF_TOKEN}"\n' + fake_job(steps=1, delay=0)
    b.launch(run)
    try:
        assert b.follow(run, lambda e: None) == 0
        work = Path(run.backend_state["work"])
        assert f"token-seen {len(canary)}" in (work / "job.log").read_text()
        for f in [*work.rglob("*"), *run.dir.rglob("*")]:
            if f.is_file():
                assert canary not in f.read_text(errors="replace"), f
    finally:
        b.down(run)
