"""Issue #25 (round two of hostile records and careless input), the launcher's side: destructive actions
derive their target, downloads survive a full disk, local pulls never follow links, --data folders are
walked one way, SOCRATES_RUNS_DIR is checked, status never moves an ended run backwards, runs/ is private
and the --on-teardown command is kept once, out of run.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import registry
from launcher_helpers import cli, fake_python, launcher_env, pid_alive


def _record(runs: Path, infra: str, backend_state: dict, **kw) -> registry.Run:
    os.environ["SOCRATES_RUNS_DIR"] = str(runs)
    try:
        run = registry.new_run("rec", infra, config={})
        return run.transition("provisioning", machine="up", backend_state=backend_state, **kw)
    finally:
        del os.environ["SOCRATES_RUNS_DIR"]


# --- item 1: sky cancels only a launch request SkyPilot ties to the run's cluster ----------------------

def test_sky_down_does_not_cancel_another_runs_launch_request(tmp_path, monkeypatch):
    """Run B's record holds run A's request id (an edited or copied record): `down B` must not cancel A's
    launch (A's provisioner lives on); it says which cluster the request belongs to."""
    from launcher.backends.sky import SkyBackend, cluster_name_for

    monkeypatch.setenv("FAKESKY_DIR", str(tmp_path / "cloud"))
    from fakesky import FakeSky

    a = (tmp_path / "cloud") / "socrates-run-a-launching"
    a.mkdir(parents=True)
    (a / "task.json").write_text("{}")
    provisioner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    (a / "provisioner.pid").write_text(str(provisioner.pid))
    try:
        runs = tmp_path / "runs"
        b = _record(runs, "sky", {})
        monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
        b.update(backend_state={"cluster": cluster_name_for(b.id), "request_id": f"req-{a.name}"})
        with pytest.raises(Exception) as err:
            SkyBackend(adapter=FakeSky()).down(registry.load(b.id))
        assert pid_alive(provisioner.pid), "down B cancelled run A's launch request"
        assert a.name in str(err.value) and "not cancelled" in str(err.value)
    finally:
        provisioner.kill()
        provisioner.wait(10)


def test_sky_down_cancels_its_own_launch_request(tmp_path, monkeypatch):
    from launcher.backends.sky import SkyBackend, cluster_name_for

    monkeypatch.setenv("FAKESKY_DIR", str(tmp_path / "cloud"))
    from fakesky import FakeSky

    runs = tmp_path / "runs"
    run = _record(runs, "sky", {})
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
    mine = (tmp_path / "cloud") / cluster_name_for(run.id)
    mine.mkdir(parents=True)
    (mine / "task.json").write_text("{}")
    provisioner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    (mine / "provisioner.pid").write_text(str(provisioner.pid))
    try:
        run.update(backend_state={"cluster": mine.name, "request_id": f"req-{mine.name}"})
        SkyBackend(adapter=FakeSky()).down(registry.load(run.id))
        provisioner.wait(10)  # cancelled: its process group was killed
        assert not mine.exists()
    finally:
        if provisioner.poll() is None:
            provisioner.kill()
            provisioner.wait(10)


# --- item 6: a full disk during the download -----------------------------------------------------------

def _adapter_out(out: Path, adapter_bytes: int) -> None:
    """A finished job's out/: an adapter of `adapter_bytes` and its manifest (written by the real contract)."""
    from contracts import manifest

    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(adapter_bytes))
    (out / "adapter" / "adapter_config.json").write_text('{"r": 8}\n')
    manifest.write(out, {"config": "fake"})


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (a real filesystem that fills up); skipped where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_the_download_is_one_line_and_leaves_the_machine_up(small_disk, tmp_path, monkeypatch):
    """The run's folder is on a 2 MB disk, the adapter is 3 MB: the pull fills the disk. One line says how
    much to free and how to pull again; the staging folder is gone (the disk has room again); the record
    says the download failed; the cluster is left up and the autodown that would delete the only copy is
    said loudly; no traceback."""
    import io

    from rich.console import Console

    from fakesky import FakeSky
    from launcher.backends.sky import SkyBackend, cluster_name_for
    from launcher.lifecycle import drive

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(small_disk / "runs"))
    monkeypatch.setenv("FAKESKY_DIR", str(tmp_path / "cloud"))
    run = registry.new_run("full", "sky", gpu="A100:1", config={})
    cluster = cluster_name_for(run.id)
    work = tmp_path / "cloud" / cluster / "workdir"
    _adapter_out(work / "out", 3 << 20)
    (work / "job.log").write_text("")
    (work / "exit_code").write_text("0\n")
    run.transition("provisioning", machine="up").transition("running", backend_state={"cluster": cluster, "job_id": 1})
    buf = io.StringIO()
    code = drive(run, SkyBackend(adapter=FakeSky()), Console(file=buf, width=400), launch=False)
    text = buf.getvalue()
    assert code == 1 and "Traceback" not in text, text
    line = next(ln for ln in text.splitlines() if "is full" in ln)
    assert "free at least" in line and " MB" in line
    assert f"socrates-launch download {run.id}" in text and f"socrates-launch down {run.id}" in text
    assert "autodown" in text and "deletes the results with it" in text  # the only copy's fate, said loudly
    assert not (run.dir / ".download").exists()
    rec = registry.load(run.id)
    assert rec.state == "failed" and "downloading failed" in rec.error and not rec.verified
    calls = (tmp_path / "cloud" / "calls.log").read_text()
    assert (tmp_path / "cloud" / cluster).is_dir() and "\ndown " not in "\n" + calls  # left up


# --- item 7: the local backend's pull never follows a link ----------------------------------------------

@pytest.mark.parametrize("target", ["/dev/zero", "folder"])
def test_a_local_pull_copies_links_as_links_and_never_reads_their_target(tmp_path, monkeypatch, target):
    """out/ holds a link to /dev/zero (reading it never ends) or to a big folder: the pull copies the link as
    a link, verification refuses it, and the target is never read."""
    import tempfile
    from types import SimpleNamespace

    from launcher import lifecycle
    from launcher.backends.local import OWNER_FILE, LocalBackend

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(lifecycle, "DOWNLOAD_RETRY_S", 0.0)
    run = registry.new_run("links", "local", config={})
    work = Path(tempfile.mkdtemp(prefix=f"socrates-{run.id}-"))
    try:
        (work / OWNER_FILE).write_text(run.id)
        _adapter_out(work / "out", 4096)
        if target == "folder":
            big = tmp_path / "big"
            big.mkdir()
            for i in range(20):
                (big / f"f{i}").write_bytes(b"x" * 100_000)
            (work / "out" / "adapter" / "extra").symlink_to(big)
        else:
            (work / "out" / "adapter" / "extra").symlink_to(target)
        run.transition("provisioning", machine="up").transition("running", backend_state={"workdir": str(work)})
        dest = tmp_path / "dest"
        LocalBackend().download(run, dest)
        assert (dest / "adapter" / "extra").is_symlink()  # copied as a link, its target not read
        with pytest.raises(Exception, match="symlink"):
            lifecycle.fetch_and_verify(run, LocalBackend(), lifecycle.Recorder(run, SimpleNamespace(on_event=lambda e: None)),
                                       attempts=1)
        assert not (run.dir / "adapter").exists() and not (run.dir / ".download").exists()
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


# --- item 14: SOCRATES_RUNS_DIR ---------------------------------------------------------------------

@pytest.mark.parametrize("where", ["a-file", "/proc/runs"])
def test_a_runs_dir_that_cannot_hold_runs_is_one_line_exit_2(tmp_path, where):
    runs = tmp_path / "a-file" if where == "a-file" else Path(where)
    if where == "a-file":
        runs.write_text("not a folder")
    for args in (["up", "--infra", "local", "--yes"], ["runs"], ["status"]):
        r = cli(args, launcher_env(runs))
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]  # (up shows its estimate first, on stdout)
        if args[0] == "runs" and where != "a-file":
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr  # nothing to list, nothing made
            continue
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stdout + r.stderr)
        assert "SOCRATES_RUNS_DIR" in lines[0] or "no runs under" in lines[0], lines
    assert not (tmp_path / "a-file").is_dir()


def test_a_tilde_in_the_runs_dir_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SOCRATES_RUNS_DIR", "~/my-runs")
    run = registry.new_run("tilde", "local", config={})
    assert run.dir.parent == tmp_path / "home" / "my-runs" and (tmp_path / "home" / "my-runs" / run.id).is_dir()
    assert not Path("~").exists()


# --- item 17: status on a stale copy never moves an ended run backwards --------------------------------

def test_status_on_a_stale_copy_never_marks_a_done_run_failed(tmp_path, monkeypatch):
    """`status` read the run while it was downloading; meanwhile `up` finished it (done, verified). The
    machine is gone now: status's write must not put 'machine gone while the run was live' into it."""
    from launcher.verbs.status import reconcile

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    ups = registry.new_run("stale", "local", config={})
    ups.transition("provisioning", machine="up").transition("running").transition("downloading")
    stale = registry.load(ups.id)  # what status read
    ups.transition("done", adapter="/x/adapter", verified=True)

    class Gone:
        def machine_state(self, run):
            return "gone"

    reconcile(stale, Gone())
    rec = json.loads((ups.dir / "run.json").read_text())
    assert rec["state"] == "done" and rec["verified"] is True and rec["error"] is None, rec
    assert [h["state"] for h in rec["history"]][-1] == "done"


# --- item 18: runs/ is private; the teardown hook is kept once, out of run.json -----------------------

def test_runs_folders_are_0700_and_run_json_0600(tmp_path, monkeypatch):
    import stat

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    run = registry.new_run("private", "local", config={})
    run.update(machine="up")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "runs") == 0o700 and mode(run.dir) == 0o700 and mode(run.path) == 0o600


def test_the_teardown_command_is_not_in_run_json_and_is_never_run_from_the_record(tmp_path):
    """`up --on-teardown CMD` (the command may hold a provider token): run.json never holds it; `down` without
    it does not run it (it says how to pass it again, naming it); `down --on-teardown CMD` runs it."""
    pytest.importorskip("paramiko")
    token = "prov" + "TOKEN" * 6
    marker = tmp_path / "stopped"
    hook = f"touch {marker} # {token}"
    runs = tmp_path / "runs"
    env = launcher_env(runs)
    # the host is unreachable (port 1): up fails at preflight before a run exists ...
    r = cli(["up", "--infra", "ssh://root@127.0.0.1:1", "--allow-cpu", "--yes",
             "--on-teardown", hook], env)
    assert r.returncode == 2 and not any(runs.glob("*/run.json")), r.stdout + r.stderr
    # ... so the launched state is made the way the backend makes it: launch's first save, then a failure
    os.environ["SOCRATES_RUNS_DIR"] = str(runs)
    try:
        from launcher.backends.ssh import SshBackend

        run = registry.new_run("hook", "ssh://root@127.0.0.1:1", config={})
        b = SshBackend("ssh://root@127.0.0.1:1", on_teardown=hook, reconnect_s=0.2, allow_cpu=True)
        with pytest.raises(Exception):
            b.launch(run)
    finally:
        del os.environ["SOCRATES_RUNS_DIR"]
    assert token not in (run.dir / "run.json").read_text()
    r = cli(["down", run.id], env)
    assert r.returncode == 1 and not marker.exists(), r.stdout
    assert token not in (run.dir / "run.json").read_text()
    r = cli(["down", run.id, "--on-teardown", hook], env)
    assert marker.exists(), r.stdout + r.stderr
    assert token not in (run.dir / "run.json").read_text()


# --- items 10, 16: a --data folder is walked one way; links are refused before anything exists -----------

def _rows(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        row = {"study_id": f"s{i}", "condition_num": 0, "task_num": 0, "response": 3, "prompt": f"row {i}"}
        (folder / f"part-{i}.jsonl").write_text(json.dumps(row) + "\n")


@pytest.mark.parametrize("link", ["subfolder", "loop", "file"])
def test_a_data_folder_with_a_link_is_refused_before_a_run_exists(tmp_path, link):
    """A linked subfolder (the row check and the data hash used to skip it while the copy followed it: the
    run trained to the end, then failed 'given other data'), a link loop, a linked file: one line, exit 2,
    no run record."""
    data = tmp_path / "mydata"
    _rows(data)
    elsewhere = tmp_path / "elsewhere"
    _rows(elsewhere / "more")
    if link == "subfolder":
        (data / "more").symlink_to(elsewhere / "more")
    elif link == "loop":
        (data / "again").symlink_to(data)
    else:
        (data / "extra.jsonl").symlink_to(elsewhere / "more" / "part-0.jsonl")
    runs = tmp_path / "runs"
    r = cli(["up", "--infra", "local", "--yes", "--data", str(data)], launcher_env(runs, fake_python(tmp_path)),
            timeout=300)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout + r.stderr)[-2000:]
    assert "symbolic link" in lines[-1] and "--data" in lines[-1], lines
    assert not list(runs.glob("*/run.json"))


def test_the_row_check_the_hash_and_the_copy_see_the_same_files(tmp_path):
    """A nested folder of plain files: the rows counted, the files hashed and the files the local backend
    copies are the same set (an independent walk of the folder is the reference)."""
    from contracts import manifest
    from launcher.rows import check_local

    data = tmp_path / "mydata"
    _rows(data)
    _rows(data / "nested" / "deeper", 2)
    want = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jsonl"))
    assert [f.relative_to(data).as_posix() for f in manifest.data_files(data)] == want
    assert check_local(data) == 5
