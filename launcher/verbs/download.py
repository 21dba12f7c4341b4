"""`socrates-launch download [RUN]`: pull a run's artifacts again and verify every sha256."""
from __future__ import annotations

import argparse

from contracts.errors import ContractError
from launcher import registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN", help="run id (default: the latest run)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console  # keeps --help light (rich)

    run_rec = registry.resolve(args.run_id)
    if run_rec.state in ("created", "provisioning", "running"):
        # Mid-run outputs have no manifest yet; following the run downloads at its end.
        raise ContractError(f"run {run_rec.id} is {run_rec.state}: `socrates-launch logs {run_rec.id}` follows it "
                            "and downloads when the job ends")
    follower = registry.Follower(run_rec.dir)  # one writer of runs/<id>/ at a time (issue #13)
    if not follower.acquire():
        raise ContractError(f"run {run_rec.id} is being followed by another launcher (pid {follower.holder or '?'}), "
                            "which downloads at the end: wait for it, or stop it (Ctrl-C detaches) and retry")
    from launcher import lifecycle  # keeps --help light (rich)

    try:
        return lifecycle.download(run_rec, Console())
    finally:
        follower.release()
