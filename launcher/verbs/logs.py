"""`socrates-launch logs [RUN]`: re-attach to a run (latest by default) with the same progress display.

A live run is followed to its end, then downloaded, verified and torn down like `up` would have;
an ended run replays its recorded events. A run recorded as failed whose machine says its job is
still running (a launcher that gave up on a lost log stream) is re-attached: the machine is asked,
the record is not the authority.
"""
from __future__ import annotations

import argparse

from launcher import registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN", help="run id (default: the latest run)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from launcher.backends import get_backend
    from launcher.progress import Progress
    from launcher.verbs.up import _read_events, drive

    console = Console()
    run_rec = registry.resolve(args.run_id)
    console.print(f"run [bold]{run_rec.id}[/]: {run_rec.state}", highlight=False)
    # sky: a launch request in flight; ssh/local: the job was started (its pid saved) before the launcher died
    if run_rec.state == "provisioning" and (run_rec.backend_state.get("request_id") or run_rec.backend_state.get("pid")):
        run_rec.transition("running", note="re-attached while the launch was in flight")
    backend = None
    if run_rec.state == "failed" and not run_rec.verified and run_rec.exit_code is None and run_rec.machine == "up":
        # The record may be wrong (an old launcher gave up on a lost log stream): ask the machine.
        backend = get_backend(run_rec.infra)
        if backend.job_running(run_rec):
            console.print(f"the record says failed, but its job is still running on the machine: re-attaching",
                          highlight=False)
            run_rec.transition("running", note="re-attached: the job was found still running", error=None)
    if run_rec.state in ("running", "downloading"):  # downloading: a pull that was cut off is redone
        return drive(run_rec, backend or get_backend(run_rec.infra), console, launch=False)
    progress = Progress(console, price_per_hour=run_rec.price_per_hour, started_at=run_rec.started_at)
    for ev in _read_events(run_rec.events_path):
        progress.on_event(ev)
    progress.close()
    if run_rec.state in ("created", "provisioning"):
        console.print(f"the run has not started its job yet; `socrates-launch status {run_rec.id}` reconciles it")
    if run_rec.error:
        console.print(f"error: {run_rec.error}", highlight=False, markup=False)
    if run_rec.adapter:
        console.print(f"adapter: {run_rec.adapter}", highlight=False)
    return 0 if run_rec.state == "done" else 1
