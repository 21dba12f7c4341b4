"""`socrates-launch status [RUN]`: the run's state, reconciled with whether its machine exists. A live
run whose machine is gone (the launcher was killed, the machine autodowned) is marked failed; a run
that ended with its machine still up says so loudly with the command that ends it."""
from __future__ import annotations

import argparse
import time

from launcher import registry
from launcher.backends import for_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN", help="run id (default: the latest run)")


def reconcile(run: registry.Run, backend) -> str:
    """Ask the backend what really exists; fix the record; return the machine state."""
    try:
        machine = backend.machine_state(run)
    except Exception:  # noqa: BLE001  (an unreachable API is 'unknown', not a crash)
        machine = "unknown"
    if machine == "gone":
        if run.live:
            note = "machine gone while the run was live (launcher killed or machine autodowned)"
            run.transition("failed", note=note, error=run.error or note, machine="gone",
                           ended_at=run.ended_at or time.time())
        elif run.machine != "gone":
            run.update(machine="gone", ended_at=run.ended_at or time.time())
    elif machine == "up" and run.machine != "up":
        run.update(machine="up")
    return machine


def run(args: argparse.Namespace) -> int:
    from rich.console import Console  # keeps --help light (rich)
    from rich.markup import escape  # keeps --help light (rich)

    console = Console()
    run_rec = registry.resolve(args.run_id)
    backend = for_run(run_rec)
    machine = reconcile(run_rec, backend)
    duration = run_rec.duration_s()
    handles = escape("  ".join(f"{k} {v}" for k, v in backend.handles(run_rec).items()))  # run.json: untrusted
    console.print(f"run:      {run_rec.id}\nstate:    {run_rec.state}\nmachine:  {machine}"
                  + (f" ({handles})" if handles else "") + "\n"
                  f"infra:    {run_rec.infra}  card: {run_rec.gpu or '-'}\n"
                  f"duration: {_hms(duration)}", highlight=False, soft_wrap=True)
    if run_rec.estimate:
        console.print(f"estimate: {_money(run_rec.expected_cost())}", highlight=False)
    if (actual := run_rec.actual_cost()) is not None:
        console.print(f"cost:     {_money(actual)} (price x billed time)", highlight=False)
    if run_rec.error:
        console.print(f"error:    {run_rec.error}", highlight=False, markup=False)
    if run_rec.adapter:
        console.print(f"adapter:  {run_rec.adapter} ({'verified' if run_rec.verified else 'NOT verified'})", highlight=False)
    if machine == "up" and not run_rec.live:
        console.print(f"[bold red]the machine of this ended run is still up (billing). End it: socrates-launch down {run_rec.id}[/]",
                      highlight=False)
    elif machine == "up":
        console.print(f"follow: socrates-launch logs {run_rec.id}    tear down: socrates-launch down {run_rec.id}", highlight=False)
    return 0


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _money(v) -> str:
    return "-" if v is None else f"${v:.2f}"
