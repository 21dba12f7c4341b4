"""`socrates-launch logs [RUN]`: re-attach to a run (latest by default) with the same progress display.

A live run is followed to its end, then downloaded, verified and torn down like `up` would have; an
ended run replays its recorded events. A run recorded failed whose machine says its job still runs (a
launcher gave up on a lost log stream) is re-attached: the machine is the authority, not the record.
"""
from __future__ import annotations

import argparse

from launcher import registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN", help="run id (default: the latest run)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console  # keeps --help light (rich)

    from launcher import lifecycle  # keeps --help light (rich)

    console = Console()
    run_rec = registry.resolve(args.run_id)
    console.print(f"run [bold]{run_rec.id}[/]: {run_rec.state}", highlight=False)
    return lifecycle.reattach(run_rec, console)
