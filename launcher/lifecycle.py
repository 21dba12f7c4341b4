"""The run lifecycle, whatever the backend: provision -> sync -> run -> stream -> fetch+verify -> teardown.

`up` starts it (`start`), `logs` re-attaches to it (`reattach`), `download` pulls again (`download`),
`down` ends it (`teardown`). From the moment a run exists, every path out of here either leaves the
run done and the machine down, or says loudly how to reach and end what is still running (detach,
first Ctrl-C). It asks the backend only what launcher/backends/base.Backend declares: the job may
restart under `follow` (a managed job relaunched after a preemption) and `download` may read a
bucket, not the machine; nothing here assumes one machine for the whole run.

Signals: while provisioning an interrupt tears down; once the job runs the first Ctrl-C (or SIGTERM/
SIGHUP) detaches, a second within SECOND_CTRL_C_S tears down (CTRL_C_STOPS backends: Ctrl-C stops the job).
A job that succeeded whose results can't be pulled back leaves the machine up when the backend says
what ends it (`left_up_ends_by`), else it is torn down (money first).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import time
from pathlib import Path

from rich.markup import escape

from contracts import manifest as manifest_lib
from contracts import remote
from contracts.errors import ContractError
from contracts.events import LINE_PREFIX, dumps, make, read_record
from launcher import registry
from launcher.backends import for_run
from launcher.backends.base import Backend, BackendError, StreamLost, disk_full, outliving
from launcher.progress import Progress
from launcher.secrets import plain, redact

SECOND_CTRL_C_S = 3.0
DOWNLOAD_ATTEMPTS = 3
DOWNLOAD_RETRY_S = 1.0
SALVAGE_ATTEMPTS = 2  # after a failed job: usually there is simply no manifest, so fewer tries

def read_events(path: Path) -> list[dict]:
    """The events recorded in runs/<id>/events.jsonl, its `phase` lines included (none without a file yet)."""
    return read_record(path) if path.is_file() else []


# --- the verbs' entry points -------------------------------------------------------------------

def start(run: registry.Run, backend: Backend, console, *, detach: bool = False) -> int:
    """`up`: launch a new run (its record exists, nothing else does), follow it to the end."""
    return drive(run, backend, console, launch=True, detach=detach)


def reattach(run: registry.Run, console, backend: Backend | None = None) -> int:
    """`logs`: a live run is followed to its end (then downloaded, verified and torn down as `up` would
    have); an ended run replays its recorded events. A run recorded `failed` whose job the machine says
    is still running is re-attached. The backend is made (`for_run`) only when the machine is asked."""
    def machine() -> Backend:
        nonlocal backend
        backend = backend or for_run(run)
        return backend

    # sky: a launch request in flight; ssh/local: the job was started (its pid saved) before the launcher died
    if run.state == "provisioning" and machine().launch_submitted(run):
        run.transition("running", note="re-attached while the launch was in flight")
    if run.state == "failed" and not run.verified and run.exit_code is None and run.machine == "up":
        # The record may be wrong (an old launcher gave up on a lost log stream): ask the machine.
        if machine().job_running(run):
            console.print("the record says failed, but its job is still running on the machine: re-attaching",
                          highlight=False)
            run.transition("running", note="re-attached: the job was found still running", error=None)
    if run.state in ("running", "downloading"):  # downloading: a pull that was cut off is redone
        return drive(run, machine(), console, launch=False)
    replay(run, console)
    if run.state in ("created", "provisioning"):
        console.print(f"the run has not started its job yet; `socrates-launch status {run.id}` reconciles it")
    if run.error:
        console.print(f"error: {run.error}", highlight=False, markup=False)
    if run.adapter:
        console.print(f"adapter: {run.adapter}", highlight=False)
    return 0 if run.state == "done" else 1


def replay(run: registry.Run, console) -> None:
    """Show the recorded events with the same progress display (nothing is appended)."""
    progress = Progress(console, price_per_hour=run.price_per_hour, started_at=run.started_at)
    for ev in read_events(run.events_path):
        progress.on_event(ev)
    progress.close()


def download(run: registry.Run, console, backend: Backend | None = None) -> int:
    """`download`: pull the artifacts again and verify them; the machine (or bucket) is left as it is.
    The caller holds the run's follower lock."""
    backend = backend or for_run(run)
    before = run.state
    if backend.machine_state(run) != "up" and not run.weights_left:
        # The machine is gone: what we can still do is re-verify the copy we already hold.
        manifest_lib.verify_or_raise(run.dir)
        console.print(f"run {run.id}: machine gone; local artifacts verify against manifest.json "
                      f"({run.adapter or run.dir})", highlight=False)
        return 0
    recorder = Recorder(run, Progress(console))
    try:
        fetch_and_verify(run, backend, recorder)
    except Exception as e:  # noqa: BLE001  (what comes back is untrusted: any failure is a failed download)
        why = describe(e)
        run.transition(before, note=f"download failed: {why}")  # an earlier verified copy stays as it was
        console.print(f"[bold red]download failed:[/] {why}", highlight=False, markup=False)
        status = 1
    else:
        run.transition("done" if not run.exit_code else before)  # a job that failed stays failed
        console.print(f"adapter: {run.adapter} (verified)", highlight=False)
        status = 0
    if backend.machine_state(run) == "up":  # else the weights came from where they were left; no machine bills
        console.print(f"[bold red]the machine of run {run.id} is still up (billing). End it: "
                      f"socrates-launch down {run.id}[/]", highlight=False)
    return status


# --- following a run ----------------------------------------------------------------------------

def drive(run: registry.Run, backend: Backend, console, *, launch: bool, detach: bool = False) -> int:
    """Launch (if asked), follow, download + verify, tear down (except on an explicit detach); `up`'s exit
    status. One follower per run: if another launcher already follows it (runs/<id>/.follow.lock), this
    one only shows what was recorded and says so: it never appends events, pulls or moves results."""
    follower = registry.Follower(run.dir)
    if not follower.acquire():
        replay(run, console)
        console.print(f"run {run.id} is being followed by another launcher (pid {follower.holder or '?'}), which "
                      f"downloads and tears down at the end; this one only shows what it recorded. "
                      f"`socrates-launch status {run.id}` shows where it is.", highlight=False)
        return 0
    remote.skipped.reset()
    try:
        return _drive(run, backend, console, launch=launch, detach=detach)
    finally:
        follower.release()
        if remote.skipped.count:  # once, at the end: a bad line is never fatal, but it is not hidden
            console.print(remote.skipped.summary(), highlight=False, markup=False)


def _drive(run: registry.Run, backend: Backend, console, *, launch: bool, detach: bool = False) -> int:
    progress = Progress(console, price_per_hour=run.price_per_hour, started_at=run.started_at)
    recorder = Recorder(run, progress)
    backend.on_phase = recorder.phase

    def raise_hangup(signum, frame):
        raise _HungUp(signum)

    try:  # else SIGTERM/SIGHUP end the launcher on the spot: no teardown of a machine still provisioning
        try:
            with _signals_to(raise_hangup, signal.SIGTERM, signal.SIGHUP):
                status = _lifecycle(run, backend, recorder, console, launch=launch, detach=detach)
        finally:
            progress.close()
    except _DownloadFailed as e:
        message = plain(redact(describe(e.__cause__ or e)))
        ends_by = backend.left_up_ends_by(run)
        try:
            run.transition("failed", note=message, error=message)
        except OSError as write_error:  # the disk is still full: the user is told below all the same
            console.print(f"[bold red]run {run.id}: could not update run.json ({write_error})[/]", highlight=False)
        if ends_by is not None:
            # The only copy of the adapter is on the machine: leave it up (its end is armed) and say so.
            console.print(
                f"[bold red]run {run.id}: the job finished but its results could not be pulled back:[/] {escape(message)}\n"
                f"  they are still on the machine, which is left up: {ends_by}.\n"
                f"  pull them:  socrates-launch download {run.id}\n  then end it: socrates-launch down {run.id}",
                highlight=False)
            return 1
        console.print(f"[bold red]run {run.id}: the job finished but its results could not be pulled back "
                      f"({escape(message)}); the machine is torn down (nothing would end it otherwise)[/]",
                      highlight=False)
        status = 1
    except (KeyboardInterrupt, _HungUp) as e:
        if run.state in ("created", "provisioning"):
            return _end_now(run, backend, console, recorder, e)
        if isinstance(e, _HungUp):  # the terminal went away or we were asked to stop: detach, quietly
            run.update(note=f"launcher stopped by {e.name}; the job runs on")
            say_detached(run, backend, console)
            return 128 + e.signum
        if launch and backend.CTRL_C_STOPS:
            return _end_now(run, backend, console, recorder, e)
        return _interrupted(run, backend, console, recorder)
    except StreamLost as e:  # the job is not known to have failed: detach, never tear down over a lost stream
        message = plain(redact(str(e)))
        run.update(note=f"detached: {message}")
        console.print(f"[bold yellow]run {run.id}: {escape(message)}[/]; the job is left running (not torn down).",
                      highlight=False)
        say_detached(run, backend, console)
        return 1
    except (BackendError, ContractError, OSError) as e:
        _save_log(run, backend)
        message = plain(redact(str(e)))
        run.transition("failed", note=message, error=message)
        console.print(f"[bold red]run {run.id} failed:[/] {escape(message)}", highlight=False)
        _tail_log(run, console)
        status = 1
    except BaseException:
        teardown(run, backend, recorder, console)  # an unexpected error must not leave a machine up
        raise
    if detach and run.state == "running":
        return status
    if not teardown(run, backend, recorder, console):
        return 1
    if run.state == "done":
        console.print(f"[bold green]adapter:[/] {run.adapter} (verified against manifest.json)", highlight=False,
                      soft_wrap=True)
    if run.weights_left:
        console.print(f"the weights were left in {run.weights_left} (--weights leave; everything "
                      f"else came back and verifies). Pull them: socrates-launch download {run.id}", highlight=False)
    return status


def _lifecycle(run: registry.Run, backend: Backend, recorder: "Recorder", console, *, launch: bool,
               detach: bool) -> int:
    if launch:
        run.transition("provisioning", started_at=time.time(), machine="up")
        recorder.progress.started_at = run.started_at
        recorder.phase("provisioning", f"{run.gpu or 'local'} via {run.infra}")
        backend.launch(run)
        run.transition("running")
        recorder.phase("training")
        if detach:
            say_detached(run, backend, console)
            return 0
    code = backend.follow(run, recorder.job_event)
    _save_log(run, backend)
    run.update(exit_code=code)
    sent, got = run.options.data_sha256, recorder.data_sha256
    if sent and got and sent != got:
        raise BackendError("running", f"the job was given other data than was sent: it hashed {got}, "
                                      f"the launcher sent {sent} (a stale or mixed data folder on the machine)")
    if code != 0:
        raise BackendError("running", f"the job exited with status {code}{_salvage(run, backend, recorder)}")
    recorder.progress.close()
    try:
        fetch_and_verify(run, backend, recorder, pull_weights=run.options.weights != "leave")
    except Exception as e:  # noqa: BLE001  (whatever went wrong, the only copy is on the machine: keep it up)
        raise _DownloadFailed() from e
    run.transition("done")
    return 0


class _DownloadFailed(Exception):
    """The job succeeded, its results did not come back (the cause is chained)."""


def _salvage(run: registry.Run, backend: Backend, recorder: "Recorder") -> str:
    """A job that failed after training (evaluation crashed, the deadline's hard kill) has a finished,
    paid-for adapter on the machine: pull it back before teardown if its manifest verifies."""
    try:
        fetch_and_verify(run, backend, recorder, attempts=SALVAGE_ATTEMPTS,
                         pull_weights=run.options.weights != "leave")
    except Exception:  # noqa: BLE001  (a salvage that fails for any reason leaves the run failed, as it was)
        return "; no finished adapter on the machine to pull back"
    return f"; the adapter it had finished was pulled back and verifies: {run.adapter}"


class Recorder:
    """Writes each event to runs/<id>/events.jsonl once (also across re-attaches) and shows it."""

    def __init__(self, run: registry.Run, progress):
        self.run = run
        self.progress = progress
        self.skip = sum(1 for ev in read_events(run.events_path) if ev.get("event") != "phase")
        self.data_sha256: str | None = None

    def job_event(self, ev: dict) -> None:
        if ev.get("event") == "log" and isinstance(ev.get("data_sha256"), str):
            self.data_sha256 = ev["data_sha256"]  # the last one: what the job was given
        self.progress.on_event(ev)
        if self.skip > 0:
            self.skip -= 1
            return
        with open(self.run.events_path, "a", encoding="utf-8") as f:
            f.write(redact(dumps(ev)) + "\n")

    def phase(self, name: str, detail: str | None = None) -> None:
        ev = make("phase", phase=name, **({"detail": detail} if detail else {}))
        self.progress.on_event(ev)
        with open(self.run.events_path, "a", encoding="utf-8") as f:
            f.write(dumps(ev) + "\n")


def fetch_and_verify(run: registry.Run, backend: Backend, recorder: Recorder, attempts: int = DOWNLOAD_ATTEMPTS,
                     pull_weights: bool = True) -> None:
    """Pull out/ into a staging folder, verify it (untrusted: exactly the manifest's files, each sha256
    matching), then move the results into runs/<id>/, replacing only with a copy that verified. Retried:
    a failed or corrupt pull is worth another try before the machine (and the only copy) is torn down.
    `pull_weights=False` (`up --weights leave`, a backend whose results outlive the machine): a full
    fine-tune's weight shards stay where they are; run.json's weights_left says where."""
    leaving = None if pull_weights else outliving(backend)
    weights = lambda path: bool(manifest_lib.FULL_WEIGHTS.match(path))  # noqa: E731
    staging = run.dir / ".download"
    try:
        run.transition("downloading")
        recorder.phase("downloading")
        for attempt in range(1, attempts + 1):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                left_at = leaving.download_leaving(run, staging, weights) if leaving else None
                if not leaving:
                    backend.download(run, staging)
                manifest = manifest_lib.load(staging)
                left = manifest_lib.weight_files(manifest) if left_at else set()
                manifest = manifest_lib.verify_or_raise(staging, tree=True, reserved=registry.RESERVED, left=left)
                break
            except Exception as e:  # noqa: BLE001  (any failure of an untrusted pull is retried, then reported)
                if attempt == attempts or disk_full(e):  # a full disk stays full: no retry
                    raise
                recorder.phase("downloading", f"attempt {attempt} failed ({redact(describe(e))}); retrying")
                time.sleep(DOWNLOAD_RETRY_S * attempt)
        # Only what the manifest lists (and the manifest) is moved; its top-level names were checked above.
        manifest_lib.move_listed(staging, run.dir, manifest)
        manifest_lib.verify_or_raise(run.dir, left=left)
    except Exception as e:
        need = _needed_bytes(staging) if disk_full(e) else 0
        shutil.rmtree(staging, ignore_errors=True)  # first: what it held is the room the record needs
        if disk_full(e):
            raise DiskFull(run, need) from e
        raise
    got = "model" if not (run.dir / "adapter").is_dir() and (run.dir / "model").is_dir() else "adapter"  # method full: model/
    run.update(adapter=str((run.dir / got).resolve()), verified=True, weights_left=left_at if left else None)


class DiskFull(OSError):
    """This machine's disk filled up while results came back: what to free, and how to pull again."""

    def __init__(self, run: registry.Run, need: int):
        free = shutil.disk_usage(run.dir).free if run.dir.is_dir() else 0
        mb = max(1, -(-(need - free) // 10**6))
        super().__init__(errno.ENOSPC, f"downloading failed: the disk holding {run.dir} is full: free at least "
                                       f"{mb:,} MB, then `socrates-launch download {run.id}`")

    def __str__(self) -> str:
        return self.strerror


def _needed_bytes(staging: Path) -> int:
    """What the pull needs: the manifest's sizes when it had come back, else twice what had (a guess)."""
    try:
        return sum(int(e["size"]) for e in manifest_lib.load(staging)["files"]) + (1 << 20)
    except Exception:  # noqa: BLE001  (no manifest yet, or an unreadable one: the guess)
        total = 0
        for dirpath, _, names in os.walk(staging):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return 2 * total


def describe(e: BaseException) -> str:
    """One line for any exception (a bare KeyError's str is only the key)."""
    return str(e) if isinstance(e, (BackendError, ContractError, OSError)) else f"{type(e).__name__}: {e}"


def teardown(run: registry.Run, backend: Backend, recorder: Recorder | None, console) -> bool:
    """End the machine; if that fails, say loudly how to end it (money). True when it is down."""
    if recorder is not None:
        recorder.phase("tearing down")
    try:
        backend.down(run)
    except Exception as e:  # noqa: BLE001  (any failure here must reach the user, not a traceback)
        console.print(f"[bold red]TEARDOWN FAILED for run {run.id}: {escape(plain(redact(str(e))))}[/]\n"
                      f"  the machine may still be running and billing. Retry: socrates-launch down {run.id}",
                      highlight=False)
        run.update(machine="unknown")
        return False
    state = {"machine": "gone", "ended_at": run.ended_at or time.time()}
    if run.live:
        run.transition("torn_down", note="torn down before the run ended", **state)
    else:
        run.update(**state)
    return True


# --- signals and detaching ----------------------------------------------------------------------

class _HungUp(BaseException):
    """SIGTERM or SIGHUP (a closed terminal, a logout, `kill`), raised where the launcher is."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


@contextlib.contextmanager
def _signals_to(handler, *signals: int):
    """`handler` for `signals` inside the block, the previous ones after it (outside the main thread: none)."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _end_now(run: registry.Run, backend: Backend, console, recorder: Recorder, why: BaseException) -> int:
    """Interrupted where the machine must end now: before the job started (SkyPilot arms autodown only when
    it submits the job: nothing might end it), or by Ctrl-C where that stops the job (CTRL_C_STOPS)."""
    name = why.name if isinstance(why, _HungUp) else "Ctrl-C"
    if run.state in ("created", "provisioning"):
        console.print(f"\n[bold yellow]{name} while provisioning run {run.id}[/]: its autodown is not armed yet, "
                      "so it is torn down now (nothing was trained)", highlight=False)
    else:
        console.print(f"\n[bold yellow]Ctrl-C: stopping run {run.id}[/]: its job is ended and its folder removed "
                      "(`up --detach` keeps a local job running)", highlight=False)
        run.update(note="stopped by Ctrl-C")
    with _signals_to(signal.SIG_IGN, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a half-done teardown costs most
        teardown(run, backend, recorder, console)
    return 128 + (why.signum if isinstance(why, _HungUp) else signal.SIGINT)


def _interrupted(run: registry.Run, backend: Backend, console, recorder: Recorder) -> int:
    """First Ctrl-C detaches (autodown armed); a second within a few seconds tears down now (also one that
    comes while the message is still being written)."""
    try:
        console.print(
            f"\n[bold yellow]detached from run {run.id}[/]: the job keeps running; {backend.detach(run)}\n"
            f"  re-attach:  socrates-launch logs {run.id}\n  tear down:  socrates-launch down {run.id}\n"
            f"  (press Ctrl-C again within {SECOND_CTRL_C_S:.0f} s to tear down now)", highlight=False)
        time.sleep(SECOND_CTRL_C_S)
    except KeyboardInterrupt:
        with _signals_to(signal.SIG_IGN, signal.SIGINT):
            console.print("tearing down now")
            teardown(run, backend, recorder, console)
    return 130


def say_detached(run: registry.Run, backend: Backend, console) -> None:
    console.print(f"detached: run {run.id} is running; {backend.detach(run)}\n  follow:     socrates-launch logs {run.id}\n"
                  f"  tear down:  socrates-launch down {run.id}", highlight=False)


def _save_log(run: registry.Run, backend: Backend) -> None:
    try:
        text = "\n".join(backend.log_lines(run))
    except Exception:  # noqa: BLE001  (the log is a convenience; never mask the real outcome)
        return
    if text:
        run.log_path.write_text(redact(text) + "\n", encoding="utf-8")


def _tail_log(run: registry.Run, console, n: int = 15) -> None:
    if run.log_path.is_file():
        lines = [remote.clean(ln)[:500] for ln in run.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if LINE_PREFIX.strip() not in ln][-n:]
        if lines:
            console.print("last job output:\n  " + "\n  ".join(lines), highlight=False, markup=False)
