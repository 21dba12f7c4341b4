"""`socrates-launch download [RUN]`: pull a run's artifacts again and verify every sha256."""
from __future__ import annotations

import argparse

from contracts import manifest as manifest_lib
from contracts.errors import ContractError
from launcher import registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN", help="run id (default: the latest run)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    run_rec = registry.resolve(args.run_id)
    if run_rec.state in ("created", "provisioning", "running"):
        # Mid-run outputs have no manifest yet; following the run downloads at its end.
        raise ContractError(f"run {run_rec.id} is {run_rec.state}: `socrates-launch logs {run_rec.id}` follows it "
                            "and downloads when the job ends")
    follower = registry.Follower(run_rec.dir)  # one writer of runs/<id>/ at a time (issue #13)
    if not follower.acquire():
        raise ContractError(f"run {run_rec.id} is being followed by another launcher (pid {follower.holder or '?'}), "
                            "which downloads at the end: wait for it, or stop it (Ctrl-C detaches) and retry")
    try:
        return _download(run_rec, console)
    finally:
        follower.release()


def _download(run_rec, console) -> int:
    from launcher.backends import get_backend
    from launcher.verbs.up import Recorder, _describe, fetch_and_verify

    backend = get_backend(run_rec.infra)
    before = run_rec.state
    if backend.machine_state(run_rec) != "up":
        # The machine is gone: what we can still do is re-verify the copy we already hold.
        manifest_lib.verify_or_raise(run_rec.dir)
        console.print(f"run {run_rec.id}: machine gone; local artifacts verify against manifest.json "
                      f"({run_rec.adapter or run_rec.dir})", highlight=False)
        return 0
    from launcher.progress import Progress

    recorder = Recorder(run_rec, Progress(console))
    try:
        fetch_and_verify(run_rec, backend, recorder)
    except Exception as e:  # noqa: BLE001  (what comes back is untrusted: any failure is a failed download)
        why = _describe(e)
        run_rec.transition(before, note=f"download failed: {why}")  # an earlier verified copy stays as it was
        console.print(f"[bold red]download failed:[/] {why}", highlight=False, markup=False)
        status = 1
    else:
        run_rec.transition("done" if not run_rec.exit_code else before)  # a job that failed stays failed
        console.print(f"adapter: {run_rec.adapter} (verified)", highlight=False)
        status = 0
    console.print(f"[bold red]the machine of run {run_rec.id} is still up (billing). End it: "
                  f"socrates-launch down {run_rec.id}[/]", highlight=False)
    return status
