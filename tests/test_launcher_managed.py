"""`up --spot/--managed` on the launcher side, through tests/fakesky.py's fake managed-jobs controller
with the fake job (tests/fakejob.py, fast): status, logs and down on a managed run after the launcher
was SIGKILLed (acceptance 4 of issue 15), a run followed only after it ended (the laptop off the whole
run), the flags refused where they mean nothing. The real job across preemptions: test_managed_jobs.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from contracts import manifest
from contracts.events import read_all
from conftest import wait_until as _wait_until
from launcher_helpers import REPO, cli, fake_managed_cloud, only_run, pid_alive, spawn, wait_for_state


@pytest.fixture
def cloud(tmp_path):
    with fake_managed_cloud(tmp_path) as env:
        yield env


def up(bucket: Path, *extra: str) -> list[str]:
    return ["up", "--infra", "sky", "--gpu", "A100-80GB:1", "--config", "configs/smoke.yaml", "--spot",
            "--bucket", f"file://{bucket}", "--yes", *extra]


def job_dir(env: dict, rec: dict) -> Path:
    return Path(env["FAKESKY_DIR"]) / "jobs" / str(rec["backend_state"]["job_id"])


def job_state(env: dict, rec: dict) -> dict:
    return json.loads((job_dir(env, rec) / "state.json").read_text())


def wait_until(cond, timeout: float = 120, what: str = "the condition"):
    """conftest's wait_until with this module's longer default (a fake managed job's whole life)."""
    return _wait_until(cond, timeout=timeout, interval=0.1, what=what)


def launch_steps(env: dict, rec: dict, launch: int) -> int:
    log = job_dir(env, rec) / f"launch-{launch}" / "workdir" / "job.log"
    return log.read_text().count('"event":"step"') if log.is_file() else 0


def up_then_kill_the_launcher(env: dict, bucket: Path, what: str) -> tuple[Path, dict]:
    """`up --spot` in the background, SIGKILLed once the first launch trained 2 steps: (runs, its record)."""
    runs = Path(env["SOCRATES_RUNS_DIR"])
    proc = spawn(up(bucket), env)
    wait_for_state(runs, ("running",), timeout=120)
    rec = only_run(runs)
    wait_until(lambda: launch_steps(env, rec, 1) >= 2, what=what)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return runs, rec


def detached_until_done(env: dict, bucket: Path, *extra: str) -> tuple[Path, dict, str]:
    """`up --spot --detach` (the launcher returns at once), then the managed job left to SUCCEED by
    itself: (the runs folder, the run's record, what up printed)."""
    r = cli(up(bucket, "--detach", *extra), env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    runs = Path(env["SOCRATES_RUNS_DIR"])
    rec = only_run(runs)
    wait_until(lambda: job_state(env, rec)["status"] == "SUCCEEDED", what="the job ending by itself")
    return runs, rec, r.stdout


@pytest.mark.slow
def test_status_logs_down_after_the_launcher_was_sigkilled(cloud, tmp_path):
    """Acceptance 4: the launcher dies mid-run; the managed job goes on (and is preempted once meanwhile);
    status shows its state and recovery count, logs follows it across the relaunch to the end, downloads
    from the bucket, verifies and deletes it; down is then a no-op."""
    env = {**cloud, "FAKEJOB_STEPS": "40", "FAKEJOB_STEP_S": "0.1", "FAKESKY_PREEMPT": "1", "FAKESKY_SEED": "3"}
    runs, rec = up_then_kill_the_launcher(env, tmp_path / "bucket", "the first launch training")
    wait_until(lambda: job_state(cloud, rec)["recovery_count"] == 1 and launch_steps(cloud, rec, 2) >= 1,
               what="the preemption and relaunch, with no launcher")
    rec = only_run(runs)
    assert rec["state"] == "running" and rec["options"]["managed_job"] is True

    r = cli(["status", rec["id"]], env)
    out = " ".join(r.stdout.split())
    assert r.returncode == 0 and "machine: up" in out and "state: running" in out, r.stdout + r.stderr
    assert "job RUNNING" in out and "recoveries 1" in out and f"bucket file://{tmp_path / 'bucket'}" in out

    r = cli(["logs", rec["id"]], env, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = only_run(runs)
    assert rec["state"] == "done" and rec["verified"] and manifest.verify(rec["dir"]) == []
    events = read_all(Path(rec["dir"]) / "events.jsonl")
    assert [e["launch"] for e in events if e["event"] == "preempted"] == [2]
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start" and e.get("verb") == "train")
    assert [e["step"] for e in events[last_start:] if e["event"] == "step"] == list(range(1, 41))  # none lost
    keys = [(e["event"], e["ts"]) for e in events if e["event"] != "phase"]
    assert len(keys) == len(set(keys))  # none doubled across the kill and the relaunch
    assert job_state(cloud, rec)["status"] == "SUCCEEDED"
    assert not (tmp_path / "bucket" / rec["id"]).exists() and rec["backend_state"]["bucket_deleted"]

    r = cli(["down", rec["id"]], env)
    assert r.returncode == 0 and only_run(runs)["state"] == "done"
    r = cli(["status", rec["id"]], env)
    assert "machine:  gone" in r.stdout and "state:    done" in r.stdout and "(deleted)" in r.stdout
    listed = json.loads(cli(["runs", "--json"], env).stdout)
    assert [(x["id"], x["state"], x["infra"]) for x in listed] == [(rec["id"], "done", "sky")]


def test_down_after_the_launcher_was_sigkilled_cancels_the_managed_job(cloud, tmp_path):
    env = {**cloud, "FAKEJOB_STEPS": "600", "FAKEJOB_STEP_S": "0.1"}
    runs, rec = up_then_kill_the_launcher(env, tmp_path / "bucket", "the job training")
    jdir = job_dir(cloud, rec)
    controller, job = int((jdir / "controller.pid").read_text()), int((jdir / "job.pid").read_text())
    assert pid_alive(controller) and pid_alive(job)  # the managed job outlived the launcher

    r = cli(["down", rec["id"]], env)
    assert r.returncode == 0 and "machine down" in r.stdout, r.stdout + r.stderr
    assert job_state(cloud, rec)["status"] == "CANCELLED"
    wait_until(lambda: not pid_alive(controller) and not pid_alive(job), timeout=30, what="the job's processes ended")
    rec = only_run(runs)
    assert rec["state"] == "torn_down" and rec["machine"] == "gone"
    # Nothing was verified here: the bucket holds the only copy of what was trained, so it stays.
    assert (tmp_path / "bucket" / rec["id"] / "managed" / "launches.json").is_file()
    assert rec["backend_state"]["bucket_kept"] is True
    r = cli(["status", rec["id"]], env)
    assert "machine:  gone" in r.stdout and "job CANCELLED" in " ".join(r.stdout.split())
    assert cli(["down", rec["id"]], env).returncode == 0  # idempotent


def test_a_run_followed_only_after_it_ended_is_downloaded_from_the_bucket(cloud, tmp_path):
    """The laptop was off for the whole run (--detach, then nothing): the job ended on its own and its
    machine with it; `status` says the results wait, `logs` pulls them from the bucket and verifies them."""
    env = {**cloud, "FAKEJOB_STEPS": "5"}
    _, rec, said = detached_until_done(env, tmp_path / "bucket", "--keep-bucket")
    assert "managed-jobs controller keeps it running" in " ".join(said.split())
    r = cli(["status", rec["id"]], env)
    assert "machine:  up" in r.stdout and "job SUCCEEDED" in " ".join(r.stdout.split())
    r = cli(["logs", rec["id"]], env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert rec["state"] == "done" and rec["verified"] and manifest.verify(rec["dir"]) == []
    steps = [e["step"] for e in read_all(Path(rec["dir"]) / "events.jsonl") if e["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5]
    assert (tmp_path / "bucket" / rec["id"] / "out" / "manifest.json").is_file()  # --keep-bucket
    assert rec["backend_state"].get("bucket_kept") is True


@pytest.mark.parametrize("args,needle", [
    (["--infra", "local", "--managed"], "--managed: not accepted with --infra local"),
    (["--bucket", "s3://x"], "--bucket: only with --spot or --managed"),
    (["--spot", "--bucket", "ftp://x"], "--bucket: bucket 'ftp://x': scheme 'ftp' is not accepted"),
    (["--managed", "--keep-bucket", "--bucket", "gs://"], "--bucket: bucket 'gs://': name '' is not accepted"),
    (["--infra", "sky", "--gpu", "A100-80GB:1", "--nodes", "2", "--spot"],
     "--nodes 2: not accepted with --spot/--managed"),
    (["--infra", "sky", "--gpu", "A100-80GB:1", "--nodes", "2", "--managed"],
     "--nodes 2: not accepted with --spot/--managed"),
])
def test_managed_flags_refused_in_one_line(cloud, tmp_path, args, needle):
    r = cli(["up", "--config", "configs/smoke.yaml", "--yes", *args], cloud)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert not Path(cloud["SOCRATES_RUNS_DIR"]).exists()  # nothing created


def test_dryrun_shows_the_managed_task(cloud):
    r = cli(["up", "--infra", "sky", "--gpu", "A100-80GB:1", "--config", "configs/smoke.yaml", "--spot", "--dryrun", "--yes"], cloud)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "SOCRATES_MANAGED: '1'" in out and "/socrates-bucket" in out and "MOUNT_CACHED" in out
    assert "job_recovery" in out and "use_spot: true" in out


def test_the_real_sdk_takes_the_managed_task_with_its_bucket_mount_and_recovery():
    """SkyPilot's own parser (no API server needed) on what `up --spot --bucket URL` renders."""
    sky = pytest.importorskip("sky", reason="skypilot is not installed")
    from types import SimpleNamespace

    from contracts.config import load_config
    from launcher import task as tasklib
    from launcher.registry import RunOptions

    run = SimpleNamespace(id="r1", name="paper", config=load_config(REPO / "configs" / "paper.yaml").to_dict(),
                          options=RunOptions(deadline_s=3600, managed_job=True))
    run.config["storage"]["bucket"] = "s3://my-bucket"
    task = sky.Task.from_yaml_config(tasklib.render(run, gpu="A100:1", spot=True))
    storage = task.storage_mounts["/socrates-bucket"]
    res = list(task.resources)[0]
    assert storage.source == "s3://my-bucket" and str(storage.mode).endswith("MOUNT_CACHED")
    assert storage.persistent is True  # the results outlive the job; the launcher deletes them after verifying
    assert res.use_spot is True and res.job_recovery == {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 0}
    assert task.envs["OUT"] == "/socrates-bucket/r1/out" and task.envs["SOCRATES_MANAGED"] == "1"  # the run's folder
    assert task.envs["SOCRATES_BUCKET"] == "s3://my-bucket" and task.envs["DEADLINE_S"] == "3600"


def test_a_managed_job_that_finds_no_capacity_fails_in_one_line_and_leaves_nothing_running(cloud, tmp_path):
    r = cli(up(tmp_path / "bucket"), {**cloud, "FAKESKY_FAIL": "provision"})
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert rec["state"] == "failed" and rec["error"].startswith("provisioning") and "no capacity" in rec["error"]
    assert job_state(cloud, rec)["status"] == "FAILED_NO_RESOURCE" and rec["machine"] == "gone"
    assert "Traceback" not in r.stdout + r.stderr


def test_a_job_that_fails_by_itself_is_not_relaunched_and_the_run_fails(cloud, tmp_path):
    r = cli(up(tmp_path / "bucket"), {**cloud, "FAKEJOB_FAIL": "train"})
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    st = job_state(cloud, rec)
    assert st["status"] == "FAILED" and st["recovery_count"] == 0 and st["launch"] == 1  # max_restarts_on_errors: 0
    assert rec["state"] == "failed" and rec["error"].startswith("running: the job exited with status 1")
    assert "no finished adapter" in rec["error"] and not rec["verified"]
    assert rec["backend_state"]["bucket_kept"] is True  # nothing verified: what the bucket holds stays


def test_down_before_a_download_keeps_the_bucket_loudly_and_download_still_pulls_it(cloud, tmp_path):
    """Finding 1: `down` on a run whose results were never verified here keeps the bucket, says so with
    its URL and the commands that pull or delete it; the job SUCCEEDED, so `download` still pulls the
    adapter from it afterwards; a later `down` (now verified) deletes it."""
    env = {**cloud, "FAKEJOB_STEPS": "5"}
    runs, rec, _ = detached_until_done(env, tmp_path / "bucket")
    r = cli(["down", rec["id"]], env)
    out = " ".join(r.stdout.split())
    assert r.returncode == 0 and "machine down" in out, r.stdout + r.stderr
    assert f"bucket file://{tmp_path / 'bucket'}/{rec['id']}/ is KEPT" in out, out
    assert f"socrates-launch download {rec['id']}" in out and f"socrates-launch down {rec['id']} --delete-bucket" in out
    assert (tmp_path / "bucket" / rec["id"] / "out" / "manifest.json").is_file()
    r = cli(["status", rec["id"]], env)
    assert "machine:  up" in r.stdout, r.stdout  # the results still wait in the bucket
    r = cli(["download", rec["id"]], env)
    assert r.returncode == 0 and "(verified)" in r.stdout, r.stdout + r.stderr
    rec = only_run(runs)
    assert rec["verified"] and manifest.verify(rec["dir"]) == [] and (Path(rec["dir"]) / "adapter").is_dir()
    r = cli(["down", rec["id"]], env)
    assert r.returncode == 0 and "KEPT" not in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "bucket" / rec["id"]).exists() and only_run(runs)["backend_state"]["bucket_deleted"]


def test_down_delete_bucket_deletes_an_unverified_runs_bucket(cloud, tmp_path):
    env = {**cloud, "FAKEJOB_STEPS": "5"}
    runs, rec, _ = detached_until_done(env, tmp_path / "bucket")
    assert (tmp_path / "bucket" / rec["id"]).is_dir()
    r = cli(["down", rec["id"], "--delete-bucket"], env)
    assert r.returncode == 0 and "KEPT" not in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "bucket" / rec["id"]).exists() and only_run(runs)["backend_state"]["bucket_deleted"]
    r = cli(["status", rec["id"]], env)
    assert "machine:  gone" in r.stdout and "(deleted)" in r.stdout, r.stdout


def _edit_record(rec: dict, **backend_state) -> None:
    path = Path(rec["dir"]) / "run.json"
    data = json.loads(path.read_text())
    data["backend_state"].update(backend_state)
    path.write_text(json.dumps(data))


def test_an_edited_record_never_gets_another_bucket_deleted_whole(cloud, tmp_path):
    """Finding 4: `bucket_made` in run.json counts only for the name the launcher gives a run's bucket;
    a record claiming it made the user's own bucket gets only the run's folder in it deleted."""
    env = {**cloud, "FAKEJOB_STEPS": "3"}
    bucket = tmp_path / "bucket"
    _, rec, _ = detached_until_done(env, bucket)
    (bucket / "precious.txt").write_text("the user's own data")
    _edit_record(rec, bucket_made=True)
    r = cli(["down", rec["id"], "--delete-bucket"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (bucket / rec["id"]).exists()  # the run's folder went
    assert (bucket / "precious.txt").read_text() == "the user's own data"  # the rest of the bucket stayed


@pytest.mark.slow
def test_an_edited_record_never_gets_another_runs_job_cancelled(cloud, tmp_path):
    """Finding 4: down cancels only a managed job whose name is this run's; a run.json whose job_id names
    another job is refused loudly (exit 1, TEARDOWN FAILED) and that job runs on."""
    env = {**cloud, "FAKEJOB_STEPS": "600", "FAKEJOB_STEP_S": "0.1"}
    runs = Path(cloud["SOCRATES_RUNS_DIR"])
    for sub in ("a", "b"):
        r = cli(up(tmp_path / f"bucket-{sub}", "--detach"), env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    recs = [json.loads(p.read_text()) for p in runs.glob("*/run.json")]
    a, b = sorted(recs, key=lambda x: x["backend_state"]["job_id"])
    wait_until(lambda: job_state(cloud, b)["status"] == "RUNNING", what="the other run's job running")
    _edit_record(a, job_id=b["backend_state"]["job_id"])
    r = cli(["down", a["id"]], env)
    assert r.returncode == 1 and "TEARDOWN FAILED" in r.stdout and "not cancelled" in r.stdout, r.stdout + r.stderr
    assert job_state(cloud, b)["status"] == "RUNNING"


def test_a_failed_launch_request_is_no_job_and_down_goes_on_to_the_bucket(cloud, tmp_path):
    """Finding 2: the `sky.jobs.launch` request itself failed (its id recorded, no job made): teardown
    (in `up`, then every `down`) finds no job to cancel instead of failing on the request's error
    forever, and reaches the bucket (kept and said: nothing was verified)."""
    env = {**cloud, "FAKESKY_FAIL": "request"}
    r = cli(up(tmp_path / "bucket"), env)
    assert r.returncode == 1 and "TEARDOWN FAILED" not in r.stdout, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert rec["backend_state"]["request_id"] and rec["backend_state"].get("job_id") is None
    assert rec["machine"] == "gone" and rec["backend_state"]["launch_failed"] is True
    for _ in range(2):
        r = cli(["down", rec["id"]], env)
        out = " ".join(r.stdout.split())
        assert r.returncode == 0 and "TEARDOWN FAILED" not in out and "machine down" in out, r.stdout + r.stderr
        assert "is KEPT" in out and "--delete-bucket" in out
    assert only_run(Path(cloud["SOCRATES_RUNS_DIR"]))["backend_state"]["bucket_kept"] is True


@pytest.mark.parametrize("cloud,url", [("gcp", "gs://socrates-r1"), ("GCP", "gs://socrates-r1"),
                                       ("aws", "s3://socrates-r1"), (None, "s3://socrates-r1"),
                                       ("lambda", "s3://socrates-r1")])
def test_the_bucket_made_for_a_run_is_on_its_clouds_store(cloud, url):
    """Finding 9: without --bucket the run's bucket is made where --cloud keeps buckets (gcp: gs://), and
    the rendered task mounts that one; a --bucket URL is used as given."""
    from types import SimpleNamespace

    from contracts.config import load_config
    from launcher import task as tasklib
    from launcher.bucket import url_for_run as bucket_url_for
    from launcher.registry import RunOptions

    run = SimpleNamespace(id="r1", name="paper", config=load_config(REPO / "configs" / "paper.yaml").to_dict(),
                          options=RunOptions(deadline_s=3600, managed_job=True, cloud=cloud))
    url = f"{url}-{hashlib.sha256(b'r1').hexdigest()[:8]}"  # the name carries a hash of the whole run id
    assert bucket_url_for(run) == url
    task = tasklib.render(run, gpu="A100:1", spot=True)
    assert task["envs"]["SOCRATES_BUCKET"] == url and url in json.dumps(task["file_mounts"])
    run.config["storage"]["bucket"] = "s3://mine/team/"
    assert bucket_url_for(run) == "s3://mine/team"
