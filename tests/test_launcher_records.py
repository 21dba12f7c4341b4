"""Damaged or foreign run records (runs/<id>/run.json edited by hand, copied from elsewhere, cut
short): every verb answers with one line naming the file and the field (exit 2), `runs` lists the
record as damaged and goes on, `down` still ends a machine it can find, and display code shows odd
recorded values instead of a traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import one_line
from launcher import registry
from launcher_helpers import cli, cli_here, launcher_env, pid_alive


def _record(runs: Path, monkeypatch, name: str = "demo", **fields) -> Path:
    """A sound record made by the registry, then `fields` written over it as a hand edit would."""
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
    run = registry.new_run(name, "local")
    data = json.loads(run.path.read_text())
    data.update(fields)
    run.path.write_text(json.dumps(data))
    return run.path


DAMAGE = [
    ({"started_at": "yesterday"}, "started_at 'yesterday' is not a number"),
    ({"estimate": {"dollars": "x"}}, "estimate"),
    ({"state": "bogus"}, "state 'bogus' is not a run state"),
    ({"history": None}, "history null is not a list"),
    ({"infra": "bogus"}, "infra 'bogus' is not a known infrastructure"),
    ({"exit_code": "1"}, "exit_code '1'"),
    ({"backend_state": []}, "backend_state [] is not an object"),
    ({"options": {"nodes": "two"}}, "options"),  # each run option of its type (registry.RunOptions)
]


@pytest.mark.parametrize("fields,named", DAMAGE, ids=[next(iter(f)) for f, _ in DAMAGE])
@pytest.mark.parametrize("verb", ["status", "logs", "down", "download", "report"])
def test_a_damaged_record_is_one_line_exit_2_naming_file_and_field(fields, named, verb, tmp_path, monkeypatch, capsys):
    """In this process (cli_here): 70 cases; the entry point as a process is the next test's."""
    runs = tmp_path / "runs"
    path = _record(runs, monkeypatch, **fields)
    before = path.read_bytes()
    for argv in ([verb, path.parent.name], [verb]):  # named, and as the latest run
        r = cli_here(argv, runs, capsys, monkeypatch)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        line = one_line(r, rc=None, both=True)
        assert str(path) in line and named in line and "damaged" in line, line
        assert "--infra" not in line  # the user passed no --infra
    assert path.read_bytes() == before  # refused: the record is left as it was


def test_an_older_records_bucket_options_still_name_and_keep_its_bucket(tmp_path, monkeypatch):
    # Before the run config's storage section held them, --bucket/--keep-bucket were written into options.
    path = _record(tmp_path / "runs", monkeypatch, "managed", infra="sky",
                   options={"managed_job": True, "bucket": "s3://my-results/runs", "keep_bucket": True, "cloud": "aws"})
    run = registry.load(json.loads(path.read_text())["id"])
    assert run.config["storage"]["bucket"] == "s3://my-results/runs"
    assert run.config["storage"]["keep_bucket"] is True
    from launcher.backends.managed import _kept
    from launcher.bucket import given_bucket, url_for_run

    assert given_bucket(run) == "s3://my-results/runs" and _kept(run)
    assert url_for_run(run).startswith("s3://my-results/runs")
    run.update(note="a later save")  # the carried-over storage is written: the record no longer needs the old keys
    saved = json.loads(path.read_text())
    assert saved["config"]["storage"] == {"bucket": "s3://my-results/runs", "keep_bucket": True}
    assert given_bucket(registry.load(run.id)) == "s3://my-results/runs" and _kept(registry.load(run.id))
    # a record that says nothing of them keeps the config's own (here: none)
    plain = registry.load(json.loads(_record(tmp_path / "runs", monkeypatch, "plain").read_text())["id"])
    assert not (plain.config.get("storage") or {}).get("bucket") and not _kept(plain)


def test_runs_lists_damaged_records_and_goes_on(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    good = _record(runs, monkeypatch, "good").parent.name
    odd = _record(runs, monkeypatch, "odd", started_at="yesterday").parent.name
    broken = runs / "broken-20200101-000000-abcd"
    broken.mkdir()
    (broken / "run.json").write_text('{"id": "broken-2020')  # cut short
    r = cli(["runs"], launcher_env(runs))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in (good, odd, broken.name)}
    assert "created" in rows[good] and "damaged" in rows[odd] and "damaged" in rows[broken.name]
    assert "started_at 'yesterday'" in r.stdout and "not readable JSON" in r.stdout
    listed = json.loads(cli(["runs", "--json"], launcher_env(runs)).stdout)
    assert [e["state"] for e in listed] == ["damaged", "created", "damaged"]  # broken's folder stamp is 2020
    assert "started_at" in listed[2]["error"]


def test_latest_run_is_never_an_older_one_when_the_latest_is_damaged(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    good = _record(runs, monkeypatch, "good", created_at=time.time() - 3600).parent.name
    broken = runs / f"broken-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-abcd"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    r = cli(["status"], launcher_env(runs))
    assert r.returncode == 2 and str(broken / "run.json") in one_line(r, rc=None, both=True)
    assert cli(["status", good], launcher_env(runs)).returncode == 0  # the others stay usable by name
    (broken / "run.json").unlink()
    assert good in cli(["status"], launcher_env(runs)).stdout


def test_down_ends_the_machine_of_a_damaged_record_whose_handles_are_intact(tmp_path, monkeypatch):
    """Money first: the record says which backend and where the machine is; the damage elsewhere
    (a bogus state, a null history) must not leave it billing. Only the sound fields are written back."""
    import tempfile

    runs = tmp_path / "runs"
    path = _record(runs, monkeypatch)
    run_id = path.parent.name
    # The local backend's machine as it makes one: a marked temp folder, a job carrying the run's id
    # (down checks both: the record alone is not the authority, issue #13).
    workdir = Path(tempfile.mkdtemp(prefix=f"socrates-{run_id}-"))
    (workdir / ".socrates-run").write_text(run_id)
    job = subprocess.Popen(["sleep", "300"], start_new_session=True, env={**os.environ, "SOCRATES_RUN_ID": run_id})
    try:
        data = json.loads(path.read_text())
        data.update(state="bogus", history=None, machine="up",
                    backend_state={"workdir": str(workdir), "pid": job.pid, "pgid": job.pid})
        path.write_text(json.dumps(data))
        r = cli(["down"], launcher_env(runs))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        assert "state 'bogus'" in r.stdout and "machine down" in r.stdout
        job.wait(timeout=10)
        assert not pid_alive(job.pid) and not workdir.exists()
        after = json.loads(path.read_text())
        assert after["machine"] == "gone" and isinstance(after["ended_at"], float)
        assert after["state"] == "bogus" and after["history"] is None  # the damage stays for the user to see
        # still damaged for every other verb, and a second down is harmless
        assert cli(["status"], launcher_env(runs)).returncode == 2
        assert cli(["down"], launcher_env(runs)).returncode == 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def test_damaged_record_down_cannot_use_names_the_cluster_to_end_by_hand(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    path = _record(runs, monkeypatch, infra="bogus", backend_state={"cluster": "sky-demo-1"})
    r = cli(["down", path.parent.name], launcher_env(runs))
    line = one_line(r, rc=None, both=True)
    assert r.returncode == 2 and "infra 'bogus'" in line and "`sky down sky-demo-1`" in line


def test_logs_shows_odd_event_values_instead_of_a_traceback(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    path = _record(runs, monkeypatch, state="done", started_at=time.time() - 60, ended_at=time.time())
    events = [{"v": 1, "event": "phase", "ts": 1.0, "phase": "training"},
              {"v": 1, "event": "step", "ts": 2.0, "step": "three", "total_steps": None, "epoch": 0, "loss": "x",
               "lr": 1e-4, "tokens_per_s": [1], "gpu_mem_gib": 1, "eta_s": "soon"},
              {"v": 1, "event": "eval", "ts": 3.0, "metrics": "W=0.15 [bold]"},
              {"v": 1, "event": "eval", "ts": 4.0, "metrics": {"wasserstein": "0.2"}},
              {"v": 1, "event": "prepare", "ts": 5.0, "train_rows": {"n": 1}, "test_rows": None}]
    (path.parent / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    r = cli(["logs"], launcher_env(runs))
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert "eval: W=0.15 [bold]" in r.stdout and "wasserstein=0.2" in r.stdout and "step three/?" in r.stdout


def _metrics(run_dir: Path, results) -> None:
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"results": results}))


def test_report_refuses_results_that_are_not_an_object(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    path = _record(runs, monkeypatch)
    _metrics(path.parent, [1])
    r = cli(["report"], launcher_env(runs))
    assert r.returncode == 2 and "metrics.json: results is list" in one_line(r, rc=None, both=True)


def test_report_shows_odd_result_values_as_they_are(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    path = _record(runs, monkeypatch)
    _metrics(path.parent, {"a": "str", "b": {"mode": "sample", "rows": "12", "wasserstein": "0.2",
                                             "invalid_rate": "lots", "demographic_parity_difference": 0.1,
                                             "cells_scored": 2.5}})
    for argv in (["report"], ["report", "--json"]):
        r = cli(argv, launcher_env(runs))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (argv, r.stdout, r.stderr)
    r = cli(["report"], launcher_env(runs))
    row_a = next(ln for ln in r.stdout.splitlines() if ln.startswith("a "))
    row_b = next(ln for ln in r.stdout.splitlines() if ln.startswith("b "))
    assert "not a result: str" in row_a
    assert row_b.split()[1:4] == ["12", "0.2", "-"] and "lots" in row_b and "0.1000" in row_b


def test_status_renders_a_sound_record_with_odd_nested_values(tmp_path, monkeypatch):
    """Fields the schema leaves open (inside config, options, backend_state) never reach arithmetic."""
    runs = tmp_path / "runs"
    _record(runs, monkeypatch, estimate={"dollars": None, "cheapest": {}, "notes": "n"}, options={"x": [1]})
    r = cli(["status"], launcher_env(runs))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
