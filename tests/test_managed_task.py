"""The managed-job task (launcher/task.py `render(managed=True, bucket_url=...)`) through the real SkyPilot SDK.

SkyPilot 0.14's `sky.jobs.launch` has no dry run (it starts a jobs controller), so what the SDK can check
offline is checked, in a subprocess with the seeded HOME of tests/skyfix.py and the S3 server of
tests/s3server.py:
  1. `sky.Task.from_yaml_config` (the task schema: file_mounts with `source`/`mode`, resources.job_recovery);
  2. `dag.validate()` and the chain-DAG YAML round trip that `jobs.launch` sends to the controller;
  3. SkyPilot's own S3 store for the mount, constructed against the bucket the launcher made (`source:` an
     existing bucket: SkyPilot looks it up through boto3 at AWS_ENDPOINT_URL, i.e. the moto server);
  4. the optimizer's dry run (`Optimizer.optimize`, in-process on the seeded catalog): the spot offer.
The launch-through-the-API-server dry run cannot take the mount here: the server would need AWS
credentials for the bucket (`sky check` with AWS storage enabled), which the offline server has not.
"""
from __future__ import annotations

import hashlib
import json

import pytest

from contracts.errors import ContractError
from conftest import REPO
from launcher import registry, task as tasklib
from s3server import s3_server  # noqa: F401  (the fixture)

RUN_ID = "smoke-20261201-031500-ab12"

_SDK = r"""
import copy, json, os, sys
sys.path.insert(0, os.getcwd())
import sky
from sky import global_user_state
from sky.clouds import CloudCapability
from sky.utils import dag_utils
from launcher import registry, task as tasklib
from launcher.bucket import Bucket, default_url
from contracts.config import load_config

cfg = load_config("configs/paper.yaml").with_overrides({"data.subset": 0.1})
run = registry.Run(id=sys.argv[1], dir="/nonexistent", config=cfg.to_dict(), options={"eval": True, "deadline_s": 3600})
url = default_url(run.id)
Bucket.from_url(url).create()  # what `up` does before launching: the mount's source must exist
import pathlib, tempfile
from launcher import stage
staged = stage.build(pathlib.Path(tempfile.mkdtemp()) / "code")  # what a run's workdir is (runs/<id>/code)
conf = tasklib.render(run, gpu="A100-80GB:1", spot=True, managed=True, bucket_url=url, workdir=staged.path)
got = {}
task = sky.Task.from_yaml_config(copy.deepcopy(conf))  # (from_yaml_config consumes its argument)
got["workdir"] = [task.workdir, str(staged.path)]
res = list(task.resources)[0]
got["job_recovery"] = res.job_recovery
got["use_spot"] = res.use_spot
st = task.storage_mounts["/socrates-bucket"]
got["mount"] = [st.source, st.mode.value]
got["envs"] = {k: task.envs[k] for k in ("OUT", "SOCRATES_CHECKPOINT_DIR", "SOCRATES_MANAGED", "SOCRATES_BUCKET")}
dag = dag_utils.convert_entrypoint_to_dag(task)
dag.resolve_and_validate_volumes()
dag.validate()
# What jobs.launch hands the controller: the DAG as YAML, loaded back there.
back = dag_utils.load_chain_dag_from_yaml_str(dag_utils.dump_chain_dag_to_yaml_str(dag)).tasks[0]
bres = list(back.resources)[0]
got["round_trip"] = [bres.job_recovery, {p: [s.source, s.mode.value] for p, s in back.storage_mounts.items()}]
# SkyPilot's own S3 store for the mount (S3 storage enabled as `sky check` would with AWS credentials).
global_user_state.set_enabled_clouds(["AWS"], CloudCapability.STORAGE, "default")
try:
    st.construct()
    got["store"] = [str(k.value) for k in st.stores]
    got["store_name"] = st.name
    missing = sky.Task.from_yaml_config({"file_mounts": {"/m": {"source": "s3://socrates-not-made", "mode": "MOUNT"}}})
    try:
        missing.storage_mounts["/m"].construct()
        got["missing_bucket"] = "accepted"
    except Exception as e:
        got["missing_bucket"] = [type(e).__name__, "non-existent bucket" in str(e)]
    # The optimizer's dry run on the seeded catalog, in this process.
    from sky import optimizer
    optimizer.Optimizer.optimize(dag, quiet=True)
    best = dag.tasks[0].best_resources
    got["best"] = [str(best.cloud), best.instance_type, best.use_spot, best.get_cost(3600)]
finally:
    global_user_state.set_enabled_clouds([], CloudCapability.STORAGE, "default")
print(json.dumps(got))
"""


@pytest.mark.sky
def test_real_sdk_accepts_the_managed_task_with_its_mount_and_job_recovery(sky_home, s3_server):
    proc_env = {**sky_home.env, **s3_server.env}
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _SDK, RUN_ID], env=proc_env, capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    name = f"socrates-{RUN_ID}-{hashlib.sha256(RUN_ID.encode()).hexdigest()[:8]}"  # named after the run, with its hash
    out = f"/socrates-bucket/{RUN_ID}/out"
    assert got["job_recovery"] == {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 0}
    assert got["use_spot"] is True
    assert got["workdir"][0] == got["workdir"][1]  # the staged folder, not the checkout
    assert got["mount"] == [f"s3://{name}", "MOUNT_CACHED"]
    assert got["envs"] == {"OUT": out, "SOCRATES_CHECKPOINT_DIR": f"{out}/checkpoints", "SOCRATES_MANAGED": "1",
                           "SOCRATES_BUCKET": f"s3://{name}"}
    assert got["round_trip"] == [got["job_recovery"], {"/socrates-bucket": [f"s3://{name}", "MOUNT_CACHED"]}]
    assert got["store"] == ["S3"] and got["store_name"] == name
    assert got["missing_bucket"] == ["StorageBucketGetError", True]  # SkyPilot really asked the S3 server
    # The seeded catalog's only spot A100-80GB: RunPod 1x_A100-80GB_SECURE at $1.19/h (on demand $1.39).
    cloud, instance, spot, cost = got["best"]
    assert cloud.lower() == "runpod" and instance == "1x_A100-80GB_SECURE" and spot is True
    assert abs(cost - 1.19) < 1e-6


# --- render's own rules (no SkyPilot needed) ------------------------------------------------------

def _run(options: dict | None = None, storage: dict | None = None) -> registry.Run:
    from contracts.config import load_config

    cfg = load_config("configs/smoke.yaml").to_dict()
    if storage:
        cfg["storage"].update(storage)
    return registry.Run(id=RUN_ID, dir="/nonexistent", config=cfg, options={"eval": True, **(options or {})})


def test_job_recovery_comes_from_the_config_then_the_defaults():
    conf = tasklib.render(_run(), gpu="A100:1", managed=True, bucket_url="r2://socrates-x/team")
    assert conf["resources"]["job_recovery"] == {"strategy": tasklib.DEFAULT_JOB_RECOVERY,
                                                 "max_restarts_on_errors": tasklib.DEFAULT_MAX_RESTARTS_ON_ERRORS}
    assert conf["file_mounts"]["/socrates-bucket"] == {"source": "r2://socrates-x", "mode": "MOUNT_CACHED"}
    assert conf["envs"]["OUT"] == f"/socrates-bucket/team/{RUN_ID}/out"
    run = _run(storage={"job_recovery": "FAILOVER", "max_restarts_on_errors": 2})
    conf = tasklib.render(run, gpu="A100:1", managed=True, bucket_url="s3://socrates-x")
    assert conf["resources"]["job_recovery"] == {"strategy": "FAILOVER", "max_restarts_on_errors": 2}


def test_an_unmanaged_task_has_no_mount_and_the_template_is_unchanged():
    conf = tasklib.render(_run(), gpu="A100:1", spot=True)
    assert "job_recovery" not in conf["resources"] and "/socrates-bucket" not in (conf.get("file_mounts") or {})
    assert conf["envs"]["OUT"] == "out" and conf["envs"].get("SOCRATES_MANAGED", "0") == "0"
    assert "job_recovery" not in tasklib.load_template()["resources"]


@pytest.mark.parametrize("kw,bad", [
    ({"managed": True}, "needs a bucket"),
    ({"managed": True, "bucket_url": "s3://Bad_Name"}, "Bad_Name"),
    ({"managed": False, "bucket_url": "s3://socrates-x"}, "managed runs only"),
])
def test_bad_managed_inputs_are_one_line(kw, bad):
    with pytest.raises(ContractError, match=bad) as err:
        tasklib.render(_run(), gpu="A100:1", **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("storage,bad", [
    ({"job_recovery": "SOMETIMES"}, "SOMETIMES"),
    ({"max_restarts_on_errors": -1}, "-1"),
])
def test_bad_recovery_settings_in_a_record_are_one_line(storage, bad):
    with pytest.raises(ContractError, match=bad):
        tasklib.render(_run(storage=storage), gpu="A100:1", managed=True, bucket_url="s3://socrates-x")


@pytest.mark.parametrize("storage,bad", [
    ("bucket: ftp://host/x", "storage.bucket"),
    ("bucket: s3://", "storage.bucket"),
    ("job_recovery: SOMETIMES", "storage.job_recovery"),
    ("max_restarts_on_errors: -1", "storage.max_restarts_on_errors"),
    ("keep_bucket: perhaps", "storage.keep_bucket"),
    ("region: us-east-1", "region"),
])
def test_the_configs_storage_section_is_checked_in_one_line(tmp_path, storage, bad):
    from contracts.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"storage:\n  {storage}\n")
    with pytest.raises(ContractError, match=bad.replace(".", r"\.")) as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_the_configs_storage_section_reaches_the_task(tmp_path):
    from contracts.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("storage:\n  bucket: s3://team-bucket/socrates\n  keep_bucket: true\n"
                    "  job_recovery: failover\n  max_restarts_on_errors: 3\n")
    with pytest.raises(ContractError, match="job_recovery"):  # choices are exact, as SkyPilot spells them
        load_config(path)
    path.write_text(path.read_text().replace("failover", "FAILOVER"))
    cfg = load_config(path)
    assert (cfg.storage.bucket, cfg.storage.keep_bucket) == ("s3://team-bucket/socrates", True)
    run = registry.Run(id=RUN_ID, dir="/nonexistent", config=cfg.to_dict(), options={})
    conf = tasklib.render(run, gpu="A100:1", managed=True, bucket_url=cfg.storage.bucket)
    assert conf["resources"]["job_recovery"] == {"strategy": "FAILOVER", "max_restarts_on_errors": 3}
    assert conf["envs"]["OUT"] == f"/socrates-bucket/socrates/{RUN_ID}/out"
    assert conf["file_mounts"]["/socrates-bucket"]["source"] == "s3://team-bucket"


def test_bucket_credentials_never_reach_the_rendered_task(monkeypatch):
    canary, key_id = "canary-secret-access-key-not-a-real-one", "canary-access-key-id-not-a-real-one"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    conf = tasklib.render(_run(), gpu="A100:1", spot=True, managed=True, bucket_url="s3://socrates-x")
    text = tasklib.to_yaml(conf)
    assert canary not in text and key_id not in text and "s3://socrates-x" in text
