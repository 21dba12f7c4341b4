"""Issue 25, "one reader for everything a machine sends": what comes back is data, never a command,
and never the end of a healthy job. Items 3, 4, 5, 11, 12, 13 and 15 of the issue, each driven
through the real reader, backend or verb; acceptance 3 through `up --infra local` with a job that
sends every hostile line. The property-based fuzz of the same readers is tests/test_remote_fuzz.py.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, one_line
from contracts import events, remote
from contracts.errors import ContractError
from contracts.events import LINE_PREFIX

STEP = ('{"v":1,"event":"step","ts":1.0,"step":1,"total_steps":5,"epoch":0.2,"loss":1.0,"lr":0.001,'
        '"tokens_per_s":1.0,"gpu_mem_gib":0.0,"eta_s":%s}')


@pytest.fixture(autouse=True)
def _fresh_count():
    remote.skipped.reset()
    yield
    remote.skipped.reset()


def _shown(*lines: str) -> str:
    """Every line through the reader and the real progress display (plain, as in a log file)."""
    from rich.console import Console

    from launcher.progress import Progress

    buf = io.StringIO()
    progress = Progress(Console(file=buf, width=200), plain=True)
    for line in lines:
        ev = events.parse_line(line)
        if ev is not None:
            progress.on_event(ev)
    progress.close()
    return buf.getvalue()


# --- item 3: one bad line never tears a healthy job down ------------------------------------------

@pytest.mark.parametrize("eta", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_a_step_with_a_non_finite_eta_is_skipped_and_counted(eta):
    line = LINE_PREFIX + STEP % eta
    assert events.parse_line(line) is None  # main: the event passed, then progress._eta raised
    assert _shown(line, LINE_PREFIX + STEP % "12.0") .count("step 1/5") == 1
    assert remote.skipped.count == 2 and "finite numbers only" in remote.skipped.summary()


def test_an_integer_of_5000_digits_is_skipped_not_a_valueerror():
    line = LINE_PREFIX + '{"v":1,"event":"log","ts":1.0,"message":"m","n":%s}' % ("7" * 5000)
    assert events.parse_line(line) is None  # main: ValueError (Python's 4,300-digit limit) escaped
    assert "an integer of 5000 digits" in remote.skipped.summary()


@pytest.mark.parametrize("kind", ["[]", "{}", "[1, 2]"])
def test_an_event_kind_that_is_a_list_or_object_is_skipped(kind):
    """Found by the fuzz: `"event": []` raised TypeError (unhashable) out of parse_line on main."""
    assert events.parse_line(LINE_PREFIX + '{"v":1,"event":%s,"ts":0.0}' % kind) is None
    assert "unknown kind" in remote.skipped.summary()


def _local_run(tmp_path: Path, pgid: int) -> SimpleNamespace:
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.log").write_text(LINE_PREFIX + '{"v":1,"event":"log","ts":1.0,"message":"hello"}\n')
    return SimpleNamespace(backend_state={"workdir": str(work), "pgid": pgid})


def test_local_an_exit_code_file_holding_a_superscript_two_is_no_status(tmp_path):
    """The job's group is gone and exit_code holds '²': a failed run said in one line (main: int('²')
    raised ValueError, a traceback, the job's folder deleted by the catch-all teardown)."""
    from launcher.backends.base import BackendError
    from launcher.backends.local import LocalBackend

    run = _local_run(tmp_path, pgid=0)
    (tmp_path / "work" / "exit_code").write_text("\u00b2\n")
    got = []
    with pytest.raises(BackendError, match="left exit_code holding '²"):
        LocalBackend(poll_s=0.01).follow(run, got.append)
    assert [e["message"] for e in got] == ["hello"]


def test_local_an_exit_code_written_by_the_job_is_waited_out_until_the_real_one(tmp_path):
    """While the job's group lives, an exit_code that is no status is not the end: the real one is."""
    from launcher.backends.local import LocalBackend

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        run = _local_run(tmp_path, pgid=proc.pid)
        exit_file = tmp_path / "work" / "exit_code"
        exit_file.write_text("\u00b2\n")
        result = {}
        follower = threading.Thread(target=lambda: result.update(code=LocalBackend(poll_s=0.01).follow(run, print)))
        follower.start()
        deadline = time.time() + 30
        while remote.skipped.count == 0 and time.time() < deadline:  # it has seen the odd file
            time.sleep(0.01)
        assert remote.skipped.count == 1 and follower.is_alive()
        exit_file.write_text("0\n")  # the wrapper's own, written when the job ends
        follower.join(timeout=30)
        assert result == {"code": 0}
    finally:
        proc.kill()
        proc.wait(timeout=10)


class _Sftp:
    """The files of a remote run folder as an SFTP client shows them (read_from's calls)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def open(self, path, mode="rb"):
        if path not in self.files:
            raise FileNotFoundError(path)
        return io.BytesIO(self.files[path])


def _ssh(files: dict[str, bytes], alive: bool):
    pytest.importorskip("paramiko")
    from launcher.backends.ssh import SshBackend

    backend = SshBackend("ssh://u@host:22", poll_s=0.01)
    backend._sftp_client = lambda: sftp
    backend._alive = lambda run_id: alive  # the host's answer to "does a process carry this run's id"
    sftp = _Sftp(files)
    run = SimpleNamespace(id="r-1", backend_state={"log": "/w/job.log", "work": "/w", "pgid": 7}, save=lambda: None)
    return backend, run


def test_ssh_an_exit_code_holding_a_superscript_two_is_no_status():
    from launcher.backends.base import BackendError

    log = (LINE_PREFIX + STEP % "Infinity" + "\n" + LINE_PREFIX + STEP % "3.0" + "\n").encode()
    backend, run = _ssh({"/w/job.log": log, "/w/exit_code": "\u00b2\n".encode()}, alive=False)
    got = []
    with pytest.raises(BackendError, match="left exit_code holding '²"):
        backend.follow(run, got.append)  # main: int('²') raised ValueError out of follow
    assert [e["eta_s"] for e in got] == [3.0] and remote.skipped.count == 2


def test_ssh_a_line_longer_than_a_read_does_not_stall_the_follower():
    """A 6 MiB line (more than one 4 MiB read): main never moved past it; the event after it arrives."""
    log = (LINE_PREFIX + "x" * (6 << 20) + "\n" + LINE_PREFIX + STEP % "3.0" + "\n").encode()
    backend, run = _ssh({"/w/job.log": log, "/w/exit_code": b"0\n"}, alive=True)
    got = []
    assert backend.follow(run, got.append) == 0
    assert [e["event"] for e in got] == ["step"] and remote.skipped.count == 1


# --- item 4: managed follow ends on a SUCCEEDED job whatever the lines --------------------------

class _ManagedSky:
    """A managed job that SUCCEEDED; every tail of its log (every reconnect) starts with a bad line."""

    def __init__(self):
        self.tails = 0

    def jobs_tail(self, job_id):
        self.tails += 1
        yield LINE_PREFIX + STEP.replace('"step":1', '"step":[1]') % "1.0"
        yield LINE_PREFIX + '{"v":1,"event":"log","ts":2.0,"message":"m","step":[1]}'  # an extra field, unhashable
        yield LINE_PREFIX + STEP % "2.0"

    def jobs_queue(self, job_id, refresh=False):
        return {"status": "SUCCEEDED", "recovery_count": 0, "job_name": "x"}


def test_managed_follow_ends_on_a_succeeded_job_whatever_its_lines(tmp_path, monkeypatch):
    from launcher import registry
    from launcher.backends.managed import ManagedBackend

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    run = registry.new_run("m", "sky", config={})
    run.update(backend_state={"job_id": 3})
    sky = _ManagedSky()
    got, result = [], {}
    follower = threading.Thread(target=lambda: result.update(
        code=ManagedBackend(adapter=sky, reconnect=(0.001, 0.001, 3600)).follow(run, got.append)), daemon=True)
    follower.start()
    follower.join(timeout=30)  # main: a TypeError (an unhashable step) on every tail, reconnecting forever
    assert result == {"code": 0}, f"still following after {sky.tails} tails"
    assert [e["event"] for e in got] == ["log", "step"] and remote.skipped.count == 1


class _FailingStream(_ManagedSky):
    """Every tail replays the same lines, then the stream drops (a line the log file can't hold, a reset)."""

    def __init__(self, status: str):
        super().__init__()
        self.status = status

    def jobs_tail(self, job_id):
        self.tails += 1
        yield "pip: installing \ud800"  # a lone surrogate: not UTF-8, so it can't be written as it is
        yield LINE_PREFIX + STEP % "2.0"
        raise ConnectionResetError("stream dropped")

    def jobs_queue(self, job_id, refresh=False):
        return {"status": self.status, "recovery_count": 0, "job_name": "x"}


@pytest.mark.parametrize("status", ["RUNNING", "SUCCEEDED"])
def test_managed_follow_lines_replayed_by_each_reconnect_are_no_progress(tmp_path, monkeypatch, status):
    """Found by the fuzz (test_remote_fuzz): any line reset the outage window, so a stream that replays its
    lines and then fails was retried forever. Now only a new line or event counts: the window runs out
    (StreamLost: detach, never a teardown)."""
    from launcher import registry
    from launcher.backends.base import StreamLost
    from launcher.backends.managed import ManagedBackend

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    run = registry.new_run("m", "sky", config={})
    run.update(backend_state={"job_id": 3})
    sky, result = _FailingStream(status), {}

    def follow():
        try:
            result["code"] = ManagedBackend(adapter=sky, reconnect=(0.01, 0.01, 0.5)).follow(run, lambda ev: None)
        except StreamLost as e:
            result["lost"] = str(e)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    follower.join(timeout=30)
    assert "ConnectionResetError" in result.get("lost", ""), f"still following after {sky.tails} tails"
    assert "\ud800" not in (tmp_path / "runs" / run.id / "job.log").read_text(errors="surrogateescape")


# --- item 5: nothing from the machine drives the terminal -----------------------------------------

HOSTILE_TEXT = ["clipboard \x1b]52;c;cm0gLXJmIH4K\x07 written", "\x1b[2J\x1b[Hscreen cleared",
                "a \x1b]8;;https://evil.example/\x1b\\link\x1b]8;;\x1b\\ to click",
                "\r\x1b[1;32madapter:\x1b[0m /tmp/evil (verified against manifest.json)", "bell\x07 \x9b31m c1"]


def test_event_text_reaches_the_terminal_without_escapes_or_control_characters():
    shown = _shown(*(LINE_PREFIX + events.dumps(events.make("log", message=m)) for m in HOSTILE_TEXT),
                   LINE_PREFIX + events.dumps(events.make("error", message="[/] \x1b]0;title\x07")))
    assert not any(c in shown for c in "\x1b\x07\r\x9b"), repr(shown)
    assert "screen cleared" in shown and "link to click" in shown and "    adapter: /tmp/evil" in shown


def test_a_phase_event_from_the_job_is_refused():
    line = LINE_PREFIX + events.dumps(events.make("phase", phase="tearing down"))
    assert events.parse_line(line) is None and "==>" not in _shown(line)
    assert "not accepted from the job" in remote.skipped.summary()


def test_the_launchers_own_record_keeps_its_phases(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(events.dumps(events.make("phase", phase="training")) + "\n")
    assert events.read_all(path) == [] and remote.skipped.count == 1  # as the job's: refused
    assert [e["phase"] for e in events.read_record(path)] == ["training"]


def test_the_tail_of_a_failed_jobs_log_is_shown_without_escapes(tmp_path):
    from rich.console import Console

    from launcher.lifecycle import _tail_log

    run = SimpleNamespace(log_path=tmp_path / "job.log")
    run.log_path.write_text("".join(m + "\n" for m in HOSTILE_TEXT))
    buf = io.StringIO()
    _tail_log(run, Console(file=buf, width=200))
    assert "screen cleared" in buf.getvalue() and not any(c in buf.getvalue() for c in "\x1b\x07\r\x9b")


# --- item 11: huge integers -------------------------------------------------------------------------

BIG = int("9" * 401)


def test_a_huge_integer_in_metrics_json_is_refused_in_one_line(tmp_path):
    """`report` on a metrics.json with a 401-digit W (main: OverflowError formatting it)."""
    from launcher_helpers import cli, launcher_env

    runs = tmp_path / "runs"
    run_dir = runs / "r-20260101-000000-abcd"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"id": run_dir.name, "infra": "local", "state": "done"}))
    (run_dir / "eval" / "metrics.json").write_text(
        '{"results": {"fine-tuned/sample": {"mode": "sample", "rows": 3, "wasserstein": %d}}}' % BIG)
    r = cli(["report", run_dir.name], launcher_env(runs))
    assert "an integer of 401 digits" in one_line(r, "metrics.json")


def test_a_huge_integer_in_a_predict_line_or_a_cell_is_refused_in_one_line(tmp_path):
    from contracts import results

    good = {"scale": [1, 3], "values": [1, 2, 3], "probs": [0.2, 0.3, 0.5], "valid_mass": 1.0, "sample": 2,
            "sample_text": "2", "human": 3, "example": 0, "prompt": "p", "prompt_tokens": 5}
    body = json.dumps(good).replace('"human": 3', f'"human": {BIG}')
    with pytest.raises(ContractError, match="an integer of 401 digits"):  # main: OverflowError
        results.parse_predict_line(results.PREDICT_PREFIX + body)
    cell = {"study_id": "s", "condition_num": 1, "task_num": 1, "scale": None, "scale_source": None, "human_n": 3,
            "w": {"base/sample": 0.5}, "skipped": {}}
    (tmp_path / "cells.jsonl").write_text(json.dumps(cell).replace("0.5", str(BIG)) + "\n")
    with pytest.raises(ContractError, match=r"\(line 1\).*an integer of 401 digits"):
        results.read_cells(tmp_path / "cells.jsonl")


def test_a_run_json_with_a_401_digit_created_at_is_one_damaged_record(tmp_path):
    """main: OverflowError in registry._number broke `runs`, `status` and `down` for every run."""
    from launcher_helpers import cli, launcher_env

    runs = tmp_path / "runs"
    for name, created in (("good-20260101-000000-abcd", "1.0"), ("huge-20260101-000001-abcd", "9" * 401)):
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(
            '{"id": "%s", "infra": "local", "state": "done", "created_at": %s}' % (name, created))
    r = cli(["runs"], launcher_env(runs))
    out = " ".join(r.stdout.split())
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert "good-20260101-000000-abcd" in out and "created_at 999" in out and "is not a number" in out
    r = cli(["status", "good-20260101-000000-abcd"], launcher_env(runs))
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("value,needle", [
    ("9" * 401, "train.lr: 999"),  # main: OverflowError in float()
    ("7" * 5000, "Exceeds the limit"),  # main: ValueError out of PyYAML's int constructor
])
def test_a_config_number_of_hundreds_of_digits_is_exit_2_one_line(tmp_path, value, needle):
    from launcher_helpers import cli, launcher_env

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  lr: {value}\n")
    r = cli(["estimate", "--config", str(cfg), "--infra", "local"], launcher_env(tmp_path / "runs"))
    line = one_line(r, needle)
    assert len(line) < 400  # the value is not printed whole


# --- item 12: a YAML alias bomb ---------------------------------------------------------------------

def _bomb() -> str:
    """train.lr: a list whose last item expands to 9**9 strings through its aliases (main repr'd it whole)."""
    items = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        items.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "train:\n  lr: [" + ", ".join(items) + "]\n"


def test_a_yaml_alias_bomb_is_refused_quickly_in_one_line(tmp_path):
    from launcher_helpers import launcher_env

    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(_bomb())
    assert len(cfg.read_bytes()) < 600  # expands to 9**9 strings
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "launcher", "estimate", "--config", str(cfg), "--infra", "local"],
                       cwd=REPO, env=launcher_env(tmp_path / "runs"), capture_output=True, text=True,
                       timeout=60)  # main: past 120 s and gigabytes (the message repr'd the value)
    line = one_line(r, "its aliases expand it past 100,000 values", str(cfg))
    assert len(line) < 400 and time.time() - start < 30


def test_anchors_that_do_not_explode_still_load_and_a_self_reference_is_refused():
    from contracts.config import safe_yaml

    assert safe_yaml("base: &b {r: 8}\nlora: *b\n") == {"base": {"r": 8}, "lora": {"r": 8}}
    with pytest.raises(ContractError, match="refers to itself"):
        safe_yaml("a: &a [1, *a]\n")


# --- item 13: long lines ----------------------------------------------------------------------------

def test_sky_join_lines_is_linear_in_a_long_line():
    """An 8 MiB line in 1 KiB chunks: main re-split the whole buffer per chunk (quadratic: minutes)."""
    from launcher.sky_adapter import join_lines

    def chunks():
        yield "before\n" + LINE_PREFIX
        for _ in range(8 << 10):
            yield "x" * 1024
        yield "\n" + LINE_PREFIX + STEP % "1.0" + "\n"
        yield None

    start = time.time()
    got = list(join_lines(chunks()))
    assert time.time() - start < 10
    assert got[0] == "before" and len(got) == 3 and len(got[1]) == remote.MAX_LINE + 1
    assert events.parse_line(got[1]) is None and events.parse_line(got[2])["eta_s"] == 1.0


def test_a_huge_line_in_the_jobs_log_costs_bounded_memory(tmp_path):
    """A 64 MiB line, then an event: main read the whole rest of the file at once (and again per poll)."""
    log = tmp_path / "job.log"
    with open(log, "wb") as f:
        f.write(LINE_PREFIX.encode() + b"y" * (64 << 20) + b"\n")
        f.write((LINE_PREFIX + STEP % "1.0" + "\n").encode())
    reader = events.EventReader(log)
    tracemalloc.start()
    try:
        got = reader.read_new()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [e["event"] for e in got] == ["step"] and reader.offset == log.stat().st_size
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert remote.skipped.count == 1


# --- item 15: a hostile launch record (job/managed.py) ---------------------------------------------

@pytest.mark.parametrize("edit,needle", [
    ({"deadline": "1e999"}, "1e999 is not accepted"),
    ({"deadline": "NaN"}, "NaN"),
    ({"deadline": "true"}, "deadline True"),
    ({"deadline": "1"}, "deadline 1 is not after the first start"),
    ({"starts": '"x"'}, "starts is not a list"),
    ({"first_start": "null"}, "first_start None"),
    ({"deadline": "0"}, "records no deadline"),
])
def test_a_hostile_launch_record_is_refused_never_extended(tmp_path, capsys, edit, needle):
    from job import managed

    state = tmp_path / "managed"
    state.mkdir()
    fields = {"launches": "1", "first_start": "1000000.0", "deadline": "1003600", "starts": "[1000001.0]", **edit}
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    (state / "launches.json").write_text(text)
    events_file = tmp_path / "events.jsonl"
    code = managed.main(["start", "--state", str(state), "--events", str(events_file), "--deadline-s", "3600"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)  # nothing for the run block to eval: no deadline set at all
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert (state / "launches.json").read_text() == text  # never reset or repaired
    recorded = events.read_all(events_file)
    assert [e["event"] for e in recorded] == ["error"] and needle in recorded[0]["message"]


def test_a_sound_launch_record_keeps_its_first_deadline(tmp_path, capsys):
    from job import managed

    state = tmp_path / "managed"
    assert managed.main(["start", "--state", str(state), "--deadline-s", "3600", "--t0", "1000000"]) == 0
    assert managed.main(["start", "--state", str(state), "--deadline-s", "3600", "--t0", "2000000"]) == 0
    assert capsys.readouterr().out.split()[-1] == "SOCRATES_DEADLINE=1003600"


# --- acceptance 3: `up --infra local` with a job that sends every hostile line ----------------------

def test_up_local_with_a_hostile_job_ends_done_and_verified(tmp_path):
    import fakejob
    from launcher_helpers import cli, fake_python, launcher_env, only_run

    runs = tmp_path / "runs"
    r = cli(["up", "--infra", "local", "--config", "configs/smoke.yaml", "--yes", "--no-eval"],
            launcher_env(runs, fake_python(tmp_path), FAKEJOB_STEPS="4", FAKEJOB_HOSTILE="1"), timeout=300)
    shown = r.stdout + r.stderr
    rec = only_run(runs)
    assert r.returncode == 0 and rec["state"] == "done" and rec["verified"], shown[-3000:]
    assert "Traceback" not in shown and "\x1b" not in shown and "\x07" not in shown, shown[-3000:]
    words = " ".join(shown.split())  # the terminal's width wraps lines
    assert f"adapter: {rec['adapter']} (verified against manifest.json)" in words
    assert words.count("==> tearing down") == 1
    assert "screen cleared" in shown and "    adapter: /tmp/evil" in shown  # shown as text, escapes removed
    bad = sum(1 for line in fakejob.hostile_lines() if events.parse_line(line) is None
              and LINE_PREFIX in line)
    skipped = int(words.split(" lines from the machine were skipped")[0].split()[-1])
    assert skipped == bad + 1, shown[-2000:]  # each refused line, and the exit_code that was no status
    recorded = events.read_record(Path(rec["dir"]) / "events.jsonl")
    assert [e["step"] for e in recorded if e["event"] == "step"] == [1, 2, 3, 4]
    assert os.path.getsize(Path(rec["dir"]) / "job.log") < 4 << 20
