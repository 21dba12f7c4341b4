"""`socrates-launch download [RUN]`: pull a run's artifacts again and verify every sha256."""
from __future__ import annotations

import argparse

from contracts import manifest as manifest_lib
from launcher import registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN", help="run id (default: the latest run)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from launcher.backends import get_backend
    from launcher.backends.base import BackendError
    from launcher.verbs.up import Recorder, fetch_and_verify

    console = Console()
    run_rec = registry.resolve(args.run_id)
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
    except (BackendError, OSError, manifest_lib.ManifestError) as e:
        run_rec.transition("failed" if before != "torn_down" else "torn_down", note=str(e), error=str(e))
        console.print(f"[bold red]download failed:[/] {e}", highlight=False)
        return 1
    run_rec.transition("done" if before in ("running", "done", "downloading", "failed") else before)
    console.print(f"adapter: {run_rec.adapter} (verified)", highlight=False)
    return 0
