"""`socrates-launch estimate`: what a run will cost, per cloud offer, before anything starts. It takes
`up`'s flags and resolves them as `up` does (launcher/plan.py), so the estimate is of the run `up` would
start; `--explain` (and `--json`'s `plan`) show that resolution as `up --dryrun` does."""
from __future__ import annotations

import argparse
import json

from launcher import plan as planlib


def add_arguments(p: argparse.ArgumentParser) -> None:
    planlib.add_arguments(p, every_card=True)
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (with `plan`: config, data, caps)")
    p.add_argument("--explain", action="store_true", help="show the resolved plan (config, data, caps: what `up --dryrun` "
                   "shows) and every term of the hours")


def run(args: argparse.Namespace) -> int:
    from launcher.cost import caps, render  # keeps --help light (launcher/cost/)
    from launcher.cost.estimate import methods_side_by_side  # keeps --help light (launcher/cost/)

    plan = planlib.resolve(args, default_gpu=False)
    est = planlib.estimate(plan, allow_unpriced=True)
    if args.json:
        deadline_s = caps.deadline_for(est, max_cost=args.max_cost, max_hours=args.max_hours)
        print(json.dumps({**render.to_json(est), "deadline_s": deadline_s,
                          "safety_deadline_s": caps.safety_deadline(est) if deadline_s is None else None,
                          "plan": planlib.summary(plan), "methods": methods_side_by_side(plan.cfg, est)}, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    if args.explain:  # the resolved plan, as `up --dryrun` shows it (the short default stays short)
        console.print(planlib.describe(plan), highlight=False, markup=False, soft_wrap=True)
    render.render(est, console, explain=args.explain)
    render.render_methods(methods_side_by_side(plan.cfg, est), console)
    # After the table, as `up` does: a cap the high estimate exceeds is one line and exit 2.
    deadline_s = caps.deadline_for(est, max_cost=args.max_cost, max_hours=args.max_hours)
    if deadline_s is not None:
        console.print(f"caps hold: the job will stop by itself {deadline_s / 3600:.2f} h after setup starts on the machine")
    elif est.offers and (safety := caps.safety_deadline(est)) is not None:
        console.print(caps.safety_line(safety), highlight=False)
    return 0
