"""The SkyPilot backend: launch with autodown armed, stream, pull out/ back, tear down; and the part
it shares with the managed-jobs backend (SkyPilotBackend: the adapter, the preflight, the launch).

Every SDK call goes through the adapter (launcher/sky_adapter.py). The cluster name is saved in run.json
before anything is asked of SkyPilot, and the launch request id as soon as it exists, so a launcher
killed at any instant leaves a run that `status` can reconcile and `down` can end.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from contracts.config import RunConfig
from contracts.errors import ContractError
from contracts.events import parse_line
from launcher import stage as stagelib
from launcher import task as tasklib
from launcher.backends.base import Backend, BackendError, EventCallback, StreamLost, reconnect_policy
from launcher.registry import Run
from launcher.secrets import collect as collect_secrets
from launcher.secrets import plain, redact
from launcher.sky_adapter import NO_CLOUD, NoCloudEnabled, SkyAdapter

# Idle minutes after the job ends before SkyPilot downs the machine by itself: time to download.
AUTODOWN_IDLE_MIN = 15
DOWN_ATTEMPTS = 3
DOWN_RETRY_S = 1.0
REMOTE_OUT = "~/sky_workdir/out"  # SkyPilot syncs the workdir there; the run block writes out/
# Clues in SkyPilot's launch log that a new lifecycle phase began (for the progress lines).
_PHASE_CLUES = (("Syncing", "syncing"), ("Running setup", "installing"))


def cluster_name_for(run_id: str) -> str:
    """SkyPilot cluster names: lowercase letters, digits and dashes, starting with a letter, at most
    50 here. One run, one cluster: a name cut to fit keeps a hash of the whole run id, since two runs
    whose ids share the first 50 characters would otherwise share (and tear down) one cluster."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"socrates-{run_id}".lower()).strip("-")
    if len(name) <= 50:
        return name
    return f"{name[:41].rstrip('-')}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def failed(e: Exception, phase: str | None = None) -> BackendError:
    """A SkyPilot call's exception as the one-line BackendError of its lifecycle step (secrets redacted):
    `phase`, else the one the adapter's own exceptions say, else the one the exception's name suggests."""
    name = type(e).__name__
    phase = phase or getattr(e, "phase", None) or (
        "installing" if "SetUp" in name or "Setup" in name else
        "syncing" if "Sync" in name or "rsync" in str(e).lower() else "provisioning")
    return BackendError(phase, redact(f"{name}: {e}"))


class SkyPilotBackend(Backend):
    """What the sky and managed backends share: the adapter seam, the preflight, the launch (the task
    rendered and recorded, then submitted), the backoff of a lost log stream."""

    def __init__(self, adapter: Any = None, reconnect: tuple[float, float, float] | None = None):
        if adapter is None and (spec := os.environ.get("SOCRATES_SKY_ADAPTER")):  # module:attr, a fake (tests)
            module, _, attr = spec.partition(":")
            adapter = getattr(importlib.import_module(module), attr)()
        self.adapter = adapter if adapter is not None else SkyAdapter()
        # first wait, longest wait, how long a lost stream is retried before detaching (never a teardown)
        self.reconnect_wait_s, self.reconnect_max_wait_s, self.reconnect_window_s = reconnect or reconnect_policy()

    def preflight(self, cfg: RunConfig) -> None:
        """No cloud with working credentials: one line, exit 2, before a run exists."""
        if not self.adapter.enabled_clouds():
            raise ContractError(NO_CLOUD)

    def launch_submitted(self, run: Run) -> bool:
        return bool(run.backend_state.get("request_id"))

    def _submit(self, run: Run, submit: Callable, bucket_url: str | None = None,
                on_line: Callable[[str], None] | None = None) -> None:
        """Render the run's task (a managed one where `bucket_url`), record it in runs/<id>/task.yaml, and
        `submit(task, secrets, on_request_id)`; SkyPilot's lines go to launch.log (and `on_line`), the
        request id and the job id into backend_state as soon as each exists."""
        secrets = collect_secrets()
        task = tasklib.render(run, gpu=run.gpu, cloud=run.options.cloud, spot=run.options.spot,
                              data_path=tasklib.local_data(run.config), secret_names=tuple(secrets),
                              managed=bucket_url is not None, bucket_url=bucket_url,
                              workdir=stagelib.for_run(run).path)
        (run.dir / "task.yaml").write_text(tasklib.to_yaml(task), encoding="utf-8")

        def log(line: str) -> None:
            with open(run.dir / "launch.log", "a", encoding="utf-8") as f:
                f.write(redact(line) + "\n")
            if on_line is not None:
                on_line(line)

        if hasattr(self.adapter, "log"):
            self.adapter.log = log
        try:
            job_id = submit(task, secrets,
                            lambda rid: run.update(backend_state={**run.backend_state, "request_id": rid}))
        except Exception as e:  # noqa: BLE001  (SkyPilot raises many kinds; each is a failed launch)
            raise failed(e) from None
        run.update(backend_state={**run.backend_state, "job_id": job_id})

    def _launched_job(self, run: Run, wait: Callable[[str], Any]) -> Any:
        """The job id the launch got; where a launcher was killed before it came back, `wait(request id)`
        for it (and record it). None: the launch was never submitted."""
        job_id, request = run.backend_state.get("job_id"), run.backend_state.get("request_id")
        if job_id is None and request:
            try:
                job_id = wait(request)
            except Exception as e:  # noqa: BLE001
                raise failed(e) from None
            run.update(backend_state={**run.backend_state, "job_id": job_id})
        return job_id

    def _lost(self, failures: int, lost_since: float | None, error: str,
              what: str = "the log stream") -> tuple[int, float]:
        """A dropped stream: StreamLost once it has been lost for the whole window (the caller detaches;
        the job is not known to have failed), else say so and wait (backing off) before the next try.
        Returns the failures and since when the stream is lost, counting this one."""
        failures, lost_since = failures + 1, lost_since or time.time()
        lost_for = time.time() - lost_since
        if lost_for >= self.reconnect_window_s:
            raise StreamLost("running", redact(f"lost {what} for {lost_for:.0f} s ({failures} tries; last: {error})"))
        self.on_phase("reconnecting", redact(error))
        time.sleep(min(self.reconnect_wait_s * 2 ** min(failures - 1, 16), self.reconnect_max_wait_s,
                       max(0.0, self.reconnect_window_s - lost_for)))
        return failures, lost_since


class SkyBackend(SkyPilotBackend):
    name = "sky"
    HANDLES = ("cluster", "request_id", "job_id")

    def __init__(self, adapter: Any = None, idle_minutes: int = AUTODOWN_IDLE_MIN,
                 reconnect: tuple[float, float, float] | None = None):
        super().__init__(adapter, reconnect)
        self.idle_minutes = idle_minutes

    # --- before a run exists --------------------------------------------------------------

    def dryrun(self, task: dict, plan: Any, console: Any) -> int:
        """SkyPilot's optimizer and dry run pick the offer for the rendered task; nothing is provisioned."""
        from rich.text import Text  # rich only when shown: keeps --help light

        self.adapter.log = lambda line: console.print(Text.from_ansi(redact(line)), highlight=False)  # SkyPilot's colours
        console.print("SkyPilot's dry run: its optimizer picks the offer (the first call starts SkyPilot's API server)",
                      highlight=False)
        code = 0
        try:
            offer = self.adapter.dryrun(task, cluster_name=cluster_name_for(f"{plan.name}-dryrun"),
                                        secrets=collect_secrets())
        except NoCloudEnabled as e:  # the task and the catalog's offers (above) are still worth seeing
            console.print(str(e), highlight=False, markup=False)
        except Exception as e:  # noqa: BLE001 - SkyPilot's own failure: one plain line, not its traceback
            text = plain(str(e)).strip()
            first = text.splitlines()[0] if text else ""
            console.print(f"SkyPilot's dry run failed ({type(e).__name__}): {redact(first)[:300]}", highlight=False,
                          markup=False)
            code = 1
        else:
            console.print(f"chosen: cloud {offer['cloud']}, region {offer.get('region')}, instance {offer['instance']}, "
                          f"{offer['accelerators']}, ${offer['price_per_hour']:.2f}/h"
                          f"{' (spot)' if offer.get('spot') else ''}", highlight=False)
        console.print("dry run: nothing was provisioned")
        return code

    # --- lifecycle ---------------------------------------------------------------------------

    def left_up_ends_by(self, run: Run) -> str | None:
        return (f"SkyPilot's autodown ends it {self.idle_minutes} min after the job ended, and deletes the "
                "results with it")

    def detach(self, run: Run) -> str:
        return (f"SkyPilot's autodown ends its machine {self.idle_minutes} min after the job ends; "
                "`logs` before then pulls the results back.")

    @classmethod
    def end_by_hand(cls, handles: dict) -> str | None:
        cluster = handles.get("cluster")
        if isinstance(cluster, str) and cluster:
            return f"it names SkyPilot cluster {cluster!r}: `sky down {cluster}` ends it if it is still up"
        return None

    def launch(self, run: Run) -> None:
        cluster = cluster_name_for(run.id)
        # Saved before SkyPilot is asked for anything: `down` can always find it.
        run.update(backend_state={"cluster": cluster}, machine="up")
        seen_phases: set[str] = set()

        def phases(line: str) -> None:
            for clue, phase in _PHASE_CLUES:
                if clue in line and phase not in seen_phases:
                    seen_phases.add(phase)
                    self.on_phase(phase)

        self._submit(run, lambda task, secrets, on_request_id: self.adapter.launch(
            task, cluster, secrets, self.idle_minutes, on_request_id=on_request_id), on_line=phases)

    def follow(self, run: Run, on_event: EventCallback) -> int:
        """Stream the job's log; on a dropped stream reconnect and skip what was already seen."""
        cluster = self._cluster(run)
        job_id = self._launched_job(run, lambda request: self.adapter.wait_launch(request))
        if job_id is None:
            raise BackendError("provisioning", "the launch was never submitted (no request id)")
        seen, failures, lost_since = 0, 0, None
        while True:
            index = 0
            try:
                with open(run.log_path, "a", encoding="utf-8", errors="replace") as log:
                    for line in self.adapter.tail(cluster, job_id):
                        index += 1
                        if index <= seen:
                            continue
                        seen = index
                        failures, lost_since = 0, None
                        log.write(redact(line) + "\n")
                        log.flush()
                        ev = parse_line(line)
                        if ev is not None:
                            on_event(ev)
                code = self.adapter.job_exit_code(cluster, job_id)
                if code is not None:
                    return code
                error = "the log stream ended while the job was still running"
            except Exception as e:  # noqa: BLE001  (a dropped stream is retried, whatever raised it)
                error = f"{type(e).__name__}: {e}"
            try:  # only a definite 'gone' counts: an API that can't be reached during an outage is no answer
                gone = self.adapter.cluster_state(cluster) == "gone"
            except Exception:  # noqa: BLE001
                gone = False
            if gone:  # no machine, no job: that is a failure, not an outage
                raise BackendError("running", redact(f"the cluster {cluster} is gone ({error})"))
            failures, lost_since = self._lost(failures, lost_since, error)

    def job_running(self, run: Run) -> bool | None:
        cluster, job_id = self._cluster(run), run.backend_state.get("job_id")
        if not cluster or job_id is None:
            return None
        try:
            if self.adapter.cluster_state(cluster) != "up":
                return False
            return self.adapter.job_exit_code(cluster, job_id) is None
        except Exception:  # noqa: BLE001
            return None

    def download(self, run: Run, dest: Path) -> None:
        try:
            self.adapter.rsync_down(self._cluster(run), REMOTE_OUT, dest)
        except Exception as e:  # noqa: BLE001
            raise failed(e, "downloading") from None

    def _cluster(self, run: Run) -> str | None:
        """The run's cluster: only ever the name derived from its id (run.json is not the authority)."""
        recorded = run.backend_state.get("cluster")
        if recorded is None:
            return None
        derived = cluster_name_for(run.id)
        if recorded != derived:
            raise BackendError("down", f"run.json names cluster {recorded!r}, but run {run.id}'s cluster is "
                                       f"{derived!r}: refusing to act on a cluster this run did not make")
        return derived

    def down(self, run: Run) -> None:
        cluster = self._cluster(run)
        request = run.backend_state.get("request_id")
        if request and run.backend_state.get("job_id") is None:
            # run.json's request id is not the authority: only a request SkyPilot ties to this run's cluster
            tied = self.adapter.request_cluster(request)
            if cluster and tied == cluster:
                self.adapter.cancel(request)
            elif tied is not None:
                raise BackendError("down", f"run.json names launch request {request!r}, which SkyPilot ties to "
                                           f"cluster {tied!r}, not this run's {cluster!r}: not cancelled")
        if not cluster:
            return
        # A cluster mid-provisioning can refuse a first `down` (locked); a few tries before giving up loudly.
        for attempt in range(1, DOWN_ATTEMPTS + 1):
            try:
                self.adapter.down(cluster)
                return
            except Exception:  # noqa: BLE001
                if attempt == DOWN_ATTEMPTS:
                    raise
                time.sleep(DOWN_RETRY_S * attempt)

    def machine_state(self, run: Run) -> str:
        cluster = self._cluster(run)
        if not cluster:
            return "gone"
        state = self.adapter.cluster_state(cluster)
        request = run.backend_state.get("request_id")
        if state == "gone" and request and run.backend_state.get("job_id") is None and \
                self.adapter.request_in_flight(request):
            return "up"  # a launch request still queued on the API server will make (and bill) the machine
        return state

