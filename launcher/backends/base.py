"""The one small interface every backend (local, sky, managed, ssh) implements. Verbs see only this.

The lifecycle a verb drives, whatever the backend:

    backend.launch(run)            provision + sync code/data + start the job, detached
    backend.follow(run, on_event)  stream the job's events until it exits; returns its exit code
    backend.download(run, dest)    pull the job's out/ (adapter, manifest, report) into dest
    backend.down(run)              end everything that costs money; idempotent, safe to repeat

launcher/lifecycle.py drives these (with the signal handling and salvage rules); verbs call the
lifecycle and the optional methods below, never a concrete backend. A backend whose results outlive its
machine (a managed run's bucket) is also an `Outlives` (`outliving(backend)`). A new backend is one more
subclass and a row in launcher/backends/__init__.py (BACKENDS, `kind_of`); no verb changes.

A backend saves the handles that find its machine again (cluster name, request id, pid, remote dir) in
`run.backend_state` *before* it creates anything, so a launcher killed at any instant can be picked up
by `status`/`logs`/`down` from runs/<id>/run.json.
"""
from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

from contracts.config import RunConfig
from contracts.errors import ContractError
from launcher.registry import Run

EventCallback = Callable[[dict], None]


class BackendError(RuntimeError):
    """A lifecycle step failed (provision, sync, setup, run, download). `phase` says which."""

    def __init__(self, phase: str, message: str):
        super().__init__(f"{phase}: {message}")
        self.phase = phase


class StreamLost(BackendError):
    """The job's log stream could not be re-established in time. The job is not known to have failed:
    the caller detaches (the machine's autodown/deadline stay armed) and `logs` re-attaches."""


def disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or what it was raised from, is this machine's disk filling up (ENOSPC, EDQUOT; also
    as text, as shutil's Error list and rsync report it)."""
    for _ in range(20):
        if e is None:
            return False
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
                or "No space left on device" in str(e) or "Disk quota exceeded" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def reconnect_policy() -> tuple[float, float, float]:
    """(first wait, longest wait, how long to keep trying) in seconds for re-attaching to a dropped log
    stream; SOCRATES_RECONNECT_{WAIT,MAX_WAIT,WINDOW}_S override them (tests run an outage in seconds)."""
    def read(name: str, default: float) -> float:
        try:
            value = float(os.environ.get(name) or default)
        except ValueError:
            return default
        return value if value > 0 else default

    return (read("SOCRATES_RECONNECT_WAIT_S", 2.0), read("SOCRATES_RECONNECT_MAX_WAIT_S", 30.0),
            read("SOCRATES_RECONNECT_WINDOW_S", 900.0))


class Backend(ABC):
    """What every verb and launcher/lifecycle.py may ask of a backend; nothing else is asked. Where backends
    differ, the difference is a method here (with a default for a backend that has nothing to do). Nothing
    assumes one machine for the whole run: `follow` may see the job restart elsewhere (a managed job
    relaunched after a preemption), `download` may read a bucket rather than the machine."""

    name: str = "base"
    HANDLES: tuple[str, ...] = ()
    """The backend_state keys that find the machine again (`handles`)."""
    CTRL_C_STOPS = False
    """Ctrl-C during `up` stops the job and tears down (the job runs on the user's own machine: nothing
    bills, and a newcomer expects Ctrl-C to stop it); else the first Ctrl-C detaches."""

    def on_phase(self, name: str, detail: str | None = None) -> None:
        """Called by the backend when a lifecycle phase begins (syncing, installing, reconnecting, ...).
        The lifecycle replaces it (`backend.on_phase = recorder.phase`); by default nothing is shown."""

    # --- before a run exists --------------------------------------------------------------

    def preflight(self, cfg: RunConfig) -> None:
        """Checks that need the infrastructure (credentials, host key, disk), before a run exists:
        ContractError (exit 2, one line) refuses. Default: nothing to check."""

    def dryrun(self, task: dict, plan: Any, console: Any) -> int:
        """After the rendered task was shown: what this backend adds to a dry run (SkyPilot's optimizer
        picks the offer). Returns the exit status. Nothing is started. Default: says so."""
        console.print(f"dry run: nothing started ({plan.infra} backend)")
        return 0

    # --- the lifecycle -------------------------------------------------------------------

    @abstractmethod
    def launch(self, run: Run) -> None:
        """Provision, sync and start the job detached (autodown/deadline armed remotely)."""

    @abstractmethod
    def follow(self, run: Run, on_event: EventCallback) -> int:
        """Deliver each new job event once, in order, reconnecting as needed; return the job's exit code."""

    def log_lines(self, run: Run) -> list[str]:
        """The job's output as lines, for runs/<id>/job.log (the lifecycle writes it, redacted). Empty:
        nothing to add (e.g. `follow` already writes job.log itself)."""
        return []

    @abstractmethod
    def download(self, run: Run, dest: Path) -> None:
        """Copy the job's output folder into `dest` (verification is the caller's)."""

    @abstractmethod
    def down(self, run: Run) -> None:
        """Stop the job and release the machine. Idempotent: a second call is a no-op."""

    def detach(self, run: Run) -> str:
        """The launcher stops following; the job runs on. Release what this process holds (connections)
        and return what ends the machine now (a sentence for the user)."""
        return "nothing ends it or pulls results back until you run `logs` or `down`."

    def set_on_teardown(self, run: Run, command: str) -> None:
        """`down --on-teardown CMD`: a local command to run once the job is ended. Refused (exit 2) by a
        backend that has no such hook."""
        raise ContractError(f"--on-teardown: only for ssh runs (run {run.id} is on {run.infra})")

    # --- finding the machine again (from run.json, after the launcher was killed) ---------

    @abstractmethod
    def machine_state(self, run: Run) -> str:
        """What really exists now: 'up', 'gone' or 'unknown' (used by `status` to reconcile)."""

    def job_running(self, run: Run) -> bool | None:
        """Whether the run's job is still running, asked of the machine (not the record); None: unknown."""
        return None

    def launch_submitted(self, run: Run) -> bool:
        """Whether the record shows the launch got far enough that the job runs or will run (a request
        id, a pid): a run still recorded `provisioning` is then re-attached by `logs`."""
        return False

    def handles(self, run: Run) -> dict:
        """The handles this backend saved in run.json to find the machine again (cluster name, request
        id, pid, remote folder: the HANDLES keys of backend_state), for `status` to show; those set."""
        return {k: run.backend_state[k] for k in self.HANDLES if run.backend_state.get(k) is not None}

    @classmethod
    def end_by_hand(cls, handles: dict) -> str | None:
        """For a run.json too damaged to use: the command that ends its machine from `handles` alone
        (backend_state as read), or None when this backend's handles are not there."""
        return None

    def left_up_ends_by(self, run: Run) -> str | None:
        """If the results could not be pulled after the job ended, leaving the machine up keeps them
        reachable. What then ends it (a sentence), or None when nothing would and it would bill: then
        it is torn down (money first)."""
        return None


class Outlives(ABC):
    """A backend whose results outlive the machine (a managed run's bucket): a full fine-tune's weights
    can stay there (`up --weights leave`), and `down` keeps or deletes it. Only such a backend is asked."""

    WEIGHTS_OUTLIVE: str
    """Where the weights outlive the machine (words for the plan)."""

    @abstractmethod
    def download_leaving(self, run: Run, dest: Path, leave: Callable[[str], bool]) -> str:
        """`download`, except the manifest entries `leave(path)` is true for: they stay where they are,
        checked present (with the manifest's size). Returns where they are (for run.json and `download`)."""

    @abstractmethod
    def set_delete_bucket(self, run: Run) -> None:
        """`down --delete-bucket`: delete the run's bucket even though nothing was verified here."""

    @abstractmethod
    def bucket_left(self, run: Run) -> str | None:
        """After `down`: what it left that still bills (a kept bucket) and how to delete it; None: nothing."""


def outliving(backend: Backend) -> Outlives | None:
    """`backend` where its results outlive the machine (`Outlives`), else None: how callers ask."""
    return backend if isinstance(backend, Outlives) else None
