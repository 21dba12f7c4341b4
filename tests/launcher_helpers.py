"""Shared by the launcher tests: run the real CLI in a subprocess with a fake job interpreter."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, run_cli

# A fake HF_TOKEN that must never show up anywhere; built at run time so no credential-shaped
# literal is committed (secret scanners would flag it).
CANARY = "hf_" + "CANARYcanary" * 3

FAKEJOB = REPO / "tests" / "fakejob.py"


def fake_python(tmp: Path) -> Path:
    """An executable that behaves like `python -m job VERB ...` but runs tests/fakejob.py."""
    exe = tmp / "fakepython"
    exe.write_text(
        "#!/usr/bin/env bash\n# fakepython -m job VERB ...: the fake job; any other module (job.deadline): real python\n"
        f'if [ "$1 $2" != "-m job" ]; then exec "{sys.executable}" "$@"; fi\n'
        f'shift 2\nexec "{sys.executable}" "{FAKEJOB}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def launcher_env(runs: Path, job_python: Path | None = None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKEJOB_", "SOCRATES_"))}
    env.update({"SOCRATES_RUNS_DIR": str(runs), "PYTHONPATH": str(REPO), "COLUMNS": "120"})
    if job_python is not None:
        env["SOCRATES_JOB_PYTHON"] = str(job_python)
    env.update(extra)
    return env


def fakesky_env(tmp: Path, job_python: Path | None = None, *, cloud: str | None = None, **extra: str) -> dict:
    """The environment of a launcher whose SkyPilot is tests/fakesky.py: runs in tmp/runs, a HOME (tmp/home)
    with the offline price catalog and no cloud credentials, the fake's state in `cloud` (tmp/cloud)."""
    from skyfix import seed_catalog

    home = tmp / "home"
    seed_catalog(home)
    return launcher_env(tmp / "runs", job_python, HOME=str(home), SOCRATES_SKY_ADAPTER="fakesky:FakeSky",
                        FAKESKY_DIR=cloud or str(tmp / "cloud"), PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
                        **extra)


def fake_clusters(env: dict) -> list[Path]:
    """The clusters up in the fake cloud of `env` (tests/fakesky.py: one folder each)."""
    root = Path(env["FAKESKY_DIR"])
    return [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []


def fake_calls(env: dict) -> list[str]:
    """What the fake cloud of `env` was asked, in order ("launch <cluster>", "rsync <cluster>", "down ...")."""
    path = Path(env["FAKESKY_DIR"]) / "calls.log"
    return path.read_text().split("\n") if path.is_file() else []


@contextlib.contextmanager
def fake_managed_cloud(tmp: Path):
    """fakesky_env with the fake job; afterwards every managed job of the fake controller is cancelled,
    whatever the test did (nothing of ours left running)."""
    env = fakesky_env(tmp, fake_python(tmp))
    yield env
    import fakesky

    os.environ["FAKESKY_DIR"] = env["FAKESKY_DIR"]
    try:
        for jdir in (tmp / "cloud" / "jobs").glob("*"):
            fakesky.FakeSky().jobs_cancel(int(jdir.name))
    finally:
        del os.environ["FAKESKY_DIR"]


def cli(args: list[str], env: dict, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_cli(args, env, cwd=cwd, timeout=timeout)


def cli_here(args: list[str], runs: Path, capsys, monkeypatch, cwd: Path = REPO, **extra: str) -> subprocess.CompletedProcess:
    """The CLI's main(args) in this process, for the many refusals where a process of its own proves nothing
    more (tests of each verb family still run the real entry point as a process): the environment as
    launcher_env makes it and the folder `cwd` (monkeypatch restores both), stdout and stderr captured, the
    exit code returned. SkyPilot must stay out of the tests' process (it keeps HOME's paths from its import)."""
    from launcher.cli import main

    monkeypatch.chdir(cwd)

    for key in [k for k in os.environ if k.startswith(("FAKEJOB_", "SOCRATES_"))]:
        monkeypatch.delenv(key)
    for key, value in {"SOCRATES_RUNS_DIR": str(runs), "COLUMNS": "120", **extra}.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()  # what came before is not this command's
    sky_before = "sky" in sys.modules  # another test in this worker may have imported it (task rendering)
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own exits (usage errors, --help)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    assert sky_before or "sky" not in sys.modules, f"{args} imported SkyPilot into the tests' process: run it with cli()"
    return subprocess.CompletedProcess(["socrates-launch", *args], code, out.out, out.err)


def default_signals() -> None:
    """In the child before exec: the signals the tests send get their default dispositions, since a
    suite started with SIGINT ignored (nohup, `&`, some CI wrappers) would pass that on and Python
    keeps an ignored SIGINT ignored, so Ctrl-C would never reach the launcher."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def spawn(args: list[str], env: dict, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=default_signals)


def only_run(runs: Path) -> dict:
    found = list(runs.glob("*/run.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def wait_for_state(runs: Path, states: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in runs.glob("*/run.json"):
            try:
                rec = json.loads(p.read_text())
            except ValueError:
                continue
            if rec["state"] in states:
                return rec
        time.sleep(0.05)
    raise AssertionError(f"no run reached {states} in {timeout} s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def assert_machine_gone(rec: dict) -> None:
    """A local run's 'machine' (its work folder and the job's process group) is gone."""
    workdir = rec["backend_state"].get("workdir")
    assert workdir and not Path(workdir).exists(), f"local machine dir left behind: {workdir}"
    assert not pid_alive(rec["backend_state"]["pgid"]), "job process left running"


def no_secret_anywhere(root: Path) -> None:
    """CANARY (the fake HF_TOKEN) is in no file under `root`."""
    for path in root.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), f"secret leaked into {path}"
