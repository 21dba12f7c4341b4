"""`socrates-launch estimate`: what a run will cost, per cloud offer, before anything starts.

It takes `up`'s flags and resolves them as `up` does (launcher/plan.py: the same config, data and
caps, the same default config per infrastructure), so the estimate is of the run `up` would start;
`--explain` (and `--json`'s `plan`) show that resolution as `up --dryrun` does.
"""
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
    from launcher import cost  # keeps --help light (cost.py)

    plan = planlib.resolve(args, default_gpu=False)
    est = planlib.estimate(plan, allow_unpriced=True)
    if args.json:
        out = cost.to_json(est)
        out["deadline_s"] = cost.deadline_for(est, max_cost=args.max_cost, max_hours=args.max_hours)
        out["safety_deadline_s"] = cost.safety_deadline(est) if out["deadline_s"] is None else None
        out["plan"] = planlib.summary(plan)
        out["methods"] = cost.methods_side_by_side(plan.cfg, est)
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    if args.explain:  # the resolved plan, as `up --dryrun` shows it (the short default stays short)
        console.print(planlib.describe(plan), highlight=False, markup=False, soft_wrap=True)
    cost.render(est, console, explain=args.explain)
    cost.render_methods(cost.methods_side_by_side(plan.cfg, est), console)
    # After the table, as `up` does: a cap the high estimate exceeds is one line and exit 2.
    deadline_s = cost.deadline_for(est, max_cost=args.max_cost, max_hours=args.max_hours)
    if deadline_s is not None:
        console.print(f"caps hold: the job will stop by itself {deadline_s / 3600:.2f} h after setup starts on the machine")
    elif est.offers and (safety := cost.safety_deadline(est)) is not None:
        console.print(cost.safety_line(safety), highlight=False)
    return 0
