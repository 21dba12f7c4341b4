"""`socrates-launch up`: validate, estimate, confirm, launch, stream, download + verify, tear down.

Everything the user typed is checked before anything exists (launcher/plan.py: exit 2, one line).
From the moment a run exists, launcher/lifecycle.py drives it: every path out either leaves the run
done and the machine down, or says loudly how to reach and end what is still running.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from contracts import manifest as manifest_lib
from contracts.config import load_config
from contracts.errors import ContractError
from launcher import plan as planlib
from launcher import registry
from launcher import stage as stagelib
from launcher import task as tasklib
from launcher.backends import for_plan
from launcher.backends.base import outliving
from launcher.secrets import collect, redact


def add_arguments(p: argparse.ArgumentParser) -> None:
    planlib.add_arguments(p)
    p.add_argument("--yes", "-y", action="store_true", help="don't ask before launching")
    p.add_argument("--dryrun", action="store_true", help="render the task and run SkyPilot's dry run; nothing is provisioned")
    p.add_argument("--save-task", metavar="FILE", default=None,
                   help="with --dryrun: also write the rendered task (the YAML it shows) to FILE")
    p.add_argument("--detach", action="store_true", help="return once the job runs (autodown stays armed); `logs` re-attaches")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console  # keeps --help light (rich)

    from launcher import lifecycle  # keeps --help light (rich)

    console = Console()
    if args.save_task and not args.dryrun:
        raise ContractError("--save-task FILE: only with --dryrun (a launch records its task in runs/<id>/task.yaml)")
    registry.runs_root()  # a SOCRATES_RUNS_DIR naming a file: exit 2 before anything is asked (new_run checks the rest)
    plan = planlib.resolve(args)
    estimate, deadline_s, priced = _estimate(plan, console, dryrun=args.dryrun)
    if deadline_s:
        plan.options = replace(plan.options, deadline_s=deadline_s)
    backend = for_plan(plan.infra, plan.options)
    _weights_choice(plan, backend, console)
    if args.dryrun:
        return _dryrun(plan, backend, console, priced=priced, save_to=args.save_task)
    if not args.yes:
        _confirm(plan, console)
    # credentials, host key, disk (ssh), enabled clouds (sky): refused (exit 2) before a run exists
    backend.preflight(plan.cfg)
    source = tasklib.local_data(plan.cfg.to_dict())  # a local file or folder: shipped with the job
    if source is not None:
        # What is sent, hashed as the machine hashes what it got (sky/train.yaml): compared at the end.
        plan.options = replace(plan.options, data_sha256=manifest_lib.data_hash(source))
    # ssh's --on-teardown command stays out of run.json (the backend keeps it in a 0600 side file)
    options = replace(plan.options, ssh=plan.options.ssh and {**plan.options.ssh, "on_teardown": None})
    run_rec = registry.new_run(
        plan.name, plan.infra, gpu=str(plan.gpu) if plan.gpu else None, config=plan.cfg.to_dict(),
        options=options, estimate=estimate,
        price_per_hour=(estimate or {}).get("price_per_hour"),
    )
    console.print(f"run [bold]{run_rec.id}[/] ({run_rec.dir})", highlight=False, soft_wrap=True)
    status = lifecycle.start(run_rec, backend, console, detach=args.detach)
    if status == 0 and run_rec.state == "done":
        _next_steps(plan, run_rec, console)
    return status


def _next_steps(plan: planlib.Plan, run: registry.Run, console) -> None:
    """What to do with a finished run, as commands that work from here (the venv's, when it is not on PATH)."""
    def here(path: str | Path) -> str:  # relative to the current folder when inside it
        path = Path(path).absolute()
        try:
            return shlex.quote(str(path.relative_to(Path.cwd())))
        except ValueError:
            return shlex.quote(str(path))

    def bare(name: str, exe: Path) -> str:  # `name` when PATH finds this very file (not resolved: a venv's
        found = shutil.which(name)          # python is a symlink to the system's)
        return name if found and Path(found).absolute() == exe.absolute() else here(exe)

    exe = Path(sys.argv[0])
    launcher = bare("socrates-launch", exe) if exe.name == "socrates-launch" else "socrates-launch"
    python = bare("python", Path(sys.executable))
    report = next(iter(sorted(run.dir.glob("eval*/report.html"))), None)
    lines = []
    if plan.cfg.model.init == "random" and report is not None:
        lines.append(f"note: the scores above are a tiny random model's ({plan.cfg.model.id}): not meaningful (a "
                     "uniform guess does better). The paper's, Table 2, unseen studies, W (lower is better): uniform "
                     "0.203, Qwen2.5-14B base 0.205, SOCRATES-Qwen-14B 0.151.")
    lines.append("next:")
    lines.append("  # its metrics beside the paper's, and the report's path")
    lines.append(f"  {launcher} report {run.id}")
    if report is not None:
        lines.append(f"  # the report, to open in a browser: {here(report)}")
    if run.adapter and (Path(run.adapter) / "adapter_config.json").is_file():
        d = plan.cfg.data
        prep = f"  {python} -m job prepare --config {here(plan.config_file)}"
        if plan.config_file and Path(plan.config_file).is_file():
            written = load_config(plan.config_file).data
            for flag, key in (("--data", "source"), ("--subset", "subset"), ("--split", "split"), ("--seed", "seed")):
                if getattr(written, key) != getattr(d, key):
                    prep += f" {flag} {shlex.quote(str(getattr(d, key)))}"
        lines.append("  # its test split, then a test row predicted beside the person's answer")
        lines.append(prep + " --out prepared")
        lines.append(f"  {launcher} predict --adapter {here(run.adapter)} --example 3 --data prepared/")
    lines.append("  # every run: state, card, time, cost")
    lines.append(f"  {launcher} runs")
    if launcher != "socrates-launch" or python != "python":
        lines.append(f"  # or `source {here(Path(sys.executable).parent / 'activate')}` once, then plain "
                     "`socrates-launch`, `python`")
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _estimate(plan: planlib.Plan, console, dryrun: bool = False) -> tuple[dict | None, float | None, bool]:
    """Show the cost table (launcher/cost/); enforce --max-cost/--max-hours before anything starts.
    A dry run without a price (no catalog, offline) shows the hours with "price unknown", as `estimate` does;
    the third value says whether the run was priced (or needs no price: your own machine)."""
    from launcher.cost import caps, render  # keeps --help light (launcher/cost/)

    est = planlib.estimate(plan, allow_unpriced=dryrun)
    render.render(est, console)
    deadline_s = caps.deadline_for(est, max_cost=plan.options.max_cost, max_hours=plan.options.max_hours)
    if deadline_s is None and (deadline_s := caps.safety_deadline(est)) is not None:
        console.print(caps.safety_line(deadline_s), highlight=False)
    full = render.to_json(est)  # the chosen offer's numbers, small enough for run.json (the table was shown)
    best = full.get("cheapest") or {}
    summary = {"hours": full.get("hours"), "dollars": full.get("dollars"), "cheapest": best,
               "price_per_hour": best.get("price_per_h"), "notes": full.get("notes", [])}
    return summary, deadline_s, not est.unpriced


def _weights_choice(plan: planlib.Plan, backend, console) -> None:
    """A full fine-tune's ~30 GB of weights: say what happens to them before asking (pull back, with the
    size and time, or leave them where they outlive the machine); refuse `leave` where nothing does."""
    if plan.cfg.train.method != "full":
        return
    keeper = outliving(backend)
    where = keeper.WEIGHTS_OUTLIVE if keeper else None
    if plan.options.weights == "leave" and where is None:
        raise ContractError(f"--weights leave: not accepted with --infra {plan.infra} (this machine is torn down at the "
                            "end and its weights with it; a managed run's bucket (--managed or --spot) outlives it)")
    from launcher.cost.hours import LAPTOP_MBPS, full_output_gb  # keeps --help light (launcher/cost/)
    from launcher.cost.rates import model_params_b  # keeps --help light (launcher/cost/)

    gb = full_output_gb(model_params_b(plan.cfg))
    minutes = gb * 1000 / LAPTOP_MBPS[1] / 60
    if plan.options.weights == "leave":
        line = (f"weights: the full fine-tune's ~{gb:.1f} GB of weights stay in {where} (--weights leave); everything "
                f"else comes back and is verified; `socrates-launch download RUN` pulls them later (~{minutes:,.0f} min "
                f"at {LAPTOP_MBPS[1]:g} MB/s)")
    else:
        line = (f"weights: the full fine-tune's ~{gb:.1f} GB of weights are pulled back to this machine (~{minutes:,.0f} "
                f"min at {LAPTOP_MBPS[1]:g} MB/s, assumed; the machine bills until it is done)"
                + (f"; --weights leave keeps them in {where} instead" if where else
                   "; on this backend they cannot be left behind (the machine is torn down at the end)"))
    console.print(line, highlight=False, markup=False)


def _confirm(plan: planlib.Plan, console) -> None:
    if not sys.stdin.isatty():
        raise ContractError("up: no terminal to confirm on; pass --yes to launch (or --dryrun to look first)")
    from rich.prompt import Confirm  # keeps --help light (rich)

    where = f"{plan.gpu} on {plan.infra}" if plan.gpu else plan.infra
    if plan.cfg.train.method == "full":
        where += f", weights {plan.options.weights}"
    if not Confirm.ask(f"Launch {plan.name} ({where})?", console=console, default=False):
        raise SystemExit(1)


def _dryrun(plan: planlib.Plan, backend, console, priced: bool = True, save_to: str | None = None) -> int:
    """Render the task and show it; the backend adds its part (SkyPilot's optimizer picks the offer), or
    without a price catalog (offline, nothing cached) what a launch still needs is said. The staged folder
    is built in a temporary folder (a dry run creates no run) and removed after; with --save-task FILE it
    is kept beside FILE (FILE.workdir/), the folder the saved task's workdir names."""
    if save_to:
        keep = Path(save_to).absolute().with_name(Path(save_to).name + ".workdir")
        if keep.exists() or keep.is_symlink():
            raise ContractError(f"--save-task {save_to}: {keep} exists (the staged workdir is kept there); "
                                "remove it or name another FILE")
        return _dryrun_in(plan, backend, console, stagelib.build(keep), priced, save_to)
    with tempfile.TemporaryDirectory(prefix="socrates-dryrun-") as tmp:
        return _dryrun_in(plan, backend, console, stagelib.build(Path(tmp) / stagelib.FOLDER), priced)


def _dryrun_in(plan: planlib.Plan, backend, console, staged, priced: bool, save_to: str | None = None) -> int:
    preview = registry.Run(id=f"{plan.name}-dryrun", dir=Path("/nonexistent"), infra=plan.infra, name=plan.name,
                           config=plan.cfg.to_dict(), options=plan.options)  # never saved: a dry run creates no run
    rendered = tasklib.render(preview, gpu=str(plan.gpu) if plan.gpu else None, cloud=plan.options.cloud,
                              spot=plan.options.spot, data_path=tasklib.local_data(preview.config),
                              secret_names=tuple(collect()), workdir=staged.path)
    console.print(planlib.describe(plan), highlight=False, markup=False, soft_wrap=True)  # as `estimate --explain` shows it
    where = "kept for --save-task" if save_to else "temporary here; a run stages runs/<id>/code"
    console.print(f"{staged.line()}; what every backend ships ({where})", highlight=False, markup=False, soft_wrap=True)
    text = redact(tasklib.to_yaml(rendered))
    console.rule("rendered task (sky/train.yaml)")
    # soft_wrap: never folded at the terminal's width, so the YAML can be copied as it is
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    if save_to:  # the same text, for `make rehearse` (tests/rehearsal.py) or a look with other tools
        try:
            Path(save_to).write_text(text, encoding="utf-8")
        except OSError as e:
            raise ContractError(f"--save-task {save_to}: {e.strerror or e}") from None
        console.print(f"task written to {save_to}", highlight=False, markup=False)
    if plan.options.image:
        console.print(f"environment: the job image {plan.options.image} (image_id docker:...; setup installs nothing)",
                      highlight=False, markup=False)
    else:
        console.print("environment: a venv from requirements/job.lock, installed by setup on the machine "
                      "(--image REF runs a prebuilt image instead)", highlight=False, markup=False)
    console.print(tasklib.layout_line(rendered, plan.gpu), highlight=False, markup=False)
    if not priced:
        console.print("SkyPilot's optimizer was not run: it needs the price catalog, which could not be fetched. "
                      "To launch: network access (SkyPilot fetches its catalog) and a cloud set up (`sky check`); "
                      "`socrates-launch estimate` then shows the offers", highlight=False, markup=False,
                      soft_wrap=not console.is_terminal)
        console.print("dry run: nothing was provisioned")
        return 0
    return backend.dryrun(rendered, plan, console)
