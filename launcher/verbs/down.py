"""`socrates-launch down [RUN]`: end everything of a run that costs money. Idempotent."""
from __future__ import annotations

import argparse

from launcher import registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN", help="run id (default: the latest run)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from launcher.backends import get_backend
    from launcher.verbs.up import teardown

    console = Console()
    # Money first: a damaged record whose infra and backend_state are sound still has its machine
    # ended (writing back only its sound fields); any other damage is the one-line error.
    run_rec = registry.resolve(args.run_id, salvage=True)
    if isinstance(run_rec, registry.Salvaged):
        from rich.markup import escape

        console.print(f"[bold yellow]warning:[/] {escape(run_rec.damage)} (its machine is ended from its "
                      "backend_state anyway)", highlight=False, soft_wrap=True)
    if not teardown(run_rec, get_backend(run_rec.infra), None, console):
        return 1
    console.print(f"run {run_rec.id}: machine down ({run_rec.state})", highlight=False)
    return 0
