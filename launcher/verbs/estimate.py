"""`socrates-launch estimate`: what a run will cost, per cloud offer, before anything starts."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from contracts.config import RunConfig, check_fraction, load_config
from contracts.errors import ContractError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", help="NAME:COUNT, e.g. A100:1 (default: every card that fits, cheapest marked)")
    p.add_argument("--subset", type=float, help="fraction of training rows, in (0, 1] (default: the config's)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default: configs/paper.yaml)")
    p.add_argument("--data", help="prepared folder (exact tokens), local .jsonl/.parquet, or the hub id")
    p.add_argument("--cloud", help="only this cloud's offers (default: every cloud with a catalog)")
    p.add_argument("--spot", action="store_true", help="spot prices (a preemption ends the run: no automatic recovery)")
    p.add_argument("--infra", default="sky", help="sky (default), local or ssh://user@host (no cloud price)")
    p.add_argument("--eval-rows", type=int, help="evaluate on at most N test rows (as `up --eval-rows`)")
    p.add_argument("--no-eval", action="store_true", help="no evaluation after training (as `up --no-eval`)")
    p.add_argument("--max-cost", type=float, help="USD: say whether `up` would refuse, and the deadline it sets (--infra sky only: "
                   "local and ssh machines have no price; use --max-hours)")
    p.add_argument("--max-hours", type=float, help="hours: likewise")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--explain", action="store_true", help="show every term of the hours")


def run(args: argparse.Namespace) -> int:
    from launcher import cost
    from launcher.backends import check_infra
    from launcher.verbs.up import check_combinations

    args.infra = check_infra(args.infra)
    check_combinations(args, args.infra)
    cost.check_caps(args.max_cost, args.max_hours, args.infra)
    cfg = resolve_config(args.config, args.subset, args.data)
    if args.eval_rows is not None:
        if args.eval_rows < 1:
            raise ContractError(f"--eval-rows {args.eval_rows}: not accepted (a whole number >= 1)")
        cfg = cfg.with_overrides({"eval.rows": args.eval_rows}, source="command line")
    if args.no_eval:
        cfg = cfg.with_overrides({"eval.enabled": False}, source="command line")
    est = cost.estimate_run(cfg, gpu=args.gpu, cloud=args.cloud, spot=args.spot, data=args.data, infra=args.infra,
                             allow_unpriced=True)
    if args.json:
        out = cost.to_json(est)
        out["deadline_s"] = cost.deadline_for(est, max_cost=args.max_cost, max_hours=args.max_hours)
        out["safety_deadline_s"] = cost.safety_deadline(est) if out["deadline_s"] is None else None
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    cost.render(est, console, explain=args.explain)
    # After the table, as `up` does: a cap the high estimate exceeds is one line and exit 2.
    deadline_s = cost.deadline_for(est, max_cost=args.max_cost, max_hours=args.max_hours)
    if deadline_s is not None:
        console.print(f"caps hold: the job will stop by itself {deadline_s / 3600:.2f} h after setup starts on the machine")
    elif est.offers and (safety := cost.safety_deadline(est)) is not None:
        console.print(cost.safety_line(safety), highlight=False)
    return 0


def resolve_config(path: str, subset: float | None, data: str | None) -> RunConfig:
    cfg = load_config(path)
    overrides: dict = {}
    if subset is not None:
        overrides["data.subset"] = check_fraction(subset, "--subset")
    if data:
        overrides["data.source"] = data
    return cfg.with_overrides(overrides, source="command line") if overrides else cfg
