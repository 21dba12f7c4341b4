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
import threading
from pathlib import Path

import pytest

from conftest import wait_until
from contracts import events as ev
from contracts import manifest
from contracts.errors import ContractError
from launcher.backends.base import BackendError
from contracts.config import load_config
from launcher import registry
from launcher.backends.ssh import SshBackend
from launcher.ssh_options import parse_infra
from sshd import PYTHON, REPO, SshServer, sshd, sshd_available  # noqa: F401

pytestmark = pytest.mark.ssh

# Writes STEPS step events (one every DELAY s), then an adapter and a manifest, like the job.
FAKE_JOB = textwrap.dedent("""\
    python - <<'PY'
    import os, time
    from pathlib import Path
    from contracts import events, manifest
    out = Path(os.environ["OUT"]); w = events.EventWriter(out / "events.jsonl", echo=True)
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


def backend(srv: SshServer, tmp: Path, run_block: str | None = None, infra: str | None = None, **kw) -> SshBackend:
    opts = dict(key=str(srv.client_key), known_hosts=str(srv.known_hosts), trust_new_host=True, allow_cpu=True,
                remote_python=PYTHON, remote_dir=str(tmp / "remote"), poll_s=0.1)
    opts.update(kw)
    return SshBackend(infra or f"ssh://root@127.0.0.1:{srv.port}", run_block=run_block, **opts)


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))


def new_run(srv: SshServer, name: str, data: Path | None = None) -> registry.Run:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    if data is not None:
        cfg = cfg.with_overrides({"data.source": str(data)})
    return registry.new_run(name, f"ssh://root@127.0.0.1:{srv.port}", config=cfg.to_dict())


def log_events(run: registry.Run) -> list[dict]:
    return ev.read_all(Path(run.backend_state["log"]))  # the host is this machine


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
    b = backend(sshd, tmp_path, known_hosts=str(kh), trust_new_host=False)
    with pytest.raises(ContractError, match="not in .*--trust-new-host"):
        b._connect()
    assert not kh.exists()
    backend(sshd, tmp_path, known_hosts=str(kh), trust_new_host=True)._connect().close()
    assert kh.read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
    # remembered: no --trust-new-host needed the second time
    backend(sshd, tmp_path, known_hosts=str(kh), trust_new_host=False)._connect().close()


def test_wrong_key_and_wrong_user_refused_one_line(sshd, tmp_path):
    from sshd import keygen

    other = keygen(tmp_path / "other_key")
    for kw, who in ((dict(key=str(other)), "root"), (dict(infra=f"ssh://nobody@127.0.0.1:{sshd.port}"), "nobody")):
        with pytest.raises(ContractError) as e:
            backend(sshd, tmp_path, **kw)._connect()
        msg = str(e.value)
        assert "authentication refused" in msg and repr(who) in msg and "\n" not in msg
    with pytest.raises(ContractError, match="no such file"):
        backend(sshd, tmp_path, key=str(tmp_path / "missing"))._connect()


def test_changed_host_key_always_refused(tmp_path):
    why = sshd_available()
    if why:
        pytest.skip(why)
    srv = SshServer.start(tmp_path / "sshd")
    try:
        backend(srv, tmp_path, trust_new_host=True)._connect().close()
        remembered = srv.known_hosts.read_text()
        srv.new_host_key()
        for trust in (False, True):  # --trust-new-host never covers a changed key
            with pytest.raises(ContractError) as e:
                backend(srv, tmp_path, trust_new_host=trust)._connect()
            assert "host key CHANGED" in str(e.value) and "\n" not in str(e.value)
        assert srv.known_hosts.read_text() == remembered
    finally:
        srv.stop()


def test_unwritable_remote_dir_refused_before_anything(sshd, tmp_path):
    run = new_run(sshd, "unwritable")
    b = backend(sshd, tmp_path, fake_job(), remote_dir="/sys/socrates-test")
    with pytest.raises(ContractError, match="not writable") as e:
        b.preflight(load_config(REPO / "configs" / "smoke.yaml"))
    assert "\n" not in str(e.value)
    with pytest.raises(ContractError, match="not writable"):
        b.launch(run)
    assert "pid" not in run.backend_state and "sync" not in run.backend_state


def test_nearly_full_disk_refused_before_anything(sshd, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        run = new_run(sshd, "full")
        b = backend(sshd, tmp_path, fake_job(), remote_dir=str(mnt / "remote"))
        with pytest.raises(ContractError, match=r"only 0\.00 GB free .* needs 1\.00 GB"):
            b.launch(run)
        assert "pid" not in run.backend_state
        assert not (mnt / "remote" / "runs").exists() and not (mnt / "remote" / "cache").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --- sync ------------------------------------------------------------------------------------

def test_second_launch_sends_only_what_changed(sshd, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"x": 1}\n' * 50_000)
    sent = []
    for i in range(3):
        if i == 2:
            data.write_bytes(data.read_bytes() + b'{"x": 2}\n')  # the data changed; the code did not
        run = new_run(sshd, f"sync{i}", data)
        b = backend(sshd, tmp_path, fake_job(steps=1, delay=0))
        b.launch(run)
        assert b.follow(run, lambda e: None) == 0
        b.down(run)
        sent.append(registry.load(run.id).backend_state["sync"])
    first, second, third = sent
    print("\nsync byte counts:", *(f"{k}: sent {s['bytes_sent']} B in {s['files_sent']} files, skipped "
                                   f"{s['bytes_skipped']} B" for k, s in zip(("1st", "2nd", "3rd"), sent)), sep="\n  ")
    assert first["bytes_sent"] > data.stat().st_size - 100 and first["files_sent"] > 10
    assert second["bytes_sent"] == 0 and second["files_sent"] == 0
    assert second["bytes_skipped"] == first["bytes_sent"] + first["bytes_skipped"]
    assert third["files_sent"] == 1 and third["bytes_sent"] == data.stat().st_size


# --- the lifecycle and its faults ---------------------------------------------------------------

@pytest.mark.slow
def test_connection_killed_mid_stream_loses_and_doubles_nothing(sshd, tmp_path):
    run = new_run(sshd, "drop")
    # 0.15 s a step: the job is still writing when each drop comes, even with the follower lagging on busy
    # cores (with the whole stream already in the pipe's buffer, a drop would need no reconnect)
    b = backend(sshd, tmp_path, fake_job(steps=40, delay=0.15))
    phases = []
    b.on_phase = lambda name, detail=None: phases.append(name)
    b.launch(run)
    got, kills = [], []

    def on_event(e):
        got.append(e)
        if e["event"] == "step" and e["step"] in (5, 20):
            kills.append(sshd.kill_sessions())  # every SSH connection dies; the detached job doesn't care
        if e["event"] == "step" and e["step"] == 30:
            sshd.stop()  # the whole server goes away (connections refused) and comes back 1.5 s later
            threading.Timer(1.5, sshd._spawn).start()

    try:
        assert b.follow(run, on_event) == 0
        assert got == log_events(run)
        assert [e["step"] for e in got if e["event"] == "step"] == list(range(1, 41))
        assert len(kills) == 2 and all(kills) and b.reconnects >= 3 and run.backend_state["reconnects"] >= 3
        assert phases.count("reconnecting") == b.reconnects
        dest = tmp_path / "pulled"
        b.download(run, dest)
        manifest.verify_or_raise(dest)
    finally:
        b.down(run)
    assert not Path(run.backend_state["work"]).exists() and not job_processes(run.id)


LAUNCHER = textwrap.dedent("""\
    import json, sys
    from launcher import registry
    from launcher.backends.ssh import SshBackend
    opts, block, run_id = json.load(open(sys.argv[1]))
    run = registry.load(run_id)
    b = SshBackend(opts.pop("infra"), run_block=block, **opts)
    b.launch(run)
    b.follow(run, lambda e: print(e["event"], e.get("step", ""), flush=True))
    """)


def test_launcher_killed_mid_run_job_survives_logs_reattaches_down_cleans(sshd, tmp_path):
    import json

    run = new_run(sshd, "killed")
    opts = dict(infra=f"ssh://root@127.0.0.1:{sshd.port}", key=str(sshd.client_key), known_hosts=str(sshd.known_hosts),
                trust_new_host=True, allow_cpu=True, remote_python=PYTHON, remote_dir=str(tmp_path / "remote"), poll_s=0.1)
    args = tmp_path / "args.json"
    args.write_text(json.dumps([opts, fake_job(steps=60, delay=0.05), run.id]))
    script = tmp_path / "drive_ssh_run.py"
    script.write_text(LAUNCHER)
    p = subprocess.Popen([sys.executable, str(script), str(args)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in p.stdout:  # wait until the launcher is streaming steps, then kill it outright
        if line.startswith("step 3"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(10)
    assert p.returncode == -signal.SIGKILL

    reloaded = registry.load(run.id)  # a fresh launcher: only run.json to go on
    b = SshBackend(reloaded.infra)  # no options: they come back from the run record
    assert b.machine_state(reloaded) == "up" and b._alive(reloaded.id)
    got = []
    assert b.follow(reloaded, got.append) == 0  # re-attached from the first byte
    assert [e["step"] for e in got if e["event"] == "step"] == list(range(1, 61))
    b.down(reloaded)
    assert not Path(reloaded.backend_state["work"]).exists() and not job_processes(run.id)
    again = registry.load(run.id)
    assert b.machine_state(again) == "gone"
    b.down(again)  # idempotent


def test_down_stops_a_running_job_and_runs_on_teardown(sshd, tmp_path):
    marker = tmp_path / "stopped"
    run = new_run(sshd, "down")
    b = backend(sshd, tmp_path, fake_job(steps=1000, delay=0.05), on_teardown=f"touch {marker}")
    b.launch(run)
    wait_until(lambda: job_processes(run.id), 10, what="the job running on the host")
    b.down(run)
    assert not job_processes(run.id) and not Path(run.backend_state["work"]).exists()
    assert marker.exists() and run.backend_state["on_teardown"]["ok"] is True
    assert run.backend_state["torn_down"] is True

    failing = new_run(sshd, "down-hook-fails")
    b2 = backend(sshd, tmp_path, fake_job(steps=1, delay=0), on_teardown="echo provider says no; exit 7")
    b2.launch(failing)
    with pytest.raises(BackendError, match="--on-teardown .* exited 7: provider says no"):
        b2.down(failing)
    hook = registry.load(failing.id).backend_state["on_teardown"]
    assert (hook["rc"], hook["ok"]) == (7, False)
    assert failing.backend_state["remote_clean"] is True and failing.backend_state["torn_down"] is False


def test_secrets_travel_only_in_the_environment(sshd, tmp_path, monkeypatch):
    canary = "hf_" + "C4n4ry" * 6
    monkeypatch.setenv("HF_TOKEN", canary)
    run = new_run(sshd, "secret")
    # the job shows it got the token by printing its length only
    b = backend(sshd, tmp_path, 'echo "token-seen ${#HF_TOKEN}"\n' + fake_job(steps=1, delay=0))
    b.launch(run)
    try:
        assert b.follow(run, lambda e: None) == 0
        work = Path(run.backend_state["work"])
        assert f"token-seen {len(canary)}" in (work / "job.log").read_text()
        for f in [*work.rglob("*"), *run.dir.rglob("*"), *(tmp_path / "remote").rglob("*")]:
            if f.is_file():
                assert canary not in f.read_text(errors="replace"), f
    finally:
        b.down(run)


def test_down_finds_the_job_from_the_host_when_the_launcher_died_before_saving_its_pid(sshd, tmp_path):
    run = new_run(sshd, "no-pid")
    b = backend(sshd, tmp_path, fake_job(steps=1000, delay=0.05))
    b.launch(run)
    wait_until(lambda: job_processes(run.id), 10, what="the job running on the host")
    for key in ("pid", "pgid"):  # as if killed between starting the job and writing run.json
        run.backend_state.pop(key)
    SshBackend(run.infra).down(run)
    assert not job_processes(run.id) and not Path(run.backend_state["work"]).exists()


def test_connection_dying_during_launch_is_a_backend_error_and_down_cleans(sshd, tmp_path):
    run = new_run(sshd, "launch-drop")
    b = backend(sshd, tmp_path, fake_job(steps=1000, delay=0.05))
    b.on_phase = lambda name, detail=None: sshd.kill_sessions() if name == "syncing" else None
    with pytest.raises(BackendError, match="provisioning: ssh root@127.0.0.1"):
        b.launch(run)
    b.down(run)
    assert run.backend_state["torn_down"] and not Path(run.backend_state["work"]).exists()
    assert not job_processes(run.id)


# A stand-in `docker` on the host's PATH: records its argv, then runs what the container would
# (the run script in the mounted folder), so the docker path of the backend runs for real here.
FAKE_DOCKER = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> {log}
case "$1" in
  image|build|rm) exit 0 ;;
  run) shift; src=""; ep=""; rest=(); keep=()
    while [ $# -gt 0 ]; do
      case "$1" in
        -v) [[ "$2" == *:/work ]] && src="${{2%:/work}}"; shift 2 ;;
        -e) if [[ "$2" == *=* ]]; then keep+=("$2"); else keep+=("$2=${{!2}}"); fi; shift 2 ;;
        -w|--name|--gpus) shift 2 ;;
        --entrypoint) ep="$2"; shift 2 ;;
        --rm) shift ;;
        *) rest+=("$1"); shift ;;
      esac
    done
    # like a container: only the -e variables get in (plus PATH/HOME to find the host's tools)
    cd "$src" && if [ "$ep" = bash ]; then exec env -i PATH="$PATH" HOME="$HOME" "${{keep[@]}}" bash "${{rest[@]:1}}"
    else exec env -i PATH="$PATH" HOME="$HOME" "${{keep[@]}}" python -m job "${{rest[@]:1}}"; fi ;;
esac
exit 1
"""


def test_docker_path_when_the_host_has_docker_and_a_gpu(tmp_path, monkeypatch):
    why = sshd_available()
    if why:
        pytest.skip(why)
    bin_dir, log = tmp_path / "hostbin", tmp_path / "docker-argv.log"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER.format(log=log))
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (fake)'\n")
    for tool in ("docker", "nvidia-smi"):
        (bin_dir / tool).chmod(0o755)
    path = f"{bin_dir}:{Path(PYTHON).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    srv = SshServer.start(tmp_path / "sshd", extra_config=f"SetEnv PATH={path}\n")
    canary = "hf_" + "D0ckerCanary" * 3
    monkeypatch.setenv("HF_TOKEN", canary)
    try:
        run = new_run(srv, "docker")
        # min_free_gb: the GPU default (60 GB) is about the real job; this host's disk is not under test
        b = backend(srv, tmp_path, 'echo "token-seen ${#HF_TOKEN}"\n' + fake_job(steps=3, delay=0), remote_python=None,
                    allow_cpu=False, min_free_gb=0.01)
        b.launch(run)
        assert run.backend_state["mode"] == "docker"
        assert b.follow(run, lambda e: None) == 0
        work = Path(run.backend_state["work"])
        assert f"token-seen {len(canary)}" in (work / "job.log").read_text()  # the job got the secret
        assert not (work / ".secrets.env").exists()  # from a 0600 file the container removed before the job
        b.down(run)
        calls = log.read_text()
        run_line = next(line for line in calls.splitlines() if line.startswith("run "))
        assert "--gpus all" in run_line and "socrates-launch-job:latest" in run_line and f"--name socrates-{run.id}" in run_line
        # the secret is neither in argv nor a docker -e (whose value `docker inspect` would show)
        assert "HF_TOKEN" not in run_line and canary not in calls
        assert calls.splitlines()[0].startswith("image inspect socrates-launch-job:latest")
        assert f"rm -f socrates-{run.id}" in calls  # teardown removes the container too
        assert not Path(run.backend_state["work"]).exists()
    finally:
        srv.stop()


def test_host_unreachable_follow_fails_loudly_and_down_says_how_then_cleans_later(tmp_path):
    why = sshd_available()
    if why:
        pytest.skip(why)
    srv = SshServer.start(tmp_path / "sshd")
    marker = tmp_path / "provider-stopped"
    try:
        run = new_run(srv, "unreachable")
        b = backend(srv, tmp_path, fake_job(steps=1000, delay=0.05), reconnect_s=1.0, on_teardown=f"touch {marker}")
        b.launch(run)
        srv.stop()  # the host vanishes mid-run
        with pytest.raises(BackendError, match=r"running: lost root@127\.0\.0\.1:\d+ for 1 s .*socrates-launch down"):
            b.follow(run, lambda e: None)
        with pytest.raises(BackendError, match=r"could not reach .* End it: ssh -p \d+ root@127\.0\.0\.1 'pg=\$\(cat .*/job\.pid\)"):
            b.down(run)
        # the provider's stop command ran anyway (it is what stops the billing), and is not repeated
        assert marker.exists() and run.backend_state["on_teardown"]["ok"] and not run.backend_state["torn_down"]
        marker.unlink()
        srv._spawn()  # the host is back: `down` again finishes the job off
        b.down(run)
        assert run.backend_state["torn_down"] and not Path(run.backend_state["work"]).exists()
        assert not job_processes(run.id) and not marker.exists()
    finally:
        srv.stop()
