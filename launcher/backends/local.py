"""The local backend: a temp directory stands in for the machine (the embedded default, `make demo`).

Same lifecycle as the cloud: copy code and data in, run the rendered `run:` block with bash in its
own process group (it survives the launcher, like a remote job), follow the events it prints, copy
the artifacts back, then kill the process group and delete the directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contracts import remote
from contracts.events import EventReader
from contracts.manifest import data_files
from launcher import stage as stagelib
from launcher import task as tasklib
from launcher.backends.base import Backend, BackendError, EventCallback
from launcher.registry import Run

OWNER_FILE = ".socrates-run"
EXIT_FILE = "exit_code"
LOG_FILE = "job.log"


class LocalBackend(Backend):
    name = "local"
    HANDLES = ("workdir", "pgid")
    CTRL_C_STOPS = True

    def __init__(self, poll_s: float = 0.2, python: str | None = None):
        self.poll_s = poll_s
        # SOCRATES_JOB_PYTHON picks the interpreter that runs the job (a venv with the job deps).
        self.python = python or os.environ.get("SOCRATES_JOB_PYTHON") or sys.executable

    # --- lifecycle ---------------------------------------------------------------------------

    def launch(self, run: Run) -> None:
        workdir = Path(tempfile.mkdtemp(prefix=f"socrates-{run.id}-"))
        (workdir / OWNER_FILE).write_text(run.id, encoding="utf-8")  # `down` deletes only a folder that says so
        # Saved before anything runs, so `down` can always find and remove it.
        run.update(backend_state={"workdir": str(workdir)}, machine="up")
        self.on_phase("syncing", f"code and data into {workdir}")
        try:
            # the run's staged folder (launcher/stage.py), as SkyPilot and the SSH backend ship it
            shutil.copytree(stagelib.for_run(run).path, workdir, dirs_exist_ok=True)
            data_path = tasklib.local_data(run.config)
            overrides = {"JOB_PYTHON": self.python}
            if data_path is not None:
                dest = workdir / "data" / data_path.name
                if data_path.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                for f in data_files(data_path):  # the walk the row check and the data hash use (no links)
                    target = dest / f.relative_to(data_path) if f != data_path else dest
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target, follow_symlinks=False)
                overrides["DATA"] = str(dest.relative_to(workdir))
            task = tasklib.render(run, gpu=None)
            (workdir / "run.sh").write_text(tasklib.run_script(task, **overrides), encoding="utf-8")
        except OSError as e:
            raise BackendError("syncing", f"copying code and data into {workdir}: {e}") from None
        wrapper = f"bash run.sh > {LOG_FILE} 2>&1; echo $? > {EXIT_FILE}.tmp; mv {EXIT_FILE}.tmp {EXIT_FILE}"
        # SOCRATES_RUN_ID marks every process of the job: `down` kills a process group only if it carries it.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(workdir), "SOCRATES_RUN_ID": run.id}
        proc = subprocess.Popen(["bash", "-c", wrapper], cwd=workdir, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run.update(backend_state={**run.backend_state, "pid": proc.pid, "pgid": proc.pid})

    def follow(self, run: Run, on_event: EventCallback) -> int:
        workdir = Path(run.backend_state["workdir"])
        reader = EventReader(workdir / LOG_FILE)
        odd = None  # an exit_code file that holds no exit status: not the end (the wrapper writes the real one)
        while True:
            code, text = _exit_code(workdir / EXIT_FILE)
            for ev in reader.read_new():
                on_event(ev)
            if code is not None:
                for ev in reader.read_new():
                    on_event(ev)
                return code
            if text is not None and text != odd:
                odd = text
                remote.skipped.note(f"an {EXIT_FILE} file holding {text[:20]!r}, not an exit status")
            if not workdir.is_dir() or not _alive(run.backend_state.get("pgid")):
                if _exit_code(workdir / EXIT_FILE)[0] is not None:
                    continue
                left = f"left {EXIT_FILE} holding {odd[:20]!r}" if odd is not None else "left no exit code"
                raise BackendError("running", f"the job's process group is gone and {left} ({workdir})")
            time.sleep(self.poll_s)

    def log_lines(self, run: Run, max_bytes: int = 1 << 20) -> list[str]:
        """The job's output (its last MiB: a job that printed gigabytes costs a MiB here)."""
        path = Path(run.backend_state.get("workdir", "/nonexistent")) / LOG_FILE
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                data = f.read(max_bytes)
        except FileNotFoundError:
            return []
        return data.decode("utf-8", errors="replace").splitlines()

    def download(self, run: Run, dest: Path) -> None:
        src = Path(run.backend_state.get("workdir", "/nonexistent")) / "out"
        if src.is_symlink() or not src.is_dir():
            raise BackendError("downloading", f"{src}: the job left no output folder")
        _copy_out(src, Path(dest), skip=("checkpoints",))

    def down(self, run: Run) -> None:
        """Kill the job's process group and delete its folder, each only if it is this run's (run.json is
        not the authority: a pid is reused, a record can be edited)."""
        pgid = run.backend_state.get("pgid")
        if pgid and _alive(pgid) and _group_of_run(int(pgid), run.id):
            _kill_group(pgid)
        workdir = run.backend_state.get("workdir")
        if workdir and os.path.lexists(workdir):
            if not _own_workdir(Path(workdir), run.id):
                raise BackendError("down", f"{workdir} is not run {run.id}'s folder (not a socrates-{run.id}-* "
                                           f"folder in {tempfile.gettempdir()} holding {OWNER_FILE}): not deleted")
            shutil.rmtree(workdir, ignore_errors=True)

    def left_up_ends_by(self, run: Run) -> str | None:
        return "it is a folder on this machine (nothing is billed) and stays until `down`"

    def machine_state(self, run: Run) -> str:
        workdir = run.backend_state.get("workdir")
        if _alive(run.backend_state.get("pgid")) or (workdir and Path(workdir).exists()):
            return "up"
        return "gone"

    def launch_submitted(self, run: Run) -> bool:
        return bool(run.backend_state.get("pid"))


def _copy_out(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the job's out/ without following anything: a link is copied as a link (verification then
    refuses it; its target is never read), a regular file is copied, anything else (a FIFO, a device)
    fails the pull unread."""
    dest.mkdir(parents=True, exist_ok=True)
    with os.scandir(src) as entries:
        for entry in entries:
            if entry.name in skip:
                continue
            target = dest / entry.name
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
            elif entry.is_dir(follow_symlinks=False):
                _copy_out(Path(entry.path), target)
            elif entry.is_file(follow_symlinks=False):
                shutil.copy2(entry.path, target, follow_symlinks=False)
            else:
                raise BackendError("downloading", f"{entry.path}: not a regular file, folder or link (not accepted "
                                                  f"in what comes back)")


def _exit_code(path: Path) -> tuple[int | None, str | None]:
    """(the exit status in the job's exit_code file, or None; the file's text, None when there is none)."""
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode("utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None, None
    return remote.exit_code(text), text


def _own_workdir(workdir: Path, run_id: str) -> bool:
    """A real folder (not a link) named socrates-<run id>-* directly in the temp dir, marked with the run id."""
    try:
        if workdir.is_symlink() or not workdir.is_dir():
            return False
        if workdir.parent.resolve() != Path(tempfile.gettempdir()).resolve():
            return False
        marker = workdir / OWNER_FILE
        return (workdir.name.startswith(f"socrates-{run_id}-") and not marker.is_symlink()
                and marker.read_text(encoding="utf-8").strip() == run_id)
    except OSError:
        return False


def _members(pgid: int) -> list[Path] | None:
    """The /proc folders of the live (non-zombie) processes in group `pgid`; None where there is no /proc
    (macOS). Zombies, unreaped by an absent parent, don't count."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    found = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(stat.parent)
        except (OSError, IndexError, ValueError):
            continue
    return found


def _group_of_run(pgid: int, run_id: str) -> bool:
    """Whether a live process of group `pgid` carries SOCRATES_RUN_ID=<run_id> in its environment."""
    members = _members(pgid)
    if members is None:  # the group's identity can't be read; the record is all there is
        return True
    want = f"SOCRATES_RUN_ID={run_id}".encode()
    for member in members:
        try:
            if want in (member / "environ").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return False


def _alive(pgid: int | None) -> bool:
    """Whether any live (non-zombie) process is left in the job's process group."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = _members(pgid)
    return members is None or bool(members)  # without /proc, killpg's answer is all there is


def _kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the job's process group, then SIGKILL whatever is left after `grace_s`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)  # reap our own child, if it is ours
        if not _alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
