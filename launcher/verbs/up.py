"""`socrates-launch up`: validate, estimate, confirm, launch, stream, download + verify, tear down.

Everything the user typed is checked before anything exists (launcher/plan.py: exit 2, one line).
From the moment a run exists, launcher/lifecycle.py drives it: every path out either leaves the run
done and the machine down, or says loudly how to reach and end what is still running.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contracts import manifest as manifest_lib
from contracts.errors import ContractError
from launcher import plan as planlib
from launcher import registry
from launcher import task as tasklib


def add_arguments(p: argparse.ArgumentParser) -> None:
    planlib.add_arguments(p)
    p.add_argument("--yes", "-y", action="store_true", help="don't ask before launching")
    p.add_argument("--dryrun", action="store_true", help="render the task and run SkyPilot's dry run; nothing is provisioned")
    p.add_argument("--detach", action="store_true", help="return once the job runs (autodown stays armed); `logs` re-attaches")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from launcher import lifecycle
    from launcher.backends import for_plan

    console = Console()
    registry.runs_root()  # a SOCRATES_RUNS_DIR naming a file: exit 2 before anything is asked (new_run checks the rest)
    plan = planlib.resolve(args)
    estimate, deadline_s = _estimate(plan, console)
    if deadline_s:
        plan.options["deadline_s"] = deadline_s
    backend = for_plan(plan.infra, plan.options)
    _weights_choice(plan, backend, console)
    if args.dryrun:
        return _dryrun(plan, backend, console)
    if not args.yes:
        _confirm(plan, console)
    # credentials, host key, disk (ssh), enabled clouds (sky): refused (exit 2) before a run exists
    backend.preflight(plan.cfg)
    source = tasklib.local_data(plan.cfg.to_dict())  # a local file or folder: shipped with the job
    if source is not None:
        # What is sent, hashed as the machine hashes what it got (sky/train.yaml): compared at the end.
        plan.options["data_sha256"] = manifest_lib.data_hash(source)
    # ssh's --on-teardown command stays out of run.json (the backend keeps it in a 0600 side file)
    options = {**plan.options, **({"ssh": {**plan.options["ssh"], "on_teardown": None}} if plan.options.get("ssh") else {})}
    run_rec = registry.new_run(
        plan.name, plan.infra, gpu=str(plan.gpu) if plan.gpu else None, config=plan.cfg.to_dict(),
        options=options, estimate=estimate,
        price_per_hour=(estimate or {}).get("price_per_hour"),
    )
    console.print(f"run [bold]{run_rec.id}[/] ({run_rec.dir})", highlight=False)
    return lifecycle.start(run_rec, backend, console, detach=args.detach)


def _estimate(plan: planlib.Plan, console) -> tuple[dict | None, float | None]:
    """Show the cost table (launcher/cost.py); enforce --max-cost/--max-hours before anything starts."""
    from launcher import cost

    est = planlib.estimate(plan)
    cost.render(est, console)
    deadline_s = cost.deadline_for(est, max_cost=plan.options["max_cost"], max_hours=plan.options["max_hours"])
    if deadline_s is None and (deadline_s := cost.safety_deadline(est)) is not None:
        console.print(cost.safety_line(deadline_s), highlight=False)
    return _estimate_summary(cost.to_json(est)), deadline_s


def _estimate_summary(full: dict) -> dict:
    """The chosen offer's numbers, small enough for run.json (the table was shown already)."""
    best = full.get("cheapest") or {}
    return {"hours": full.get("hours"), "dollars": full.get("dollars"), "cheapest": best,
            "price_per_hour": best.get("price_per_h"), "notes": full.get("notes", [])}


def _weights_choice(plan: planlib.Plan, backend, console) -> None:
    """A full fine-tune's ~30 GB of weights: say what happens to them before asking (pull back, with the
    size and time, or leave them where they outlive the machine); refuse `leave` where nothing does."""
    if plan.cfg.train.method != "full":
        return
    where = backend.WEIGHTS_OUTLIVE
    if plan.options.get("weights") == "leave" and where is None:
        raise ContractError(f"--weights leave: not accepted with --infra {plan.infra} (this machine is torn down at the "
                            "end and its weights with it; a managed run's bucket (--managed or --spot) outlives it)")
    from launcher import cost

    gb = cost.full_output_gb(cost.model_params_b(plan.cfg))
    minutes = gb * 1000 / cost.LAPTOP_MBPS[1] / 60
    if plan.options.get("weights") == "leave":
        line = (f"weights: the full fine-tune's ~{gb:.1f} GB of weights stay in {where} (--weights leave); everything "
                f"else comes back and is verified; `socrates-launch download RUN` pulls them later (~{minutes:,.0f} min "
                f"at {cost.LAPTOP_MBPS[1]:g} MB/s)")
    else:
        line = (f"weights: the full fine-tune's ~{gb:.1f} GB of weights are pulled back to this machine (~{minutes:,.0f} "
                f"min at {cost.LAPTOP_MBPS[1]:g} MB/s, assumed; the machine bills until it is done)"
                + (f"; --weights leave keeps them in {where} instead" if where else
                   "; on this backend they cannot be left behind (the machine is torn down at the end)"))
    console.print(line, highlight=False, markup=False)


def _confirm(plan: planlib.Plan, console) -> None:
    if not sys.stdin.isatty():
        raise ContractError("up: no terminal to confirm on; pass --yes to launch (or --dryrun to look first)")
    from rich.prompt import Confirm

    where = f"{plan.gpu} on {plan.infra}" if plan.gpu else plan.infra
    if plan.cfg.train.method == "full":
        where += f", weights {plan.options.get('weights', 'pull')}"
    if not Confirm.ask(f"Launch {plan.name} ({where})?", console=console, default=False):
        raise SystemExit(1)


def _dryrun(plan: planlib.Plan, backend, console) -> int:
    """Render the task and show it; the backend adds its part (SkyPilot's optimizer picks the offer)."""
    from launcher.secrets import collect, redact

    preview = registry.Run(id=f"{plan.name}-dryrun", dir=Path("/nonexistent"), infra=plan.infra, name=plan.name,
                           config=plan.cfg.to_dict(), options=plan.options)  # never saved: a dry run creates no run
    rendered = tasklib.render(preview, gpu=str(plan.gpu) if plan.gpu else None, cloud=plan.options["cloud"],
                              spot=plan.options["spot"], data_path=tasklib.local_data(preview.config),
                              secret_names=tuple(collect()))
    console.print(planlib.describe(plan), highlight=False, markup=False)  # as `estimate --explain` shows it
    console.rule("rendered task (sky/train.yaml)")
    console.print(redact(tasklib.to_yaml(rendered)), highlight=False, markup=False)
    if plan.options.get("image"):
        console.print(f"environment: the job image {plan.options['image']} (image_id docker:...; setup installs nothing)",
                      highlight=False, markup=False)
    else:
        console.print("environment: a venv from requirements/job.lock, installed by setup on the machine "
                      "(--image REF runs a prebuilt image instead)", highlight=False, markup=False)
    console.print(tasklib.layout_line(rendered, plan.gpu), highlight=False, markup=False)
    return backend.dryrun(rendered, plan, console)
