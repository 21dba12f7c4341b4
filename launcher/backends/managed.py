"""The managed-jobs backend (`up --spot`, `up --managed`): a run that outlives its machine.

SkyPilot's controller starts the job (`sky.jobs.launch`) and, after a preemption or a lost host,
starts it again on new capacity (`resources.job_recovery`). OUT, its checkpoints and the launch record
live in the run's bucket, mounted on every machine (launcher/task.py), so a relaunch resumes from the
newest complete checkpoint and keeps the first start's deadline. The launcher need not be alive: `logs`
follows the job across relaunches, `down` cancels it, the results are downloaded from the bucket and
verified, and the bucket is deleted after a verified download unless --keep-bucket (a bucket the user
named keeps everything but this run's folder). SDK calls go through the sky backend's adapter seam.
"""
from __future__ import annotations

import contextlib
import re
import secrets as secrets_lib
from pathlib import Path

from contracts.errors import ContractError
from contracts.events import parse_line, read_record
from contracts.remote import is_int
from launcher.backends.base import BackendError, EventCallback, Outlives
from launcher.backends.sky import SkyPilotBackend, failed
from launcher.bucket import PARTIAL_DIR, Bucket, default_url, given_bucket, parse_url, url_for_run
from launcher.registry import Run
from launcher.secrets import redact
from launcher.sky_adapter import LaunchRequestFailed

# ManagedJobStatus names (sky.jobs.ManagedJobStatus) by what they mean here.
LIVE = ("PENDING", "DEPRECATED_SUBMITTED", "STARTING", "RUNNING", "RECOVERING", "CANCELLING", "WINDING_DOWN")
SUCCEEDED = "SUCCEEDED"


def job_name_for(run_id: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"socrates-{run_id}".lower()).strip("-")[:60].rstrip("-")


class ManagedBackend(SkyPilotBackend, Outlives):
    name = "managed"
    HANDLES = ("job_name", "request_id", "job_id", "bucket")
    delete_bucket = False  # `down --delete-bucket`: delete it even though nothing was verified here

    # --- the lifecycle -------------------------------------------------------------------

    def launch(self, run: Run) -> None:
        url = url_for_run(run)
        name = job_name_for(run.id)
        make = not given_bucket(run)
        try:
            bucket = Bucket.from_url(url)
            # A bucket to be made for the run that is there already is someone's: `down` would delete it.
            if make and bucket.exists():
                raise BackendError("provisioning", f"the bucket {url} already exists: a bucket made for a run must "
                                                   f"be new (to use it, pass --bucket {url}: only the run's folder "
                                                   f"in it is ever deleted)")
        except (ContractError, BackendError):
            raise
        except Exception as e:  # noqa: BLE001
            raise BackendError("provisioning", redact(f"could not reach the bucket {url}: {type(e).__name__}: {e}")) from None
        # Saved before anything is made: `down` and `status` find the job and the bucket from here; the
        # token is what the bucket's owner marker must hold before `down` deletes it whole.
        token = secrets_lib.token_hex(16) if make else None
        run.update(backend_state={"job_name": name, "bucket": url, "bucket_made": make,
                                  **({"bucket_token": token} if make else {})}, machine="up")
        try:
            if make:
                bucket.create_for(run.id, token)
            else:
                bucket.create()  # a bucket you named: made if missing, used as it is otherwise
        except ContractError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BackendError("provisioning", redact(f"could not create the bucket {url}: {type(e).__name__}: {e}")) from None
        self._submit(run, lambda task, secrets, on_request_id: self.adapter.jobs_launch(
            task, name, secrets, on_request_id=on_request_id), bucket_url=url)

    def _job_id(self, run: Run) -> int | None:
        job_id = self._launched_job(run, lambda request: self.adapter.wait_jobs_launch(request))
        return int(job_id) if isinstance(job_id, int) or (isinstance(job_id, str) and job_id.isdigit()) else None

    def _record(self, run: Run, refresh: bool = False) -> dict | None:
        job_id = self._job_id(run)
        if job_id is None:
            return None
        rec = self.adapter.jobs_queue(job_id, refresh=refresh)
        if rec is not None:
            recoveries = int(rec.get("recovery_count") or 0)
            if recoveries != run.backend_state.get("recoveries") or rec.get("status") != run.backend_state.get("job_status"):
                run.update(backend_state={**run.backend_state, "recoveries": recoveries, "job_status": rec.get("status")})
        return rec

    def follow(self, run: Run, on_event: EventCallback) -> int:
        """Every job event once, in order, across relaunches and re-attaches.

        SkyPilot's managed-job log follows the job onto each new machine, but a reconnect starts at the
        launch running then (the earlier machines' logs are gone with them), so lines can't be counted
        as the sky backend does. Events are told apart by (kind, ts) instead: the ones already recorded
        in runs/<id>/events.jsonl are handed over first (the lifecycle's recorder skips exactly those),
        then each new one once."""
        job_id = self._job_id(run)
        if job_id is None:
            raise BackendError("provisioning", "the managed job was never submitted (no request id)")
        seen: set[tuple] = set()
        if run.events_path.is_file():
            for ev in read_record(run.events_path):
                if ev.get("event") != "phase":
                    seen.add(_key(ev))
                    on_event(ev)
        failures, lost_since, recoveries = 0, None, run.backend_state.get("recoveries") or 0
        furthest = 0  # lines into the stream the furthest tail got
        while True:
            try:
                with open(run.log_path, "a", encoding="utf-8", errors="replace") as log:
                    for index, line in enumerate(self.adapter.jobs_tail(job_id), 1):
                        # Only progress resets the outage window: a line past the furthest one yet (below), or a
                        # new event. Each reconnect replays the launch's lines: those alone must not keep a
                        # failing stream (or a SUCCEEDED job's) in this loop forever.
                        if index > furthest:
                            furthest, failures, lost_since = index, 0, None
                        ev = parse_line(line)
                        if ev is not None and _key(ev) in seen:
                            continue
                        log.write(redact(line) + "\n")
                        log.flush()
                        if ev is not None:
                            failures, lost_since = 0, None
                            seen.add(_key(ev))
                            if ev.get("event") == "preempted":
                                self.on_phase("recovering", f"launch {ev.get('launch')} on a new machine")
                            on_event(ev)
                rec = self._record(run, refresh=True)  # a stopped (idle) controller is started to answer
                status = (rec or {}).get("status")
                if status == SUCCEEDED:
                    return 0
                if status is not None and status not in LIVE:
                    return 1
                if rec is None:
                    raise BackendError("running", f"managed job {job_id} is not known to SkyPilot's controller")
                error = "the log stream ended while the job was still running"
            except BackendError:
                raise
            except Exception as e:  # noqa: BLE001  (a dropped stream is retried, whatever raised it)
                error = f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):  # an unreachable controller during an outage is no answer
                rec = self._record(run)
                now = int((rec or {}).get("recovery_count") or 0)
                if now > recoveries:
                    recoveries = now
                    self.on_phase("recovering", f"SkyPilot relaunched the job ({now} recover{'y' if now == 1 else 'ies'})")
            failures, lost_since = self._lost(failures, lost_since, error, "the managed job's log stream")

    def download(self, run: Run, dest: Path) -> None:
        """The job's out/ from the bucket (checkpoints left there); the caller verifies it."""
        self._pull(run, dest)

    WEIGHTS_OUTLIVE = "the run's bucket (kept after the download)"

    def download_leaving(self, run: Run, dest: Path, leave) -> str:
        """out/ from the bucket except the weights `leave` names: the bucket's listing is checked for them
        (present, the manifest's size); they stay in it, and the bucket is kept (plan: --weights leave)."""
        bucket = self._pull(run, dest, leave)
        return f"{bucket.mount_source}/{bucket.out_prefix(run.id)}model/"

    def _pull(self, run: Run, dest: Path, leave=None) -> Bucket:
        try:
            bucket = Bucket.from_url(run.backend_state["bucket"])
            # The resume folder lives beside the staging folder the caller wipes before each attempt
            # (runs/<id>/.bucket-partial, a reserved name): a retried or later download resumes there.
            bucket.download(bucket.out_prefix(run.id), dest, leave=leave, partial_dir=Path(run.dir) / PARTIAL_DIR)
        except Exception as e:  # noqa: BLE001
            raise failed(e, "downloading") from None
        return bucket

    def down(self, run: Run) -> None:
        """Cancel the managed job (SkyPilot's controller ends its machine). The bucket is deleted once
        the results were verified here, unless --keep-bucket; before that it is the only copy and
        stays (status and `down` say where)."""
        job_id = None
        if (run.backend_state.get("request_id") or run.backend_state.get("job_id")) \
                and not run.backend_state.get("launch_failed"):
            try:
                job_id = self._job_id(run)
            except BackendError as e:
                if not isinstance(e.__context__, LaunchRequestFailed):
                    raise
                # The launch request itself failed: there is no job to cancel; the bucket is still dealt with.
                run.update(backend_state={**run.backend_state, "launch_failed": True})
        if job_id is not None:
            rec = self.adapter.jobs_queue(job_id)
            if rec is not None and rec.get("status") in LIVE:
                # run.json is untrusted: only a job that is this run's (by its name) is cancelled.
                if rec.get("job_name") != job_name_for(run.id):
                    raise BackendError("tearing down", redact(
                        f"managed job {job_id} is named {rec.get('job_name')!r}, not this run's "
                        f"{job_name_for(run.id)!r}: not cancelled (run.json names another job; see `sky jobs queue`)"))
                self.adapter.jobs_cancel(job_id)
        url = run.backend_state.get("bucket")
        if not url or run.backend_state.get("bucket_deleted"):
            return
        if self.delete_bucket or (run.verified and not _kept(run) and not run.weights_left):
            # The bucket made for the run goes (once its owner marker says it is this run's); of any other
            # bucket, only the run's folder.
            bucket = Bucket.from_url(_deletable(run))
            if _made_for(run) and bucket.exists() and \
                    not bucket.owned_by(run.id, str(run.backend_state.get("bucket_token") or "")):
                raise BackendError("tearing down", f"the bucket {bucket.url} does not carry run {run.id}'s owner "
                                                   f"marker (made by another run, or before markers existed): not "
                                                   f"deleted; delete it yourself if it is yours")
            bucket.delete()
            run.update(backend_state={**run.backend_state, "bucket_deleted": True})
        else:
            run.update(backend_state={**run.backend_state, "bucket_kept": True})

    def set_delete_bucket(self, run: Run) -> None:
        self.delete_bucket = True

    def bucket_left(self, run: Run) -> str | None:
        """What `down` prints when the run's bucket (or its folder in a bucket the user gave) stays:
        where it is, why, and the command that deletes it (it bills storage until then)."""
        url = run.backend_state.get("bucket")
        if not url or run.backend_state.get("bucket_deleted") or not run.backend_state.get("bucket_kept"):
            return None
        where = _deletable(run) + ("" if _made_for(run) else "/")
        why = ("--keep-bucket" if _kept(run) and run.verified else
               "nothing was downloaded and verified here: it may hold the only copy of the run's results")
        return (f"the bucket {where} is KEPT ({why}); it bills storage until deleted. "
                f"Pull the results: socrates-launch download {run.id}. "
                f"Delete it: socrates-launch down {run.id} --delete-bucket")

    def detach(self, run: Run) -> str:
        return ("SkyPilot's managed-jobs controller keeps it running, relaunches it after a preemption and ends "
                f"its machine when it ends; its results stay in {run.backend_state.get('bucket')} for `logs` or "
                "`download` to pull back.")

    def left_up_ends_by(self, run: Run) -> str | None:
        return (f"the managed job has ended its machine; its results stay in the bucket "
                f"{run.backend_state.get('bucket')} until they are downloaded")

    # --- finding it again (from run.json, after the launcher was killed) ---------------------

    def machine_state(self, run: Run) -> str:
        """'up' while the managed job is live (a machine bills or will), and while its results wait in
        the bucket to be pulled back (the job succeeded, nothing verified here yet, the bucket kept);
        'gone' otherwise."""
        if run.backend_state.get("job_id") is None and not run.backend_state.get("request_id"):
            return "gone"
        rec = self._record(run)
        status = (rec or {}).get("status")
        if status in LIVE:
            return "up"
        if status == SUCCEEDED and not run.verified and not run.backend_state.get("bucket_deleted"):
            return "up"  # (also after `down` kept the bucket: `download`/`logs` still pull from it)
        return "gone"

    def job_running(self, run: Run) -> bool | None:
        try:
            rec = self._record(run)
        except Exception:  # noqa: BLE001
            return None
        return None if rec is None else rec.get("status") in LIVE

    def handles(self, run: Run) -> dict:
        """What status shows: the managed job, its state and recovery count, the bucket."""
        shown = {k: run.backend_state[k] for k in ("job_id", "bucket") if run.backend_state.get(k) is not None}
        try:
            rec = self._record(run)
        except Exception:  # noqa: BLE001  (status still shows what the record holds)
            rec = None
        if rec is not None:
            shown.update(job=rec.get("status"), recoveries=rec.get("recovery_count", 0))
        elif run.backend_state.get("job_status"):
            shown.update(job=f"{run.backend_state['job_status']} (as last seen)",
                         recoveries=run.backend_state.get("recoveries", 0))
        if run.backend_state.get("bucket_deleted"):
            shown["bucket"] = f"{run.backend_state.get('bucket')} (deleted)"
        return shown

    @classmethod
    def end_by_hand(cls, handles: dict) -> str | None:
        job_id = handles.get("job_id")
        if isinstance(job_id, int) and handles.get("job_name"):
            return f"it names SkyPilot managed job {job_id}: `sky jobs cancel {job_id}` ends it if it still runs"
        return None


def _made_for(run: Run) -> bool:
    """The record's bucket counts as made for the run only when it is the name the launcher gives
    one (`socrates-<run id>`): an edited run.json naming any other bucket never gets it deleted whole."""
    url = (run.backend_state.get("bucket") or "").rstrip("/")
    if not run.backend_state.get("bucket_made"):
        return False
    try:
        return url == default_url(run.id, parse_url(url)[0])
    except ContractError:
        return False


def _kept(run: Run) -> bool:
    """--keep-bucket (the config's storage.keep_bucket): the bucket stays after the verified download."""
    return bool((run.config.get("storage") or {}).get("keep_bucket"))


def _deletable(run: Run) -> str:
    """What `down` may delete of the run's bucket: all of it if made for the run, else `URL/<run id>`."""
    url = (run.backend_state.get("bucket") or "").rstrip("/")
    return url if _made_for(run) else f"{url}/{run.id}"


def _key(ev: dict) -> tuple:
    """What tells one event from another across reconnects (hashable whatever the job sent as `step`)."""
    step = ev.get("step")
    return (ev.get("event"), ev.get("ts"), step if is_int(step) else None)
