"""The one small interface every backend (local, sky, ssh) implements. Verbs see only this.

The lifecycle a verb drives, whatever the backend:

    backend.launch(run)            provision + sync code/data + start the job, detached
    backend.follow(run, on_event)  stream the job's events until it exits; returns its exit code
    backend.download(run, dest)    pull the job's out/ (adapter, manifest, report) into dest
    backend.down(run)              end everything that costs money; idempotent, safe to repeat

`run` is the run's registry record (launcher.registry); a backend writes the handles it needs
to find its machine again (cluster name, request id, pid, remote dir) into `run.backend_state`
and saves it *before* it creates anything, so a launcher killed at any instant can be picked up
by `status`/`logs`/`down` from runs/<id>/run.json.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

EventCallback = Callable[[dict], None]


class BackendError(RuntimeError):
    """A lifecycle step failed (provision, sync, setup, run, download). `phase` says which."""

    def __init__(self, phase: str, message: str):
        super().__init__(f"{phase}: {message}")
        self.phase = phase


class StreamLost(BackendError):
    """The job's log stream could not be re-established in time. The job is not known to have failed:
    the caller detaches (the machine's autodown/deadline stay armed) and `logs` re-attaches."""


def reconnect_policy() -> tuple[float, float, float]:
    """(first wait, longest wait, how long to keep trying) in seconds for re-attaching to a dropped log
    stream; SOCRATES_RECONNECT_{WAIT,MAX_WAIT,WINDOW}_S override them (tests run an outage in seconds)."""
    def read(name: str, default: float) -> float:
        raw = os.environ.get(name)
        try:
            value = float(raw) if raw not in (None, "") else default
        except ValueError:
            value = default
        return value if value > 0 else default

    return (read("SOCRATES_RECONNECT_WAIT_S", 2.0), read("SOCRATES_RECONNECT_MAX_WAIT_S", 30.0),
            read("SOCRATES_RECONNECT_WINDOW_S", 900.0))


class Backend(ABC):
    name: str = "base"

    @abstractmethod
    def launch(self, run: Any) -> None:
        """Provision, sync and start the job detached (autodown/deadline armed remotely)."""

    @abstractmethod
    def follow(self, run: Any, on_event: EventCallback) -> int:
        """Deliver each new job event once, in order, reconnecting as needed; return the job's exit code."""

    @abstractmethod
    def download(self, run: Any, dest: Path) -> None:
        """Copy the job's output folder into `dest` (verification is the caller's)."""

    @abstractmethod
    def down(self, run: Any) -> None:
        """Stop the job and release the machine. Idempotent: a second call is a no-op."""

    @abstractmethod
    def machine_state(self, run: Any) -> str:
        """What really exists now: 'up', 'gone' or 'unknown' (used by `status` to reconcile)."""

    def job_running(self, run: Any) -> bool | None:
        """Whether the run's job is still running, asked of the machine (not the record); None: unknown."""
        return None

    def left_up_ends_by(self, run: Any) -> str | None:
        """If the results could not be pulled after the job ended, leaving the machine up keeps them
        reachable. What then ends it (a sentence), or None when nothing would and it would bill: then
        it is torn down (money first)."""
        return None
