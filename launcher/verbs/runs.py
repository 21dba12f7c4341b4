"""`socrates-launch runs`: every run with its state, card, duration and cost."""
from __future__ import annotations

import argparse

from launcher import registry, tables
from launcher.backends import damage_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich import box
    from rich.table import Table

    runs = registry.scan()  # a damaged record is a row that says so, not the end of the listing
    if args.json:
        print(json.dumps([{"id": r.id, "state": "damaged", "error": damage_line(r)} if r.damaged else
                          {"id": r.id, "state": r.state, "infra": r.infra, "gpu": r.gpu, "duration_s": r.duration_s(),
                           "cost_usd": r.actual_cost(), "adapter": r.adapter} for r in runs], indent=2))
        return 0
    console = Console()
    if not runs:
        console.print(f"no runs under {registry.runs_root()}/")
        return 0
    # Run ids and states are what the other verbs take and what matters: never cut short; at 80 columns or
    # in a pipe the columns that don't fit are left out (and said), instead of cells cut to "runni...".
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("run", "state", "infra", "card", "time", "$ spent", "$ est."):
        table.add_column(name, no_wrap=True, justify="right" if name.startswith(("$", "time")) else "left")
    damaged = [r for r in runs if r.damaged]
    for r in runs:
        if r.damaged:
            table.add_row(r.id, "[bold red]damaged[/]", "?", "?", "?", "?", "?")
            continue
        table.add_row(r.id, r.state, r.infra, r.gpu or "-", _short(r.duration_s()), _money(r.actual_cost()),
                      _money(r.expected_cost()))
    dropped = tables.fit(console, table, ("infra", "$ est.", "$ spent", "time", "card"))
    console.print(table)
    tables.say_dropped(console, dropped)
    for r in damaged:
        console.print(f"damaged: {damage_line(r)}", highlight=False, markup=False, soft_wrap=True)
    return 0


def _short(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _money(v: float | None) -> str:
    return "-" if v is None else f"${v:.2f}"
