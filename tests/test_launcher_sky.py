"""The SkyPilot backend.

Against SkyPilot's real API server, offline (tests/skyfix.py): `up --dryrun` picks an offer with
the real optimizer, and the rendered task parses with sky.Task.from_yaml_config.

The fault matrix goes through the real CLI, registry and sky backend with a fault-injecting fake
of the adapter (tests/fakesky.py: clusters are folders where the real rendered run block runs):
failures at provision, sync, setup, run and download, a dropped log stream, the launcher SIGKILLed
in each phase, Ctrl-C once and twice. Each must end with no machine left and nothing verified lost.
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
import yaml

from conftest import wait_until
from contracts import manifest
from contracts.events import read_all
from launcher_helpers import (CANARY, REPO, cli, fake_calls, fake_clusters, fake_python, fakesky_env, only_run, spawn,
                              wait_for_state)

UP = ["up", "--infra", "sky", "--gpu", "A100:1", "--config", "configs/smoke.yaml", "--yes"]


# --- against the real (offline) SkyPilot API server ------------------------------------------

@pytest.mark.slow
@pytest.mark.sky
def test_dryrun_picks_an_offer_through_the_real_optimizer(sky_home, tmp_path):
    runs = tmp_path / "runs"
    env = {**sky_home.env, "SOCRATES_RUNS_DIR": str(runs), "HF_TOKEN": CANARY}
    r = cli(["up", "--gpu", "A100:1", "--subset", "0.1", "--dryrun", "--yes"], env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # The seeded catalog's cheapest A100:1 (Lambda us-east-1 at $1.99/h; us-west-1 is $2.09).
    chosen = next(ln for ln in out.splitlines() if ln.startswith("chosen:"))
    assert "Lambda" in chosen and "us-east-1" in chosen and "gpu_1x_a100" in chosen and "$1.99/h" in chosen
    assert "rendered task" in out and "accelerators: A100:1" in out and "subset: 0.1" in out
    assert "HF_TOKEN" in out and CANARY not in out  # the secret's name travels, its value does not
    assert not runs.exists()  # a dry run creates no run
    # No cap given: a cloud run still carries a remote deadline (a hung job is never idle for autodown).
    safety_h = float(re.search(r"safety stop: .* stops itself ([0-9.]+) h after", " ".join(out.split())).group(1))
    deadline_s = int(re.search(r"DEADLINE_S: '?(\d+)", out).group(1))
    assert safety_h > 1 and abs(deadline_s / 3600 - safety_h) < 0.05


@pytest.mark.sky
def test_rendered_task_parses_with_skypilot_with_secrets_and_autodown(sky_home, tmp_path):
    code = f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
os.environ["HF_TOKEN"] = {CANARY!r}
import sky
from launcher import registry, task as tasklib
from launcher.secrets import collect
from launcher.sky_adapter import SkyAdapter
from contracts.config import load_config
cfg = load_config("configs/paper.yaml").with_overrides({{"data.subset": 0.1}})
run = registry.Run(id="t", dir="/nonexistent", config=cfg.to_dict(), options={{"eval": True, "deadline_s": 3600}})
conf = tasklib.render(run, gpu="A100:1", cloud="lambda", secret_names=tuple(collect()))
text = tasklib.to_yaml(conf)
task = sky.Task.from_yaml_config(conf, secrets_overrides=list(collect().items()))
res = list(task.resources)[0]
# What our adapter hands to sky.launch: autodown armed (down=True + idle autostop).
seen = {{}}
def fake_launch(task, **kw):
    seen.update(kw); raise SystemExit(0)
sky.launch = fake_launch
try:
    SkyAdapter().launch(conf, "socrates-t", collect(), 15, on_request_id=print)
except SystemExit:
    pass
print(json.dumps({{"canary_in_yaml": {CANARY!r} in text, "secrets": sorted(task.secrets),
    "secret_value_ok": task.secrets["HF_TOKEN"].get_secret_value() == {CANARY!r}, "acc": str(res.accelerators),
    "cloud": str(res.cloud), "deadline": task.envs["DEADLINE_S"], "run_has_job": '"$JOB_PYTHON" -m job)' in task.run and '"${{JOB[@]}}" train' in task.run,
    "down": seen.get("down"), "idle": seen.get("idle_minutes_to_autostop")}}))
"""
    r = sky_home.python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["canary_in_yaml"] is False and got["secret_value_ok"] is True
    assert got["secrets"] == ["HF_TOKEN"]
    assert got["acc"] == "{'A100': 1}" and got["cloud"].lower() == "lambda"
    assert got["deadline"] == "3600" and got["run_has_job"]
    assert got["down"] is True and got["idle"] >= 10


@pytest.mark.slow
@pytest.mark.sky
def test_status_and_down_through_the_real_sdk_for_a_cluster_that_is_gone(sky_home, tmp_path):
    """The real adapter's status and down calls: a cluster SkyPilot doesn't have is reconciled."""
    from launcher import registry

    runs = tmp_path / "runs"
    os.environ["SOCRATES_RUNS_DIR"] = str(runs)
    try:
        run = registry.new_run("gone", "sky", gpu="A100:1")
        from launcher.backends.sky import cluster_name_for

        run.transition("provisioning").transition("running", backend_state={"cluster": cluster_name_for(run.id), "job_id": 1})
    finally:
        del os.environ["SOCRATES_RUNS_DIR"]
    env = {**sky_home.env, "SOCRATES_RUNS_DIR": str(runs)}
    r = cli(["status", run.id], env, timeout=300)
    assert r.returncode == 0 and "machine:  gone" in r.stdout, r.stdout + r.stderr
    assert json.loads(run.path.read_text())["state"] == "failed"
    r = cli(["down", run.id], env, timeout=300)
    assert r.returncode == 0 and "machine down" in r.stdout, r.stdout + r.stderr


# --- the fault matrix, through a fake of the adapter -----------------------------------------

@pytest.fixture
def cloud(tmp_path):
    """Environment for a launcher process whose SkyPilot is tests/fakesky.py (catalog seeded)."""
    return fakesky_env(tmp_path, fake_python(tmp_path))


def _streaming(runs: Path) -> bool:
    """The launcher follows the job: a step event it received is in the run's events.jsonl."""
    return any('"event":"step"' in p.read_text() for p in runs.glob("*/events.jsonl"))


def _in_phase(env: dict, phase: str) -> bool:
    """The fake cloud is really inside `phase`: the cluster made, a step streamed, the pull started."""
    if phase == "provisioning":
        return len(fake_clusters(env)) == 1
    if phase == "running":
        return _streaming(Path(env["SOCRATES_RUNS_DIR"]))
    return any(line.startswith("rsync ") for line in fake_calls(env))


def _assert_nothing_running(env: dict, rec: dict) -> None:
    assert fake_clusters(env) == [], "a cluster was left up"
    assert f"down {rec['backend_state']['cluster']}" in fake_calls(env)
    assert rec["machine"] == "gone"


def test_sky_up_end_to_end_with_fake_cloud(cloud):
    r = cli(UP, {**cloud, "HF_TOKEN": CANARY, "FAKEJOB_LEAK": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert rec["state"] == "done" and rec["verified"]
    assert rec["backend_state"]["request_id"] and rec["backend_state"]["job_id"] == 1
    assert manifest.verify(rec["dir"]) == []
    _assert_nothing_running(cloud, rec)
    for path in Path(cloud["SOCRATES_RUNS_DIR"]).rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert CANARY not in r.stdout + r.stderr
    assert "HF_TOKEN" in (Path(rec["dir"]) / "task.yaml").read_text()
    # SkyPilot syncs the run's staged folder, never the checkout (launcher/stage.py)
    assert yaml.safe_load((Path(rec["dir"]) / "task.yaml").read_text())["workdir"] == str(Path(rec["dir"]) / "code")


@pytest.mark.parametrize("fault,phase", [("provision", "provisioning"), ("sync", "syncing"),
                                         ("setup", "installing"), ("run", "running")])
def test_every_failure_ends_in_down(cloud, fault, phase):
    env = {**cloud, "FAKESKY_FAIL": fault}
    if fault == "run":
        env = {**cloud, "FAKEJOB_FAIL": "train"}
    r = cli(UP, env)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert rec["state"] == "failed" and rec["error"].startswith(phase), rec["error"]
    assert not rec["verified"]
    if fault == "run":  # training died: there is no finished adapter to save first
        assert "no finished adapter on the machine" in rec["error"]
    _assert_nothing_running(cloud, rec)


def test_a_job_failing_after_training_still_brings_the_adapter_back(cloud):
    """Evaluation crashes (or the deadline's hard kill lands in it): the adapter training finished and
    the cloud billed for is pulled back and verified before the teardown; the run still says failed."""
    r = cli(UP, {**cloud, "FAKEJOB_FAIL": "evaluate"})
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert rec["state"] == "failed" and rec["error"].startswith("running: the job exited with status 1")
    assert "pulled back and verifies" in rec["error"] and rec["adapter"]
    assert manifest.verify(rec["dir"]) == [] and (Path(rec["adapter"]) / "adapter_model.safetensors").is_file()
    _assert_nothing_running(cloud, rec)


@pytest.mark.slow
def test_a_failed_download_leaves_the_results_on_the_machine_and_says_how_to_get_them(cloud):
    """The job succeeded but the pull keeps failing: tearing down would delete the only copy. The
    machine stays up (its autodown is armed) and the user is told how to pull, then end it."""
    r = cli(UP, {**cloud, "FAKESKY_FAIL": "download"})
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    cluster = rec["backend_state"]["cluster"]
    assert rec["state"] == "failed" and rec["error"].startswith("downloading"), rec["error"]
    assert fake_calls(cloud).count(f"rsync {cluster}") == 3  # retried before giving up
    assert len(fake_clusters(cloud)) == 1 and f"down {cluster}" not in fake_calls(cloud)
    out = " ".join(r.stdout.split())
    assert f"socrates-launch download {rec['id']}" in out and f"socrates-launch down {rec['id']}" in out
    assert "autodown ends it 15 min after the job ended" in out
    assert "still up" in cli(["status", rec["id"]], cloud).stdout
    r = cli(["download", rec["id"]], cloud)  # the link is back
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert rec["verified"] and manifest.verify(rec["dir"]) == []
    assert cli(["down", rec["id"]], cloud).returncode == 0
    _assert_nothing_running(cloud, only_run(Path(cloud["SOCRATES_RUNS_DIR"])))


@pytest.mark.slow
def test_failed_teardown_is_loud_and_down_retries_it(cloud):
    r = cli(UP, {**cloud, "FAKESKY_FAIL": "down"})
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert r.returncode == 1 and "TEARDOWN FAILED" in r.stdout and f"socrates-launch down {rec['id']}" in r.stdout
    assert rec["state"] == "done" and rec["verified"] and rec["machine"] == "unknown"  # the adapter is safe
    assert len(fake_clusters(cloud)) == 1 and fake_calls(cloud).count(f"down-failed {rec['backend_state']['cluster']}") == 3
    assert cli(["status", rec["id"]], cloud).stdout.count("still up") == 1
    r = cli(["down", rec["id"]], cloud)
    assert r.returncode == 0
    _assert_nothing_running(cloud, only_run(Path(cloud["SOCRATES_RUNS_DIR"])))


def test_dropped_log_stream_and_failed_download_are_retried(cloud):
    """The log stream drops once and the first rsync fails: no event lost or doubled, adapter verified."""
    r = cli(UP, {**cloud, "FAKESKY_FAIL": "stream,download-once", "FAKEJOB_STEPS": "8"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert (Path(cloud["FAKESKY_DIR"]) / "dropped").exists()  # the faults really happened
    assert (Path(cloud["FAKESKY_DIR"]) / "download-failed-once").exists()
    assert "reconnecting" in r.stdout and "attempt 1 failed" in r.stdout
    assert rec["verified"] and manifest.verify(rec["dir"]) == []
    steps = [e["step"] for e in read_all(Path(rec["dir"]) / "events.jsonl") if e["event"] == "step"]
    assert steps == list(range(1, 9))
    log = (Path(rec["dir"]) / "job.log").read_text()
    assert log.count('"event":"step"') == 8  # the log is not doubled either
    assert rec["state"] == "done"
    _assert_nothing_running(cloud, rec)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["provisioning", "running", "downloading"])
def test_launcher_sigkilled_in_each_phase_then_status_and_down(cloud, phase):
    """SIGKILL leaves no handler to run: the run record alone must let status/logs/down finish the job."""
    env = {**cloud, "FAKESKY_PROVISION_S": "30" if phase == "provisioning" else "0",
           "FAKESKY_DOWNLOAD_S": "30" if phase == "downloading" else "0",
           "FAKEJOB_STEPS": "30" if phase == "running" else "3", "FAKEJOB_STEP_S": "0.1"}
    proc = spawn(UP, env)
    runs = Path(cloud["SOCRATES_RUNS_DIR"])
    wait_for_state(runs, (phase,), timeout=90)
    wait_until(lambda: _in_phase(env, phase), 30, what=f"the fake cloud inside {phase}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    rec = only_run(runs)
    assert rec["backend_state"]["cluster"] and len(fake_clusters(cloud)) == 1  # it was really up
    r = cli(["status", rec["id"]], env)
    assert r.returncode == 0 and "machine:  up" in r.stdout and f"state:    {phase}" in r.stdout
    if phase in ("running", "downloading"):
        # Re-attach: the rest of the progress (or the cut-off pull), then verify and tear down as `up` would.
        r = cli(["logs"], {**env, "FAKESKY_DOWNLOAD_S": "0"})
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        rec = only_run(runs)
        assert rec["state"] == "done" and rec["verified"]
        steps = [e["step"] for e in read_all(Path(rec["dir"]) / "events.jsonl") if e["event"] == "step"]
        assert steps == list(range(1, int(env["FAKEJOB_STEPS"]) + 1))  # none lost or doubled across the kill
        _assert_nothing_running(cloud, rec)
    r = cli(["down", rec["id"]], env)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = only_run(runs)
    assert rec["state"] == ("torn_down" if phase == "provisioning" else "done")
    _assert_nothing_running(cloud, rec)
    r = cli(["status", rec["id"]], env)
    assert "machine:  gone" in r.stdout and f"state:    {rec['state']}" in r.stdout


def _interrupt(cloud: dict, times: int) -> tuple[str, dict, int]:
    env = {**cloud, "FAKEJOB_STEPS": "30", "FAKEJOB_STEP_S": "0.1"}
    proc = spawn(UP, env)
    runs = Path(cloud["SOCRATES_RUNS_DIR"])
    wait_for_state(runs, ("running",), timeout=90)
    wait_until(lambda: _streaming(runs), 30, what="the launcher streaming the job's steps")
    os.kill(proc.pid, signal.SIGINT)
    seen = []
    if times == 2:  # the second Ctrl-C once the launcher says it waits for one
        for line in proc.stdout:
            seen.append(line)
            if "press Ctrl-C again" in line:
                break
        os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return "".join(seen) + out, only_run(runs), proc.returncode


def test_ctrl_c_once_detaches_and_leaves_autodown_armed(cloud):
    out, rec, code = _interrupt(cloud, 1)
    assert code == 130 and "detached from run" in out and f"socrates-launch down {rec['id']}" in out
    assert rec["state"] == "running" and len(fake_clusters(cloud)) == 1  # still running, by design
    launch = json.loads((fake_clusters(cloud)[0] / "task.json").read_text())
    assert launch["idle_minutes"] >= 10  # autodown armed at launch, so the machine ends itself
    # and the user can come back to it: logs finishes the run, downloads and tears down.
    r = cli(["logs", rec["id"]], cloud)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert rec["state"] == "done" and rec["verified"]
    _assert_nothing_running(cloud, rec)


def test_ctrl_c_twice_tears_down_now(cloud):
    out, rec, code = _interrupt(cloud, 2)
    assert code == 130 and "tearing down now" in out
    assert rec["state"] == "torn_down"
    _assert_nothing_running(cloud, rec)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_interrupted_while_provisioning_tears_down(cloud, sig):
    """The terminal closes (SIGHUP), the launcher is killed politely (SIGTERM) or Ctrl-C, before the job
    was submitted: SkyPilot has not armed autodown yet, so nothing would end that machine. We do."""
    env = {**cloud, "FAKESKY_PROVISION_S": "30"}
    proc = spawn(UP, env)
    runs = Path(cloud["SOCRATES_RUNS_DIR"])
    wait_for_state(runs, ("provisioning",), timeout=90)
    wait_until(lambda: len(fake_clusters(cloud)) == 1, 30, what="the cluster being provisioned")  # it really was
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    rec = only_run(runs)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "autodown is not armed yet" in " ".join(out.split())
    assert rec["state"] == "torn_down"
    _assert_nothing_running(cloud, rec)


def test_sigterm_while_running_detaches_with_autodown_armed(cloud):
    """Once the job runs, autodown is armed on the machine: a stopped launcher detaches (like one
    Ctrl-C), the job goes on, and `logs` finishes the run."""
    env = {**cloud, "FAKEJOB_STEPS": "30", "FAKEJOB_STEP_S": "0.1"}
    proc = spawn(UP, env)
    runs = Path(cloud["SOCRATES_RUNS_DIR"])
    wait_for_state(runs, ("running",), timeout=90)
    wait_until(lambda: _streaming(runs), 30, what="the launcher streaming the job's steps")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    rec = only_run(runs)
    assert proc.returncode == 128 + signal.SIGTERM and f"socrates-launch logs {rec['id']}" in out
    assert rec["state"] == "running" and len(fake_clusters(cloud)) == 1
    r = cli(["logs", rec["id"]], cloud)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = only_run(runs)
    assert rec["state"] == "done" and rec["verified"]
    _assert_nothing_running(cloud, rec)


def test_sky_status_on_a_run_that_never_launched(cloud, tmp_path):
    """A launcher killed before SkyPilot was asked anything: status says gone, down is a no-op."""
    from launcher import registry

    os.environ["SOCRATES_RUNS_DIR"] = cloud["SOCRATES_RUNS_DIR"]
    try:
        run = registry.new_run("never", "sky")
        run.transition("provisioning")
    finally:
        del os.environ["SOCRATES_RUNS_DIR"]
    r = cli(["status", run.id], cloud)
    assert "machine:  gone" in r.stdout and "state:    failed" in r.stdout
    assert cli(["down", run.id], cloud).returncode == 0


def test_cluster_names_stay_unique_when_cut_to_fit():
    """Two runs whose ids share their first 50 characters (a long config name, the same second) must
    not share a cluster: one run's teardown would end the other's machine."""
    from launcher.backends.sky import cluster_name_for

    long_name = "socrates-qwen2.5-14b-qlora-unseen-studies-ablation"
    a, b = (cluster_name_for(f"{long_name}-20261126-101500-{tail}") for tail in ("ab12", "cd34"))
    assert a != b and len(a) <= 50 and len(b) <= 50
    for name in (a, b, cluster_name_for("smoke-20261126-101500-ab12")):
        assert name[0].isalpha() and set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") and not name.endswith("-")
    assert cluster_name_for("smoke-20261126-101500-ab12") == "socrates-smoke-20261126-101500-ab12"  # short ids as they are
    assert a == cluster_name_for(f"{long_name}-20261126-101500-ab12")  # the same run finds its cluster again


def test_a_hung_pull_fails_instead_of_hanging(tmp_path, monkeypatch):
    """The real adapter's rsync_down: a stalled transfer ends in an error the download retries handle."""
    from launcher import sky_adapter

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rsync").write_text("#!/bin/sh\nexec sleep 60\n")
    (bin_dir / "rsync").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(sky_adapter, "RSYNC_CEILING_S", 1)
    t0 = time.time()
    with pytest.raises(RuntimeError, match="did not finish in 1 s"):
        sky_adapter.SkyAdapter.rsync_down(object(), "socrates-x", "~/sky_workdir/out", tmp_path / "dl")
    assert time.time() - t0 < 10


def test_status_of_a_run_whose_launch_request_is_still_queued_says_up(tmp_path, monkeypatch):
    """A launcher killed while its request waits on a busy API server: SkyPilot lists no cluster yet,
    but the request will make one and bill it. That is 'up' (with `down` to end it), not 'gone'."""
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    from launcher import registry
    from launcher.backends.sky import SkyBackend
    from launcher.verbs.status import reconcile

    class QueuedRequest:  # the real backend around an adapter whose server still holds the request
        def __init__(self):
            self.in_flight, self.cancelled = True, []

        def cluster_state(self, cluster):
            return "gone"

        def request_in_flight(self, request_id):
            return self.in_flight

        def request_cluster(self, request_id):  # SkyPilot's record ties the request to the run's cluster
            return cluster_name_for(run.id)

        def cancel(self, request_id):
            self.cancelled.append(request_id)
            self.in_flight = False

        def down(self, cluster):
            pass

    run = registry.new_run("queued", "sky", config={})
    from launcher.backends.sky import cluster_name_for

    run.transition("provisioning", backend_state={"cluster": cluster_name_for(run.id), "request_id": "req-1"},
                   machine="up")
    adapter = QueuedRequest()
    backend = SkyBackend(adapter=adapter)
    assert reconcile(run, backend) == "up" and run.state == "provisioning"  # not marked failed and gone
    backend.down(run)
    assert adapter.cancelled == ["req-1"] and reconcile(run, backend) == "gone" and run.state == "failed"


@pytest.mark.sky
def test_the_real_adapter_asks_the_api_server_about_a_request(sky_home):
    code = "from launcher.sky_adapter import SkyAdapter; print(SkyAdapter().request_in_flight('no-such-request'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=sky_home.env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "False", r.stdout + r.stderr
