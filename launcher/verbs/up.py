"""`socrates-launch up`: validate, estimate, confirm, launch, stream, download + verify, tear down.

Everything the user typed is checked before anything exists (exit 2, one line). From the moment a
run exists, every path out of this module either leaves the run done and the machine down, or
says loudly how to reach and end what is still running (detach / first Ctrl-C).
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts import manifest as manifest_lib
from contracts.config import RunConfig, check_fraction, load_config
from contracts.errors import ContractError
from contracts.events import dumps, make
from launcher import registry
from launcher.backends import check_infra, get_backend
from launcher.backends.base import BackendError, StreamLost
from launcher.gpu import GpuSpec, parse_gpu
from launcher.secrets import redact

DEFAULT_CONFIG = {"sky": "configs/paper.yaml", "local": "configs/smoke.yaml"}
DEFAULT_GPU = "A100:1"
SECOND_CTRL_C_S = 3.0
DOWNLOAD_ATTEMPTS = 3
DOWNLOAD_RETRY_S = 1.0
SALVAGE_ATTEMPTS = 2  # after a failed job: usually there is simply no manifest, so fewer tries


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--infra", default="sky", help="where to run: sky (SkyPilot, default) | local | ssh://user@host[:port]")
    p.add_argument("--gpu", default=None, help=f"card and count, e.g. A100:1 (default {DEFAULT_GPU} on sky)")
    p.add_argument("--nodes", type=int, default=1, help="machines of --gpu each (sky): train and evaluate run under torchrun "
                   "on every GPU of every node, the global batch unchanged (default 1)")
    p.add_argument("--ranks", type=int, default=None, help="local/ssh without a GPU: start N CPU ranks (gloo) under torchrun "
                   "(the multi-GPU path, tested without GPUs)")
    p.add_argument("--subset", type=float, default=None, help="fraction of training rows kept, in (0, 1]")
    p.add_argument("--config", default=None, help="run config (default: configs/paper.yaml on sky, configs/smoke.yaml locally)")
    p.add_argument("--data", default=None, help="dataset: Hugging Face id, local .jsonl/.parquet file or folder, or synthetic:N")
    p.add_argument("--model", default=None, help="base model id or path (overrides the config's model.id)")
    p.add_argument("--image", default=None, metavar="REF",
                   help="run the job in this prebuilt image (`socrates-launch image build --push REPO` prints one; "
                   "the config's `image:` otherwise); default: a venv from requirements/job.lock")
    p.add_argument("--cloud", default=None, help="pin a cloud (e.g. lambda, runpod, aws); default: the cheapest offer")
    p.add_argument("--spot", action="store_true", help="use spot/preemptible instances (cheaper; a preemption ends the run: no automatic recovery)")
    p.add_argument("--yes", "-y", action="store_true", help="don't ask before launching")
    p.add_argument("--dryrun", action="store_true", help="render the task and run SkyPilot's dry run; nothing is provisioned")
    p.add_argument("--detach", action="store_true", help="return once the job runs (autodown stays armed); `logs` re-attaches")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")
    p.add_argument("--eval-rows", type=int, default=None, help="evaluate on at most N test rows")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--eval-base", action="store_true", help="also evaluate the base model (the paper's baseline)")
    p.add_argument("--max-cost", type=float, default=None, help="refuse to start if the high estimate exceeds USD; cap the run to it (--infra sky only)")
    p.add_argument("--max-hours", type=float, default=None, help="stop the job after H hours of machine time (adapter saved)")
    p.add_argument("--allow-cpu", action="store_true", help="let the job run without a GPU (tests, the local demo)")
    from launcher.ssh_options import add_arguments as add_ssh_arguments  # --ssh-key etc. (issue #6)

    add_ssh_arguments(p)


@dataclass
class Plan:
    """Everything `up` will do, validated; nothing exists yet."""

    infra: str
    cfg: RunConfig
    gpu: GpuSpec | None
    name: str
    options: dict


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    plan = plan_run(args)
    estimate, deadline_s = _estimate(plan, args, console)
    if deadline_s:
        plan.options["deadline_s"] = deadline_s
    if args.dryrun:
        return _dryrun(plan, console)
    if not args.yes:
        _confirm(plan, console)
    if plan.infra.startswith("ssh://"):  # host key, credentials, disk: refused (exit 2) before a run exists
        get_backend(plan.infra, **_backend_opts(plan)).preflight(plan.cfg)
    source = Path(plan.cfg.data.source).expanduser()
    if not plan.cfg.data.source.startswith("synthetic:") and source.exists():
        # What is sent, hashed as the machine hashes what it got (sky/train.yaml): compared at the end.
        plan.options["data_sha256"] = manifest_lib.data_hash(source)
    if plan.infra == "sky":  # no cloud credentials: one line, exit 2, before a run exists
        _check_clouds()
    run_rec = registry.new_run(
        plan.name, plan.infra, gpu=str(plan.gpu) if plan.gpu else None, config=plan.cfg.to_dict(),
        options=plan.options, estimate=estimate,
        price_per_hour=(estimate or {}).get("price_per_hour"),
    )
    console.print(f"run [bold]{run_rec.id}[/] ({run_rec.dir})", highlight=False)
    backend = get_backend(plan.infra, **_backend_opts(plan))
    return drive(run_rec, backend, console, launch=True, detach=args.detach)


# --- validation ------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """An error as it is saved and shown: SkyPilot's colour codes removed (run.json holds plain text)."""
    return _ANSI.sub("", text)


def check_combinations(args: argparse.Namespace, infra: str) -> None:
    """Flags that contradict each other (shared with `estimate`): refused, never resolved silently."""
    if getattr(args, "no_eval", False):
        for flag, value in (("--eval-rows", getattr(args, "eval_rows", None)), ("--eval-base", getattr(args, "eval_base", False))):
            if value not in (None, False):
                raise ContractError(f"{flag}: not accepted with --no-eval (it sets how to evaluate; drop one of them)")
    nodes, ranks = getattr(args, "nodes", 1), getattr(args, "ranks", None)
    if not isinstance(nodes, int) or nodes < 1:
        raise ContractError(f"--nodes {nodes}: not accepted (a whole number >= 1)")
    if nodes > 1 and infra != "sky":
        raise ContractError(f"--nodes {nodes}: not accepted with --infra {infra} (several machines come from SkyPilot)")
    if ranks is not None and (ranks < 1 or infra == "sky"):
        raise ContractError(f"--ranks {ranks}: not accepted" + (" with --infra sky (the GPUs of --gpu set the ranks there)"
                            if infra == "sky" else " (a whole number >= 1)"))
    if infra != "sky" and (args.cloud or args.spot):
        raise ContractError(f"--cloud/--spot: not accepted with --infra {infra} (they choose a SkyPilot offer)")


def plan_run(args: argparse.Namespace) -> Plan:
    """Check every input; raise ContractError (exit 2, one line) on the first bad one."""
    infra = check_infra(args.infra)
    gpu = parse_gpu(args.gpu) if args.gpu is not None else (parse_gpu(DEFAULT_GPU) if infra == "sky" else None)
    if args.subset is not None:
        check_fraction(args.subset, "--subset")
    cfg = load_config(args.config or _default_config(infra))
    overrides: dict[str, Any] = {}
    if args.subset is not None:
        overrides["data.subset"] = args.subset
    if args.data is not None:
        overrides["data.source"] = _check_data(args.data)
    if args.model is not None:
        overrides["model.id"] = args.model
    if getattr(args, "image", None) is not None:
        if infra == "local":
            raise ContractError(f"--image {args.image}: not accepted with --infra local (the local backend runs the "
                                "job with this machine's python; use it with SkyPilot or ssh://)")
        overrides["image"] = args.image
    if args.allow_cpu:
        overrides["allow_cpu"] = True
    check_combinations(args, infra)
    if args.eval_rows is not None:
        if args.eval_rows < 1:
            raise ContractError(f"--eval-rows {args.eval_rows}: not accepted (a whole number >= 1)")
        overrides["eval.rows"] = args.eval_rows
    if overrides:
        cfg = cfg.with_overrides(overrides, source="command line")
    _check_local_rows(cfg.data.source)
    from launcher.cost import check_caps

    check_caps(args.max_cost, args.max_hours, infra)  # numbers > 0; a dollar cap only where there is a price
    name = args.name or cfg.name
    if not name or len(name) > 60 or not all(c.isalnum() or c in "._-" for c in name):
        raise ContractError(f"--name {name!r}: not accepted (letters, digits, . _ -; at most 60)")
    options = {
        "cloud": args.cloud, "spot": bool(args.spot), "eval": not args.no_eval, "eval_base": bool(args.eval_base),
        "eval_rows": args.eval_rows, "max_cost": args.max_cost, "max_hours": args.max_hours,
        "config_file": str(args.config or _default_config(infra)),
        # None: setup builds a venv from the lock (the local backend always runs this machine's python)
        "image": cfg.image if infra != "local" else None,
        "nodes": args.nodes, "ranks": args.ranks,
    }
    # The world the job will see; its accumulation must make the global batch (contracts/config.py).
    world = (gpu.count if gpu else 1) * args.nodes if infra == "sky" else (args.ranks or 1)
    t = cfg.train
    if t.micro_batch * world > t.global_batch and t.global_batch % world == 0:
        # More GPUs than the global batch has micro-batches: each GPU takes global / world rows a step
        # (no accumulation); the global batch, and so the schedule, stays the config's.
        cfg = cfg.with_overrides({"train.micro_batch": t.global_batch // world},
                                 source=f"{world} GPUs: micro_batch {t.micro_batch} -> {t.global_batch // world}")
    cfg.train.grad_accum(world)
    if infra.startswith("ssh://"):  # the SSH flags, checked before anything exists (issue #6)
        from launcher.ssh_options import options_from_args, parse_infra

        parse_infra(infra)
        options["ssh"] = options_from_args(args)
        from launcher.verbs.image import local_ref

        # The given image (pulled), else the lock's tag (built on the host from the synced Dockerfile).
        options["ssh"]["image"] = cfg.image or local_ref()
        options["ssh"]["pull_image"] = bool(cfg.image)
    return Plan(infra=infra, cfg=cfg, gpu=gpu, name=name, options=options)


def _default_config(infra: str) -> Path:
    """configs/<default>.yaml from the current directory, else from the installed checkout."""
    rel = Path(DEFAULT_CONFIG.get(infra, DEFAULT_CONFIG["sky"]))
    return rel if rel.is_file() else Path(__file__).resolve().parents[2] / rel


def _check_data(source: str) -> str:
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


def _check_local_rows(source: str) -> None:
    """Local rows (from --data or the config) against the job's schema, before anything is created:
    a bad row found here costs a second, found on the machine it costs a provisioned one."""
    path = Path(source).expanduser()
    if path.exists() and not (path.is_dir() and (path / "stats.json").is_file()):  # a prepared folder is the job's
        from launcher.rows import check_local

        check_local(path)


def _backend_opts(plan: Plan) -> dict:
    return dict(plan.options.get("ssh") or {})


# --- estimate, confirm, dry run --------------------------------------------------------------

def _estimate(plan: Plan, args: argparse.Namespace, console) -> tuple[dict | None, float | None]:
    """Show the cost table (launcher/cost.py); enforce --max-cost/--max-hours before anything starts."""
    try:
        from launcher import cost
    except ImportError:
        cost = None
    if cost is None:
        if args.max_cost is not None:
            raise ContractError("--max-cost: the cost model (launcher/cost.py) is not installed, so the cap can't be checked")
        console.print("[yellow]no cost model installed (launcher/cost.py): no estimate shown[/]")
        return None, (args.max_hours * 3600 if args.max_hours else None)
    # --no-eval lives in the options, not the config; the estimate must not bill an evaluation.
    cfg = plan.cfg if plan.options.get("eval", True) else plan.cfg.with_overrides({"eval.enabled": False})
    est = cost.estimate_run(cfg, gpu=plan.gpu, cloud=plan.options["cloud"], spot=plan.options["spot"],
                            data=plan.cfg.data.source, infra=plan.infra, nodes=plan.options.get("nodes") or 1)
    cost.render(est, console)
    deadline_s = cost.deadline_for(est, max_cost=args.max_cost, max_hours=args.max_hours)
    if deadline_s is None and (deadline_s := cost.safety_deadline(est)) is not None:
        console.print(cost.safety_line(deadline_s), highlight=False)
    return _estimate_summary(cost.to_json(est)), deadline_s


def _estimate_summary(full: dict) -> dict:
    """The chosen offer's numbers, small enough for run.json (the table was shown already)."""
    best = full.get("cheapest") or {}
    return {"hours": full.get("hours"), "dollars": full.get("dollars"), "cheapest": best,
            "price_per_hour": best.get("price_per_h"), "notes": full.get("notes", [])}


def _confirm(plan: Plan, console) -> None:
    if not sys.stdin.isatty():
        raise ContractError("up: no terminal to confirm on; pass --yes to launch (or --dryrun to look first)")
    from rich.prompt import Confirm

    where = f"{plan.gpu} on {plan.infra}" if plan.gpu else plan.infra
    if not Confirm.ask(f"Launch {plan.name} ({where})?", console=console, default=False):
        raise SystemExit(1)


def _check_clouds() -> None:
    from launcher.backends.sky import load_adapter
    from launcher.sky_adapter import NO_CLOUD

    if not load_adapter().enabled_clouds():
        raise ContractError(NO_CLOUD)


def _dryrun(plan: Plan, console) -> int:
    """Render the task, show it, and let SkyPilot's optimizer + dry run pick the offer."""
    from rich.text import Text

    from launcher import task as tasklib
    from launcher.secrets import collect

    preview = registry.Run(id=f"{plan.name}-dryrun", dir=Path("/nonexistent"), infra=plan.infra, name=plan.name,
                           config=plan.cfg.to_dict(), options=plan.options)  # never saved: a dry run creates no run
    secrets = collect()
    data_path = Path(plan.cfg.data.source) if Path(plan.cfg.data.source).exists() else None
    rendered = tasklib.render(preview, gpu=str(plan.gpu) if plan.gpu else None, cloud=plan.options["cloud"],
                              spot=plan.options["spot"], data_path=data_path, secret_names=tuple(secrets))
    console.rule("rendered task (sky/train.yaml)")
    console.print(redact(tasklib.to_yaml(rendered)), highlight=False, markup=False)
    if plan.options.get("image"):
        console.print(f"environment: the job image {plan.options['image']} (image_id docker:...; setup installs nothing)",
                      highlight=False, markup=False)
    else:
        console.print("environment: a venv from requirements/job.lock, installed by setup on the machine "
                      "(--image REF runs a prebuilt image instead)", highlight=False, markup=False)
    console.print(tasklib.layout_line(rendered, plan.gpu), highlight=False, markup=False)
    if plan.infra != "sky":
        console.print(f"dry run: nothing started ({plan.infra} backend)")
        return 0
    from launcher.backends.sky import cluster_name_for, load_adapter

    from launcher.sky_adapter import NoCloudEnabled

    adapter = load_adapter()
    adapter.log = lambda line: console.print(Text.from_ansi(redact(line)), highlight=False)  # SkyPilot's colours
    console.print("SkyPilot's dry run: its optimizer picks the offer (the first call starts SkyPilot's API server)",
                  highlight=False)
    try:
        offer = adapter.dryrun(rendered, cluster_name=cluster_name_for(f"{plan.name}-dryrun"), secrets=secrets)
    except NoCloudEnabled as e:  # the task and the catalog's offers (above) are still worth seeing
        console.print(str(e), highlight=False, markup=False)
        console.print("dry run: nothing was provisioned")
        return 0
    except Exception as e:  # noqa: BLE001 - SkyPilot's own failure: one plain line, not its traceback
        first = plain(str(e)).strip().splitlines()[0] if str(e).strip() else ""
        console.print(f"SkyPilot's dry run failed ({type(e).__name__}): {redact(first)[:300]}", highlight=False,
                      markup=False)
        console.print("dry run: nothing was provisioned")
        return 1
    console.print(f"chosen: cloud {offer['cloud']}, region {offer.get('region')}, instance {offer['instance']}, "
                  f"{offer['accelerators']}, ${offer['price_per_hour']:.2f}/h{' (spot)' if offer.get('spot') else ''}",
                  highlight=False)
    console.print("dry run: nothing was provisioned")
    return 0


# --- the lifecycle (shared with `logs`, which re-attaches) -----------------------------------

def drive(run: registry.Run, backend, console, *, launch: bool, detach: bool = False) -> int:
    """Launch (if asked), follow, download + verify, tear down. Returns the exit status of `up`.

    Whatever happens after the run exists, the machine is torn down at the end, except on an
    explicit detach (--detach, first Ctrl-C), which prints how to come back and how to end it.
    One follower per run: if another launcher already follows it (runs/<id>/.follow.lock), this one
    only shows what was recorded and says so: it never appends events, pulls or moves results.
    """
    follower = registry.Follower(run.dir)
    if not follower.acquire():
        from launcher.progress import Progress

        progress = Progress(console, price_per_hour=run.price_per_hour, started_at=run.started_at)
        for ev in _read_events(run.events_path):
            progress.on_event(ev)
        progress.close()
        console.print(f"run {run.id} is being followed by another launcher (pid {follower.holder or '?'}), which "
                      f"downloads and tears down at the end; this one only shows what it recorded. "
                      f"`socrates-launch status {run.id}` shows where it is.", highlight=False)
        return 0
    try:
        return _drive(run, backend, console, launch=launch, detach=detach)
    finally:
        follower.release()


def _drive(run: registry.Run, backend, console, *, launch: bool, detach: bool = False) -> int:
    from launcher.progress import Progress

    progress = Progress(console, price_per_hour=run.price_per_hour, started_at=run.started_at)
    recorder = Recorder(run, progress)
    backend.on_phase = recorder.phase
    try:
        with _hangups_raise():
            status = _lifecycle(run, backend, recorder, console, launch=launch, detach=detach)
    except _DownloadFailed as e:
        progress.close()
        message = plain(redact(_describe(e.__cause__ or e)))
        ends_by = backend.left_up_ends_by(run)
        run.transition("failed", note=message, error=message)
        if ends_by is None:
            console.print(f"[bold red]run {run.id}: the job finished but its results could not be pulled back "
                          f"({message}); the machine is torn down (nothing would end it otherwise)[/]", highlight=False)
        else:
            # The only copy of the adapter is on the machine: leave it up (its end is armed) and say so.
            console.print(
                f"[bold red]run {run.id}: the job finished but its results could not be pulled back:[/] {message}\n"
                f"  they are still on the machine, which is left up: {ends_by}.\n"
                f"  pull them:  socrates-launch download {run.id}\n  then end it: socrates-launch down {run.id}",
                highlight=False)
            return 1
        status = 1
    except (KeyboardInterrupt, _HungUp) as e:
        progress.close()
        if run.state in ("created", "provisioning"):
            return _abort_provisioning(run, backend, console, recorder, e)
        if isinstance(e, _HungUp):  # the terminal went away or we were asked to stop: detach, quietly
            run.update(note=f"launcher stopped by {e.name}; the job runs on")
            _say_detached(run, console)
            return 128 + e.signum
        return _interrupted(run, backend, console, recorder)
    except StreamLost as e:  # the job is not known to have failed: detach, never tear down over a lost stream
        progress.close()
        message = redact(str(e))
        run.update(note=f"detached: {message}")
        console.print(f"[bold yellow]run {run.id}: {message}[/]; the job is left running (not torn down).",
                      highlight=False)
        _say_detached(run, console)
        return 1
    except (BackendError, ContractError, OSError) as e:
        progress.close()
        _save_log(run, backend)
        message = plain(redact(str(e)))
        run.transition("failed", note=message, error=message)
        console.print(f"[bold red]run {run.id} failed:[/] {message}", highlight=False)
        _tail_log(run, console)
        status = 1
    except BaseException:
        progress.close()
        teardown(run, backend, recorder, console)  # an unexpected error must not leave a machine up
        raise
    progress.close()
    if detach and run.state == "running":
        return status
    if not teardown(run, backend, recorder, console):
        return 1
    if run.state == "done":
        console.print(f"[bold green]adapter:[/] {run.adapter} (verified against manifest.json)", highlight=False)
    return status


def _lifecycle(run: registry.Run, backend, recorder: "Recorder", console, *, launch: bool, detach: bool) -> int:
    if launch:
        run.transition("provisioning", started_at=time.time(), machine="up")
        recorder.progress.started_at = run.started_at
        recorder.phase("provisioning", f"{run.gpu or 'local'} via {run.infra}")
        backend.launch(run)
        run.transition("running")
        recorder.phase("training")
        if detach:
            _say_detached(run, console)
            return 0
    code = backend.follow(run, recorder.job_event)
    _save_log(run, backend)
    run.update(exit_code=code)
    sent, got = run.options.get("data_sha256"), recorder.data_sha256
    if sent and got and sent != got:
        raise BackendError("running", f"the job was given other data than was sent: it hashed {got}, "
                                      f"the launcher sent {sent} (a stale or mixed data folder on the machine)")
    if code != 0:
        raise BackendError("running", f"the job exited with status {code}{_salvage(run, backend, recorder)}")
    recorder.progress.close()
    try:
        fetch_and_verify(run, backend, recorder)
    except Exception as e:  # noqa: BLE001  (whatever went wrong, the only copy is on the machine: keep it up)
        raise _DownloadFailed() from e
    run.transition("done")
    return 0


class _DownloadFailed(Exception):
    """The job succeeded, its results did not come back (the cause is chained)."""


def _salvage(run: registry.Run, backend, recorder: "Recorder") -> str:
    """A job that failed after training (evaluation crashed, the deadline's hard kill) has a finished,
    paid-for adapter on the machine: pull it back before teardown if its manifest verifies."""
    try:
        fetch_and_verify(run, backend, recorder, attempts=SALVAGE_ATTEMPTS)
    except Exception:  # noqa: BLE001  (a salvage that fails for any reason leaves the run failed, as it was)
        return "; no finished adapter on the machine to pull back"
    return f"; the adapter it had finished was pulled back and verifies: {run.adapter}"


class Recorder:
    """Writes each event to runs/<id>/events.jsonl once (also across re-attaches) and shows it."""

    def __init__(self, run: registry.Run, progress):
        self.run = run
        self.progress = progress
        self.skip = sum(1 for ev in _read_events(run.events_path) if ev.get("event") != "phase")
        self.data_sha256: str | None = None

    def job_event(self, ev: dict) -> None:
        if ev.get("event") == "log" and isinstance(ev.get("data_sha256"), str):
            self.data_sha256 = ev["data_sha256"]  # the last one: what the job was given
        self.progress.on_event(ev)
        if self.skip > 0:
            self.skip -= 1
            return
        with open(self.run.events_path, "a", encoding="utf-8") as f:
            f.write(redact(dumps(ev)) + "\n")

    def phase(self, name: str, detail: str | None = None) -> None:
        ev = make("phase", phase=name, **({"detail": detail} if detail else {}))
        self.progress.on_event(ev)
        with open(self.run.events_path, "a", encoding="utf-8") as f:
            f.write(dumps(ev) + "\n")


# Names in runs/<id>/ that belong to the launcher: a manifest listing one of them is refused.
RESERVED = ("run.json", "events.jsonl", "job.log", "task.yaml", "launch.log", ".download", ".lock",
            ".follow.lock", "manifest.json", "checkpoints")


def fetch_and_verify(run: registry.Run, backend, recorder: Recorder, attempts: int = DOWNLOAD_ATTEMPTS) -> None:
    """Pull out/ into a staging folder, verify it, then move the results into runs/<id>/.

    What comes back is untrusted: the manifest is checked against its schema, and the staging tree
    must be exactly the manifest's files (no symlinks, special files, unlisted files; paths relative
    and inside), with an adapter, each sha256 matching. Retried: a failed or corrupt pull is worth
    another try before the machine (and the only copy) is torn down. Results already in runs/<id>/
    are replaced only by a copy that verified.
    """
    run.transition("downloading")
    recorder.phase("downloading")
    staging = run.dir / ".download"
    for attempt in range(1, attempts + 1):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            backend.download(run, staging)
            manifest = manifest_lib.verify_or_raise(staging, tree=True, reserved=RESERVED)
            break
        except Exception as e:  # noqa: BLE001  (any failure of an untrusted pull is retried, then reported)
            if attempt == attempts:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            recorder.phase("downloading", f"attempt {attempt} failed ({redact(_describe(e))}); retrying")
            time.sleep(DOWNLOAD_RETRY_S * attempt)
    # Only what the manifest lists (and the manifest) is moved; its top-level names were checked above.
    for name in sorted({e["path"].split("/")[0] for e in manifest["files"]} | {manifest_lib.MANIFEST_FILE}):
        entry, target = staging / name, run.dir / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        entry.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    manifest_lib.verify_or_raise(run.dir)
    got = "model" if not (run.dir / "adapter").is_dir() and (run.dir / "model").is_dir() else "adapter"  # method full: model/
    run.update(adapter=str((run.dir / got).resolve()), verified=True)


def _describe(e: BaseException) -> str:
    """One line for any exception (a bare KeyError's str is only the key)."""
    if isinstance(e, (BackendError, ContractError, OSError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def teardown(run: registry.Run, backend, recorder: Recorder | None, console) -> bool:
    """End the machine; if that fails, say loudly how to end it (money). True when it is down."""
    if recorder is not None:
        recorder.phase("tearing down")
    try:
        backend.down(run)
    except Exception as e:  # noqa: BLE001  (any failure here must reach the user, not a traceback)
        console.print(f"[bold red]TEARDOWN FAILED for run {run.id}: {redact(str(e))}[/]\n"
                      f"  the machine may still be running and billing. Retry: socrates-launch down {run.id}",
                      highlight=False)
        run.update(machine="unknown")
        return False
    state = {"machine": "gone", "ended_at": run.ended_at or time.time()}
    if run.live:
        run.transition("torn_down", note="torn down before the run ended", **state)
    else:
        run.update(**state)
    return True


class _HungUp(BaseException):
    """SIGTERM or SIGHUP (a closed terminal, a logout, `kill`), raised where the launcher is."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


@contextlib.contextmanager
def _hangups_raise():
    """Without this, SIGTERM/SIGHUP end the launcher on the spot: no teardown of a machine still
    being provisioned, which SkyPilot has not armed autodown on yet."""
    def raise_hangup(signum, frame):
        raise _HungUp(signum)

    try:
        previous = {sig: signal.signal(sig, raise_hangup) for sig in (signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _abort_provisioning(run: registry.Run, backend, console, recorder: Recorder, why: BaseException) -> int:
    """Interrupted before the job started: SkyPilot arms autodown only when it submits the job (after
    provisioning and file sync), so a machine left now might have nothing to end it. End it."""
    name = why.name if isinstance(why, _HungUp) else "Ctrl-C"
    console.print(f"\n[bold yellow]{name} while provisioning run {run.id}[/]: its autodown is not armed yet, "
                  "so it is torn down now (nothing was trained)", highlight=False)
    try:  # a half-done teardown is the expensive outcome: nothing interrupts it
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread
        previous = {}
    try:
        teardown(run, backend, recorder, console)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + (why.signum if isinstance(why, _HungUp) else signal.SIGINT)


def _interrupted(run: registry.Run, backend, console, recorder: Recorder) -> int:
    """First Ctrl-C detaches (autodown armed); a second within a few seconds tears down now."""
    console.print(
        f"\n[bold yellow]detached from run {run.id}[/]: the job keeps running; {_after_detach(run)}\n"
        f"  re-attach:  socrates-launch logs {run.id}\n  tear down:  socrates-launch down {run.id}\n"
        f"  (press Ctrl-C again within {SECOND_CTRL_C_S:.0f} s to tear down now)", highlight=False)
    try:
        time.sleep(SECOND_CTRL_C_S)
    except KeyboardInterrupt:
        # Ignore further Ctrl-C while tearing down: a half-done teardown is the expensive outcome.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            console.print("tearing down now")
            teardown(run, backend, recorder, console)
        finally:
            signal.signal(signal.SIGINT, previous)
        return 130
    return 130


def _after_detach(run: registry.Run) -> str:
    if run.infra == "sky":
        from launcher.backends.sky import AUTODOWN_IDLE_MIN

        return (f"SkyPilot's autodown ends its machine {AUTODOWN_IDLE_MIN} min after the job ends; "
                "`logs` before then pulls the results back.")
    return "nothing ends it or pulls results back until you run `logs` or `down`."


def _say_detached(run: registry.Run, console) -> None:
    console.print(f"detached: run {run.id} is running; {_after_detach(run)}\n  follow:     socrates-launch logs {run.id}\n"
                  f"  tear down:  socrates-launch down {run.id}", highlight=False)


def _save_log(run: registry.Run, backend) -> None:
    lines = getattr(backend, "log_lines", None)
    if lines is None:
        return
    try:
        text = "\n".join(lines(run))
    except Exception:  # noqa: BLE001  (the log is a convenience; never mask the real outcome)
        return
    if text:
        run.log_path.write_text(redact(text) + "\n", encoding="utf-8")


def _tail_log(run: registry.Run, console, n: int = 15) -> None:
    if run.log_path.is_file():
        lines = [ln for ln in run.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if "@@socrates-event" not in ln][-n:]
        if lines:
            console.print("last job output:\n  " + "\n  ".join(lines), highlight=False, markup=False)


def _read_events(path: Path) -> list[dict]:
    from contracts.events import read_all

    return read_all(path) if path.is_file() else []
