"""`socrates-launch down [RUN]`: end everything of a run that costs money. Idempotent."""
from __future__ import annotations

import argparse

from contracts.errors import ContractError
from launcher import registry
from launcher.backends import for_run
from launcher.backends.base import outliving


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN", help="run id (default: the latest run)")
    p.add_argument("--on-teardown", default=None, metavar="CMD",
                   help="ssh runs: the provider's stop command, run locally after the job is ended (a command "
                        "saved in run.json is never run on the record's word: pass it again here)")
    p.add_argument("--delete-bucket", action="store_true",
                   help="managed runs (--spot/--managed): delete the run's bucket (or its folder in the bucket "
                        "you gave) even though its results were not downloaded and verified here")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console  # keeps --help light (rich)
    from rich.markup import escape  # keeps --help light (rich)

    from launcher.lifecycle import teardown  # keeps --help light (rich)

    console = Console()
    # Money first: a damaged record whose infra and backend_state are sound still has its machine
    # ended (writing back only its sound fields); any other damage is the one-line error.
    run_rec = registry.resolve(args.run_id, salvage=True)
    damage = getattr(run_rec, "damage", None)  # a Salvaged record says what is wrong with it
    if damage:
        console.print(f"[bold yellow]warning:[/] {escape(damage)} (its machine is ended from its "
                      "backend_state anyway)", highlight=False, soft_wrap=True)
    backend = for_run(run_rec)
    bucket = outliving(backend)  # a managed run's bucket outlives its machine
    if args.delete_bucket and bucket is None:
        raise ContractError(f"--delete-bucket: only for managed runs (--spot/--managed); run {run_rec.id} has no bucket")
    if args.on_teardown:
        backend.set_on_teardown(run_rec, args.on_teardown)
    if args.delete_bucket:
        bucket.set_delete_bucket(run_rec)
    if not teardown(run_rec, backend, None, console):
        return 1
    console.print(f"run {run_rec.id}: machine down ({run_rec.state})", highlight=False)
    if bucket and (left := bucket.bucket_left(run_rec)):
        console.print(f"[bold yellow]{escape(left)}[/]", highlight=False, soft_wrap=True)
    return 0
