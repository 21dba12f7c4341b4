"""The local backend end to end through the real CLI: a temp dir stands in for the machine.

The job is tests/fakejob.py (real events, a real adapter + manifest, faults on demand); the real smoke job,
exactly as `make demo` runs it, is the demo of tests/test_readme_commands.py.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import wait_until
from contracts import manifest
from contracts.events import read_all, read_record
from launcher_helpers import (CANARY, assert_machine_gone, cli, fake_python, launcher_env, no_secret_anywhere,
                              only_run, pid_alive, spawn, wait_for_state)



def test_up_local_end_to_end(tmp_path):
    env = launcher_env(tmp_path / "runs", fake_python(tmp_path), HF_TOKEN=CANARY, FAKEJOB_LEAK="1")
    r = cli(["up", "--infra", "local", "--yes", "--eval-base", "--eval-rows", "4"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = only_run(tmp_path / "runs")
    run_dir = Path(rec["dir"])
    # The rendered run block ran every verb with the flags `up` was given.
    tuned = json.loads((run_dir / "eval" / "metrics.json").read_text())["argv"]
    base = json.loads((run_dir / "eval-base" / "metrics.json").read_text())["argv"]
    assert "--adapter" in tuned and "--as-configured" in tuned and "--rows" not in tuned
    assert "--base" in base and "--adapter" not in base and "--as-configured" in base
    # --eval-rows and --eval-base travel one way: in the run config the job reads (eval.rows, eval.base)
    assert rec["config"]["eval"]["rows"] == 4 and rec["config"]["eval"]["base"] is True
    assert rec["state"] == "done" and rec["verified"] and rec["exit_code"] == 0 and rec["machine"] == "gone"
    assert manifest.verify(run_dir) == []
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "eval" / "metrics.json").is_file()
    kinds = [e["event"] for e in read_all(run_dir / "events.jsonl")]
    assert kinds.count("step") == 5 and "done" in kinds
    phases = [e["phase"] for e in read_record(run_dir / "events.jsonl") if e["event"] == "phase"]  # the launcher's own
    assert phases == ["provisioning", "syncing", "training", "downloading", "tearing down"]
    assert f"adapter: {run_dir.resolve() / 'adapter'}" in r.stdout.replace("\n", "")
    assert "step 5/5" in r.stdout  # plain progress lines when stdout is not a terminal
    assert_machine_gone(rec)
    # The job printed the token; nothing the launcher wrote or showed carries it.
    no_secret_anywhere(tmp_path / "runs")
    assert CANARY not in r.stdout + r.stderr
    assert "<redacted>" in (run_dir / "job.log").read_text()
    # `runs` and `status` read the record back; `down` on an ended run is a no-op.
    listed = cli(["runs", "--json"], env)
    assert json.loads(listed.stdout)[0]["state"] == "done"
    assert "machine:  gone" in cli(["status"], env).stdout
    replay = cli(["logs", rec["id"]], env)  # an ended run: its recorded progress, then where the adapter is
    assert replay.returncode == 0 and "step 5/5" in replay.stdout and "adapter:" in replay.stdout
    assert cli(["down", rec["id"]], env).returncode == 0
    # `download` after the machine is gone re-verifies the local copy, and catches a damaged one.
    assert cli(["download"], env).returncode == 0
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    r = cli(["download"], env)
    assert r.returncode == 2 and "adapter/adapter_config.json" in r.stderr


@pytest.mark.parametrize("verb", ["check", "prepare", "train", "evaluate"])
def test_job_failure_fails_the_run_and_tears_down(tmp_path, verb):
    env = launcher_env(tmp_path / "runs", fake_python(tmp_path), FAKEJOB_FAIL=verb)
    r = cli(["up", "--infra", "local", "--yes"], env)
    assert r.returncode == 1
    rec = only_run(tmp_path / "runs")
    assert rec["state"] == "failed" and rec["exit_code"] == 1
    # after training, the finished adapter is pulled back and verified before the teardown
    assert rec["verified"] == (verb == "evaluate") and bool(rec["adapter"]) == (verb == "evaluate")
    assert f"failing in {verb}" in r.stdout  # the job's last output is shown
    assert_machine_gone(rec)


def test_artifact_not_matching_manifest_is_never_called_done(tmp_path):
    env = launcher_env(tmp_path / "runs", fake_python(tmp_path), FAKEJOB_CORRUPT="1")
    r = cli(["up", "--infra", "local", "--yes", "--no-eval"], env)
    assert r.returncode == 1
    rec = only_run(tmp_path / "runs")
    assert rec["state"] == "failed" and "do not match the manifest" in rec["error"] and not rec["verified"]
    assert not (Path(rec["dir"]) / "adapter").exists()
    # the job's own copy is left where it is (on this machine nothing bills) and the way out is printed
    assert Path(rec["backend_state"]["workdir"]).is_dir() and rec["machine"] == "up"
    assert f"socrates-launch down {rec['id']}" in " ".join(r.stdout.split())
    assert cli(["down", rec["id"]], env).returncode == 0
    assert_machine_gone(only_run(tmp_path / "runs"))


def test_detach_then_logs_reattaches_and_finishes(tmp_path):
    env = launcher_env(tmp_path / "runs", fake_python(tmp_path), FAKEJOB_STEPS="10", FAKEJOB_STEP_S="0.1")
    r = cli(["up", "--infra", "local", "--yes", "--detach", "--no-eval"], env)
    assert r.returncode == 0 and "socrates-launch logs" in r.stdout
    rec = only_run(tmp_path / "runs")
    assert rec["state"] == "running" and Path(rec["backend_state"]["workdir"]).is_dir()
    r = cli(["download"], env)  # mid-run: refused, and the run is left as it was
    assert r.returncode == 2 and "socrates-launch logs" in r.stderr
    assert only_run(tmp_path / "runs")["state"] == "running"
    r = cli(["logs"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = only_run(tmp_path / "runs")
    assert rec["state"] == "done" and rec["verified"]
    steps = [e for e in read_all(Path(rec["dir"]) / "events.jsonl") if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 11))  # none lost, none doubled
    assert_machine_gone(rec)


def _up_until_the_job_runs(tmp_path):
    """(env, the launcher's process, its run record once the job's process group is recorded): a long fake job."""
    env = launcher_env(tmp_path / "runs", fake_python(tmp_path), FAKEJOB_STEPS="200", FAKEJOB_STEP_S="0.1")
    proc = spawn(["up", "--infra", "local", "--yes"], env)
    rec = wait_for_state(tmp_path / "runs", ("running",))
    while not rec["backend_state"].get("pgid"):
        time.sleep(0.05)
        rec = only_run(tmp_path / "runs")
    return env, proc, rec


def test_launcher_sigkilled_mid_run_then_status_and_down(tmp_path):
    env, proc, rec = _up_until_the_job_runs(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    pgid = rec["backend_state"]["pgid"]
    assert pid_alive(pgid), "the job should outlive its launcher, like a remote job"
    r = cli(["status", rec["id"]], env)
    assert r.returncode == 0 and "machine:  up" in r.stdout and "state:    running" in r.stdout
    r = cli(["down", rec["id"]], env)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = only_run(tmp_path / "runs")
    assert rec["state"] == "torn_down" and rec["machine"] == "gone"
    assert_machine_gone(rec)
    assert cli(["down", rec["id"]], env).returncode == 0  # idempotent


def test_ctrl_c_stops_a_local_run_and_removes_its_folder(tmp_path):
    """On your own machine Ctrl-C stops the job (nothing bills; `up --detach` keeps it running): the
    process group ends, the folder is removed, the run says so and is recorded torn down."""
    env, proc, rec = _up_until_the_job_runs(tmp_path)
    assert pid_alive(rec["backend_state"]["pgid"])
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    flat = " ".join(out.split())
    assert f"Ctrl-C: stopping run {rec['id']}" in flat and "up --detach" in flat and "detached" not in flat, out
    rec = only_run(tmp_path / "runs")
    assert rec["state"] == "torn_down" and rec["machine"] == "gone", rec
    assert_machine_gone(rec)


def test_status_reconciles_a_vanished_machine(tmp_path):
    env = launcher_env(tmp_path / "runs", fake_python(tmp_path), FAKEJOB_STEPS="200", FAKEJOB_STEP_S="0.1")
    r = cli(["up", "--infra", "local", "--yes", "--detach"], env)
    assert r.returncode == 0
    rec = only_run(tmp_path / "runs")
    # The 'machine' disappears behind the launcher's back (a cloud reclaiming it).
    os.killpg(rec["backend_state"]["pgid"], signal.SIGKILL)
    import shutil

    shutil.rmtree(rec["backend_state"]["workdir"])
    wait_until(lambda: not pid_alive(rec["backend_state"]["pgid"]), 10, what="the job's process group ending")
    r = cli(["status"], env)
    assert "machine:  gone" in r.stdout
    rec = only_run(tmp_path / "runs")
    assert rec["state"] == "failed" and "machine gone" in rec["error"]
