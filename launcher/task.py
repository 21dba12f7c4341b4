"""Renders sky/train.yaml for one run: the single truth of what runs on the machine.

SkyPilot gets the whole task; the local and SSH backends take `run_script(task)` (the `run:` block
with the task's envs exported in front) and execute it with bash in their working directory.
Secret values never enter a rendered task: only the names of those set, under `secrets:` with null
values; the values go to SkyPilot at launch as secrets (`secrets_overrides`).
"""
from __future__ import annotations

import copy
import shlex
from pathlib import Path

import yaml

from contracts.config import JOB_RECOVERY_STRATEGIES, from_dict
from contracts.sizing import full_disk, machine_disk_gb
from contracts.errors import ContractError
from launcher import resources
from launcher.bucket import Bucket, url_for_run
from launcher.registry import Run
from launcher.secrets import SECRET_NAMES

TEMPLATE = resources.path(resources.TEMPLATE)  # shipped in the package (launcher/resources)
REMOTE_DATA_DIR = "/tmp/socrates-data"
# In the job image (Dockerfile): the lock's venv; setup then only stamps the deadline's start.
IMAGE_PYTHON = "/opt/venv/bin/python"
IMAGE_SETUP = "set -euo pipefail\ndate +%s > .socrates-t0  # the job image has the lock installed: nothing to install\n"
# A managed run (`up --spot` / `--managed`): the bucket is mounted here (MOUNT_CACHED: writes land on
# local disk and are uploaded in the background, so a checkpoint save is not held up by the network).
BUCKET_MOUNT = "/socrates-bucket"
BUCKET_MODE = "MOUNT_CACHED"
# SkyPilot's job_recovery for a managed run, when neither the config's `storage:` nor a flag says:
# relaunch in the next cheapest region after a preemption (SkyPilot's own default strategy), and do
# not relaunch a job that failed by itself (each relaunch is paid; a deterministic failure repeats).
DEFAULT_JOB_RECOVERY = "EAGER_NEXT_REGION"
DEFAULT_MAX_RESTARTS_ON_ERRORS = 0


def load_template(path: Path = TEMPLATE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def render(run: Run, *, gpu: str | None, cloud: str | None = None, spot: bool = False,
           data_path: Path | None = None, secret_names: tuple[str, ...] = (), template: Path = TEMPLATE,
           managed: bool = False, bucket_url: str | None = None, workdir: Path | None = None) -> dict:
    """The task for `run` (its resolved config and options), ready for sky.Task.from_yaml_config.
    `workdir`: the run's staged folder, what SkyPilot syncs (None: the local and SSH backends ship it
    themselves). `managed`: as a SkyPilot managed job: the bucket `bucket_url` (it must exist) mounted at
    BUCKET_MOUNT, OUT inside it at `<prefix>/<run id>/out` (checkpoints in OUT/checkpoints, so a relaunch
    resumes from them), SOCRATES_MANAGED=1, and `resources.job_recovery` from the config's `storage:`,
    else the defaults above."""
    task = copy.deepcopy(load_template(template))
    opts = run.options
    cfg = run.config
    envs = task.setdefault("envs", {})
    envs["CONFIG_YAML"] = yaml.safe_dump(cfg, sort_keys=False)
    envs["DATA"] = ""  # the config's data.source; DATA names only where a shipped local file/folder lands
    envs["DEADLINE_S"] = str(int(opts.deadline_s)) if opts.deadline_s else "0"
    nodes = opts.nodes
    if nodes > 1:
        task["num_nodes"] = nodes
    else:
        task.pop("num_nodes", None)
    envs["NPROC_PER_NODE"] = str(opts.ranks) if opts.ranks else ""
    task["name"] = f"socrates-{run.name}"[:60]
    resources = task.setdefault("resources", {})
    if gpu:
        resources["accelerators"] = gpu
    else:
        resources.pop("accelerators", None)
    if cloud:
        resources["infra"] = cloud
    resources["use_spot"] = bool(spot)
    if cfg.get("train", {}).get("method") == "full":
        resources["disk_size"] = full_disk_size(cfg, nodes, int(resources.get("disk_size") or 0))
    if workdir is not None:
        task["workdir"] = str(workdir)
    else:
        task.pop("workdir", None)
    image = opts.image
    if image:  # the prebuilt job image: SkyPilot runs setup and run inside it, nothing to install
        resources["image_id"] = f"docker:{image}"
        task["setup"] = IMAGE_SETUP
        envs["JOB_PYTHON"] = IMAGE_PYTHON
        envs["SOCRATES_IMAGE"] = image  # the job writes it into manifest.json
    if data_path is not None:
        remote = f"{REMOTE_DATA_DIR}/{data_path.name}"
        task["file_mounts"] = {remote: str(data_path.resolve())}
        envs["DATA"] = remote
    if opts.managed_job and not managed:  # a managed run's preview (dry run): the bucket it would get
        managed, bucket_url = True, bucket_url or url_for_run(run)
    if managed:
        _render_managed(task, run, bucket_url)
    elif bucket_url:
        raise ContractError(f"bucket {bucket_url}: a bucket is used by managed runs only (up --spot or --managed)")
    # Only the secrets the user has set: SkyPilot refuses a declared secret that gets no value.
    task.pop("secrets", None)
    names = [n for n in SECRET_NAMES if n in secret_names]
    if names:
        task["secrets"] = {name: None for name in names}
    return task


def full_disk_size(config: dict, nodes: int, floor_gb: int) -> int:
    """`resources.disk_size` for a full fine-tune: contracts/sizing.py's need (the kept sharded checkpoints
    at 12 B/param over the nodes, the output weights, the base, what `job check` keeps free) for this
    config, plus the machine image and venv and a margin; never below the template's `floor_gb`."""
    from launcher.cost.rates import model_params_b  # keeps --help light (launcher/cost/)

    rc = from_dict(config)
    t = rc.train
    need = full_disk(model_params_b(rc) * 1e9, nodes=nodes, checkpoint_every=t.checkpoint_every,
                     keep_checkpoints=t.keep_checkpoints, precision=t.precision,
                     pretrained=rc.model.init == "pretrained")
    return machine_disk_gb(need["need_gib"], floor_gb=floor_gb)


def local_data(config: dict) -> Path | None:
    """The run's data when it is a local file or folder (then it is shipped with the job); None for hub
    ids and synthetic:N. `config` is the resolved run config (RunConfig.to_dict)."""
    source = (config.get("data") or {}).get("source") or ""
    path = Path(source).expanduser()
    return path.resolve() if source and not source.startswith("synthetic:") and path.exists() else None


def _render_managed(task: dict, run: Run, bucket_url: str | None) -> None:
    if not bucket_url:
        raise ContractError("a managed run needs a bucket (--bucket s3://NAME, r2://NAME or gs://NAME, or "
                            "storage.bucket in the config; up makes one named after the run when none is given)")
    bucket = Bucket.from_url(bucket_url)
    storage = run.config.get("storage") or {}
    strategy = storage.get("job_recovery") or DEFAULT_JOB_RECOVERY
    restarts = storage.get("max_restarts_on_errors", DEFAULT_MAX_RESTARTS_ON_ERRORS)
    if str(strategy).upper() not in JOB_RECOVERY_STRATEGIES:
        raise ContractError(f"job_recovery {strategy!r} is not accepted ({' | '.join(JOB_RECOVERY_STRATEGIES)})")
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
        raise ContractError(f"max_restarts_on_errors {restarts!r} is not accepted (a whole number >= 0)")
    task["file_mounts"] = {**(task.get("file_mounts") or {}),
                           BUCKET_MOUNT: {"source": bucket.mount_source, "mode": BUCKET_MODE}}
    out = f"{BUCKET_MOUNT}/{bucket.out_prefix(run.id)}".rstrip("/")
    task["envs"].update(OUT=out, SOCRATES_CHECKPOINT_DIR=f"{out}/checkpoints", SOCRATES_MANAGED="1",
                        SOCRATES_BUCKET=bucket.url)
    task["resources"]["job_recovery"] = {"strategy": str(strategy).upper(), "max_restarts_on_errors": restarts}


def layout_line(task: dict, gpu) -> str:
    """What the dry run says about the process layout: nodes, GPUs, the torchrun line the run block builds."""
    nodes = int(task.get("num_nodes") or 1)
    per_node = int(task.get("envs", {}).get("NPROC_PER_NODE") or (gpu.count if gpu else 1))
    world = nodes * per_node
    disk = task.get("resources", {}).get("disk_size")
    disk = f"; disk {disk} GB per node" if disk else ""
    if world == 1:
        return f"layout: 1 node, 1 process (python -m job; no torchrun){disk}"
    return (f"layout: {nodes} node(s) x {per_node} GPU(s) = {world} ranks; on every node: python -m torch.distributed.run "
            f"--nnodes {nodes} --nproc-per-node {per_node} --node-rank $SKYPILOT_NODE_RANK "
            f"--master-addr <first of $SKYPILOT_NODE_IPS> --master-port 29500 -m job train|evaluate ...{disk}")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the run block, the config) as readable `|` blocks."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def to_yaml(task: dict) -> str:
    return yaml.dump(task, Dumper=_Dumper, sort_keys=False, width=100)


def run_script(task: dict, **env_overrides: str) -> str:
    """The `run:` block as a bash script, its envs exported first (what non-sky backends execute)."""
    envs = {**task.get("envs", {}), **env_overrides}
    lines = ["#!/usr/bin/env bash", "# Rendered from sky/train.yaml by launcher/task.py; the same block SkyPilot runs."]
    for key, value in envs.items():
        if not key.isidentifier():
            raise ContractError(f"sky/train.yaml: env name {key!r} is not a shell identifier")
        lines.append(f"export {key}={shlex.quote('' if value is None else str(value))}")
    run_block = task.get("run")
    if not isinstance(run_block, str) or not run_block.strip():
        raise ContractError("sky/train.yaml: the task has no `run:` block")
    return "\n".join(lines) + "\n" + run_block
