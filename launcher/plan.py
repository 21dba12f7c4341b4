"""One argument set and one resolution for `up` and `estimate`, so the two cannot disagree.

`add_arguments(p)` declares the flags both verbs take; `resolve(args)` checks every input and returns a
`Plan`: the run config after overrides (each knob the job reads goes into it), the data and caps checked,
and the run's `RunOptions`. Both verbs show `describe(plan)` / `summary(plan)` and price `estimate(plan)`,
so what `estimate` shows is what `up` would run. Nothing is created here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.config import RunConfig, check_fraction, load_config
from contracts.errors import ContractError
from contracts.manifest import data_files
from launcher import resources
from launcher.bucket import parse_url
from launcher.gpu import GpuSpec, parse_gpu
from launcher.registry import RunOptions, check_infra
from launcher.rows import check_local
from launcher.ssh_options import add_arguments as add_ssh_arguments
from launcher.ssh_options import options_from_args, parse_infra
from launcher.stage import local_ref

# The config a run gets without --config: the paper's schedule on rented GPUs; the embedded tiny one
# (no GPU, minutes) on this machine. Anything else (ssh://) gets the paper's.
DEFAULT_CONFIG = {"sky": "configs/paper.yaml", "local": "configs/smoke.yaml"}
DEFAULT_GPU = "A100:1"


def add_arguments(p: argparse.ArgumentParser, *, every_card: bool = False) -> None:
    """The flags `up` and `estimate` share. `every_card`: without --gpu, estimate every card that fits
    (`estimate`) instead of the default card (`up`)."""
    gpu_default = "every card that fits, cheapest marked" if every_card else f"{DEFAULT_GPU} on sky"
    p.add_argument("--infra", default="sky", help="where to run: sky (SkyPilot, default) | local | ssh://user@host[:port] "
                   "(local and ssh machines have no cloud price)")
    p.add_argument("--gpu", default=None, help=f"card and count, e.g. A100:1 (default: {gpu_default})")
    p.add_argument("--nodes", type=int, default=1, help="machines of --gpu each (sky): train and evaluate run under torchrun "
                   "on every GPU of every node, the global batch unchanged (default 1)")
    p.add_argument("--ranks", type=int, default=None, help="local/ssh without a GPU: start N CPU ranks (gloo) under torchrun "
                   "(the multi-GPU path, tested without GPUs)")
    p.add_argument("--subset", type=float, default=None, help="fraction of training rows kept, in (0, 1] (default: the config's)")
    p.add_argument("--config", default=None, help="run config, any path (default: the packaged configs/paper.yaml; "
                   "configs/smoke.yaml with --infra local; up and estimate alike; `socrates-launch init` writes "
                   "editable copies)")
    p.add_argument("--data", default=None, help="dataset: Hugging Face id, local .jsonl/.parquet file or folder (a prepared "
                   "folder gives exact tokens), or synthetic:N")
    p.add_argument("--model", default=None, help="base model id or path (overrides the config's model.id)")
    p.add_argument("--image", default=None, metavar="REF",
                   help="run the job in this prebuilt image (`socrates-launch image build --push REPO` prints one; "
                   "the config's `image:` otherwise); default: a venv from requirements/job.lock")
    p.add_argument("--cloud", default=None, help="pin a cloud (e.g. lambda, runpod, aws); default: the cheapest offer")
    p.add_argument("--spot", action="store_true", help="use spot/preemptible instances (cheaper), as a managed job: after a "
                   "preemption SkyPilot relaunches it and it resumes from its newest checkpoint in the run's bucket")
    p.add_argument("--managed", action="store_true", help="run on-demand as a SkyPilot managed job (outlives its machine: "
                   "checkpoints and results in a bucket; --spot implies it)")
    p.add_argument("--bucket", default=None, metavar="URL", help="managed runs: s3://NAME | gs://NAME | r2://NAME[/PATH] "
                   "(the run writes under URL/<run id>; default: a bucket named after the run, made for it)")
    p.add_argument("--keep-bucket", action="store_true", help="managed runs: keep the bucket after the verified download "
                   "(default: deleted then)")
    p.add_argument("--weights", choices=("pull", "leave"), default="pull", help="train.method full: pull the ~2 B/param "
                   "weights back (default), or leave them where they outlive the machine (a managed run's bucket) and "
                   "pull everything else; `socrates-launch download RUN` fetches them later")
    p.add_argument("--eval-rows", type=int, default=None, help="evaluate on at most N test rows")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--eval-base", action="store_true", help="also evaluate the base model (the paper's baseline)")
    p.add_argument("--max-cost", type=float, default=None, help="refuse to start if the high estimate exceeds USD; cap the "
                   "run to it (--infra sky only: local and ssh machines have no price; use --max-hours)")
    p.add_argument("--max-hours", type=float, default=None, help="stop the job after H hours of machine time (adapter saved)")
    p.add_argument("--allow-cpu", action="store_true", help="let the job run without a GPU (tests, the local demo)")
    add_ssh_arguments(p)  # --ssh-key etc.


@dataclass
class Plan:
    """Everything a run will be, validated; nothing exists yet."""

    infra: str
    cfg: RunConfig
    gpu: GpuSpec | None
    name: str
    options: RunOptions
    config_file: str


def resolve(args: argparse.Namespace, *, default_gpu: bool = True) -> Plan:
    """Check every input; raise ContractError (exit 2, one line) on the first bad one.
    `default_gpu`: without --gpu, sky runs get DEFAULT_GPU (`up`); else no card (`estimate`: every card)."""
    infra = check_infra(args.infra)
    gpu = parse_gpu(args.gpu) if args.gpu is not None else (
        parse_gpu(DEFAULT_GPU) if infra == "sky" and default_gpu else None)
    if args.subset is not None:
        check_fraction(args.subset, "--subset")
    config_file = str(args.config or default_config(infra))
    cfg = load_config(config_file)
    overrides: dict[str, Any] = {}
    if args.subset is not None:
        overrides["data.subset"] = args.subset
    if args.data is not None:
        overrides["data.source"] = check_data(args.data)
    if args.model is not None:
        overrides["model.id"] = args.model
    if args.image is not None:
        if infra == "local":
            raise ContractError(f"--image {args.image}: not accepted with --infra local (the local backend runs the "
                                "job with this machine's python; use it with SkyPilot or ssh://)")
        overrides["image"] = args.image
    if args.allow_cpu:
        overrides["allow_cpu"] = True
    check_combinations(args, infra)
    if args.bucket:  # a managed run's bucket: the config's storage section is where it is read
        try:
            parse_url(args.bucket)
        except ContractError as e:
            raise ContractError(f"--bucket: {e}") from None
        overrides["storage.bucket"] = args.bucket
    if args.keep_bucket:
        overrides["storage.keep_bucket"] = True
    if args.eval_rows is not None:
        if args.eval_rows < 1:
            raise ContractError(f"--eval-rows {args.eval_rows}: not accepted (a whole number >= 1)")
        overrides["eval.rows"] = args.eval_rows
    # One route per knob: the evaluation flags land in the run config, which the estimate prices and the job reads.
    if args.no_eval:
        overrides["eval.enabled"] = False
    if args.eval_base:
        overrides["eval.base"] = True
    if overrides:
        cfg = cfg.with_overrides(overrides, source="command line")
    check_local_rows(cfg.data.source, cfg.data.split)
    from launcher.cost.caps import check_caps  # keeps --help light (launcher/cost/)

    check_caps(args.max_cost, args.max_hours, infra)  # numbers > 0; a dollar cap only where there is a price
    name = getattr(args, "name", None) or cfg.name
    if not name or len(name) > 60 or not all(c.isalnum() or c in "._-" for c in name):
        raise ContractError(f"--name {name!r}: not accepted (letters, digits, . _ -; at most 60)")
    if args.weights == "leave" and cfg.train.method != "full":
        raise ContractError(f"--weights leave: only for train.method full (this config's method is {cfg.train.method}: "
                            "its adapter is small and always comes back)")
    managed = bool(args.spot or args.managed)  # a SkyPilot managed job (launcher/backends/managed.py)
    if managed and cfg.storage.bucket:
        try:
            parse_url(cfg.storage.bucket)
        except ContractError as e:
            raise ContractError(f"storage.bucket: {e}") from None
    # The world the job will see; its accumulation must make the global batch (contracts/config.py).
    world = (gpu.count if gpu else 1) * args.nodes if infra == "sky" else (args.ranks or 1)
    t = cfg.train
    if t.micro_batch * world > t.global_batch and t.global_batch % world == 0:
        # More GPUs than the global batch has micro-batches: each GPU takes global / world rows a step
        # (no accumulation); the global batch, and so the schedule, stays the config's.
        cfg = cfg.with_overrides({"train.micro_batch": t.global_batch // world},
                                 source=f"{world} GPUs: micro_batch {t.micro_batch} -> {t.global_batch // world}")
    cfg.train.grad_accum(world)
    ssh = None
    if infra.startswith("ssh://"):  # the SSH flags, checked before anything exists
        parse_infra(infra)
        # The given image (pulled), else the lock's tag (built on the host from the synced Dockerfile).
        ssh = {**options_from_args(args), "image": cfg.image or local_ref(), "pull_image": bool(cfg.image)}
    options = RunOptions(
        cloud=args.cloud, spot=bool(args.spot), managed_job=managed, max_cost=args.max_cost, max_hours=args.max_hours, config_file=config_file,
        image=cfg.image if infra != "local" else None,  # None: setup builds a venv from the lock (local: this python)
        nodes=args.nodes, ranks=args.ranks, weights=args.weights, ssh=ssh)
    return Plan(infra=infra, cfg=cfg, gpu=gpu, name=name, options=options, config_file=config_file)


def check_combinations(args: argparse.Namespace, infra: str) -> None:
    """Flags that contradict each other: refused, never resolved silently."""
    if args.no_eval:
        for flag, value in (("--eval-rows", args.eval_rows), ("--eval-base", args.eval_base)):
            if value not in (None, False):
                raise ContractError(f"{flag}: not accepted with --no-eval (it sets how to evaluate; drop one of them)")
    nodes, ranks = args.nodes, args.ranks
    if nodes < 1:
        raise ContractError(f"--nodes {nodes}: not accepted (a whole number >= 1)")
    if nodes > 1 and infra != "sky":
        raise ContractError(f"--nodes {nodes}: not accepted with --infra {infra} (several machines come from SkyPilot)")
    if ranks is not None and (ranks < 1 or infra == "sky"):
        raise ContractError(f"--ranks {ranks}: not accepted" + (" with --infra sky (the GPUs of --gpu set the ranks there)"
                            if infra == "sky" else " (a whole number >= 1)"))
    if infra != "sky" and (args.cloud or args.spot):
        raise ContractError(f"--cloud/--spot: not accepted with --infra {infra} (they choose a SkyPilot offer)")
    for flag, value in (("--managed", args.managed), ("--bucket", args.bucket), ("--keep-bucket", args.keep_bucket)):
        if value and infra != "sky":
            raise ContractError(f"{flag}: not accepted with --infra {infra} (managed jobs are SkyPilot's)")
        if value and flag != "--managed" and not (args.spot or args.managed):
            raise ContractError(f"{flag}: only with --spot or --managed (the bucket of a managed run)")
    if nodes > 1 and (args.spot or args.managed):
        raise ContractError(f"--nodes {nodes}: not accepted with --spot/--managed (a managed job runs on one node; "
                            f"its launch record is kept by one machine)")


def default_config(infra: str) -> Path:
    """The packaged configs/<default>.yaml (launcher/resources), wherever the command runs; an edited copy
    (`socrates-launch init`) is passed with --config."""
    return resources.path(DEFAULT_CONFIG.get(infra, DEFAULT_CONFIG["sky"]))


def check_data(source: str) -> str:
    """A local path must exist; ids (org/name) and synthetic:N pass through to the job."""
    if source.startswith("synthetic:"):
        n = source.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ContractError(f"--data {source!r}: not accepted (synthetic:N with N >= 1 rows)")
        return source
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.suffix in (".jsonl", ".json", ".parquet", ".csv")
    if path.exists():
        return str(path.resolve())
    if looks_local:
        raise ContractError(f"--data {source!r}: no such file or folder (a local .jsonl/.parquet, a hub id, or synthetic:N)")
    if source.count("/") != 1:
        raise ContractError(f"--data {source!r}: not accepted (a local file/folder, a hub id like org/name, or synthetic:N)")
    return source


def check_local_rows(source: str, split: str | None = None) -> None:
    """Local rows (from --data or the config) against the job's schema (and, for split
    unseen-participants, their participant ids), before anything is created: a bad row found here
    costs a second, found on the machine it costs a provisioned one."""
    path = Path(source).expanduser()
    if path.is_dir():
        data_files(path.resolve())  # a link anywhere in it (a loop, a linked subfolder): refused here, exit 2
    if path.exists() and not (path.is_dir() and (path / "stats.json").is_file()):  # a prepared folder is the job's
        check_local(path, need_participants=split == "unseen-participants")


def summary(plan: Plan) -> dict:
    """What both verbs say the run is: the config (file, name, model, the resolved config's digest),
    the data and the caps."""
    cfg = plan.cfg
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {
        "config": {"file": plan.config_file, "name": cfg.name, "model": cfg.model.id, "sha256": digest},
        "data": {"source": cfg.data.source, "subset": cfg.data.subset},
        "caps": {"max_cost": plan.options.max_cost, "max_hours": plan.options.max_hours},
    }


def describe(plan: Plan) -> str:
    """`summary` as three lines (`up --dryrun`, `estimate --explain`)."""
    s = summary(plan)
    c, d, caps = s["config"], s["data"], s["caps"]
    cost = f"${caps['max_cost']:,.2f}" if caps["max_cost"] is not None else "none"
    hours = f"{caps['max_hours']:g} h" if caps["max_hours"] is not None else "none"
    return (f"config: {c['file']} (name {c['name']}, model {c['model']}, resolved config sha256 {c['sha256']})\n"
            f"data:   {d['source']} (subset {d['subset']:g})\n"
            f"caps:   max cost {cost}, max hours {hours}")


def estimate(plan: Plan, *, allow_unpriced: bool = False):
    """The cost estimate of the plan (launcher/cost/): `up` refuses an unpriced card, `estimate` shows it."""
    from launcher.cost.estimate import estimate_run  # keeps --help light (launcher/cost/)

    return estimate_run(plan.cfg, gpu=plan.gpu, cloud=plan.options.cloud, spot=plan.options.spot,
                        data=plan.cfg.data.source, infra=plan.infra, nodes=plan.options.nodes,
                        allow_unpriced=allow_unpriced)
