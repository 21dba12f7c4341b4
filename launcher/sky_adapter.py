"""The only module that imports SkyPilot (`sky`), lazily, inside each call.

A thin layer over the 0.14 SDK that the sky and managed backends drive; tests swap in a fake with
the same methods to inject faults. What SkyPilot prints itself is `captured`, never shown raw. A local
API server this process started is stopped when the command ends (`stop_server_if_started`, from cli).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from contracts.remote import MAX_LINE, Lines

# Job states that mean the run block ended -> the exit status each maps to.
_ENDED = {"SUCCEEDED": 0, "FAILED": 1, "FAILED_SETUP": 1, "FAILED_DRIVER": 1, "CANCELLED": 1}
_IN_FLIGHT = ("PENDING", "WAITING", "RUNNING")  # API server request states before it ends
RSYNC_CEILING_S = 3600  # out/ without checkpoints/ is adapters + eval files: minutes even on a slow link


NO_CLOUD = "no cloud is enabled: set one up with `sky check`"


class NoCloudEnabled(RuntimeError):
    """SkyPilot has no cloud with working credentials (`sky check` enables them)."""

    def __init__(self):
        super().__init__(NO_CLOUD)


# Whether this process started SkyPilot's local API server (stop_server_if_started ends it).
SERVER = {"started": False}
SERVER_SETTLE_S = 10.0
_SKY_NOISE = ("<sky-payload>", "rich_init", "rich_update", "rich_start", "rich_exit")


@contextlib.contextmanager
def captured(lines: list[str] | None = None) -> Iterator[None]:
    """Everything SkyPilot prints (to Python's streams or straight to fd 1/2) while the block runs
    is captured, never shown raw: its rich-markup payloads are dropped, the facts the launcher needs
    are read out (catalog fetch failures, a local API server being started), and the other lines
    are appended to `lines` for the caller to render or drop."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = (os.dup(1), os.dup(2))
        try:
            for fd in (1, 2):
                os.dup2(tmp.fileno(), fd)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            kept = digest(tmp.read().decode("utf-8", errors="replace"))
            if lines is not None:
                lines.extend(kept)


_FETCH_FAILED = re.compile(r"Failed to fetch (\S+) catalog (\S+?)\.? (Using cached|Please check)")


def digest(text: str) -> list[str]:
    """SkyPilot's captured output -> the lines worth keeping (see `captured`)."""
    kept = []
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        if not line.strip() or any(n in line for n in _SKY_NOISE):
            continue
        if m := _FETCH_FAILED.search(line):
            cloud = m.group(1).lower()
            if m.group(3) == "Using cached":
                CATALOG_STALE.setdefault(cloud, _CATALOG_MTIME.get(cloud))
            else:
                CATALOG_UNFETCHED[cloud] = m.group(2)
            continue
        if "Starting a local server" in line:
            SERVER["started"] = True
        elif "API server started" not in line and "API server stopped" not in line:
            kept.append(raw)
    return kept


def sky_command() -> str:
    """How to run SkyPilot's CLI from here: `sky` when it is on PATH, else the venv's own."""
    return "sky" if shutil.which("sky") else str(Path(sys.executable).parent / "sky")


def stop_server_if_started(say: Callable[[str], None]) -> None:
    """Stop SkyPilot's local API server if this process started it and no other request is in
    flight on it; else say once that it is left running and how to stop it."""
    if not SERVER["started"]:
        return
    SERVER["started"] = False
    import sky

    try:
        with captured():
            deadline = time.monotonic() + SERVER_SETTLE_S  # our own last request may still be closing
            while True:
                busy = [r for r in sky.api_status() if _status_name(getattr(r, "status", "")) in _IN_FLIGHT
                        and getattr(r, "entrypoint", None) != "run_event"]  # not its daemons
                if not busy or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if not busy:
                sky.api_stop()
                return
    except Exception as e:  # noqa: BLE001 - never hide that a server may be left running
        say(f"SkyPilot's API server (started by this command) may still be running ({type(e).__name__}); "
            f"stop it with `{sky_command()} api stop`")
        return
    names = ", ".join(sorted({str(getattr(r, "name", "?")) for r in busy}))
    say(f"SkyPilot's API server (started by this command) is left running: {len(busy)} other request(s) use it "
        f"({names}); stop it with `{sky_command()} api stop`")


class SkyAdapter:
    """Each method is one SDK call (or a short sequence); errors surface as the SDK raises them."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self.log = log or (lambda line: None)

    def enabled_clouds(self) -> list[str]:
        """The clouds SkyPilot may launch on (credentials checked by `sky check`); starts the local
        API server if none runs (stop_server_if_started ends it). A credential check the server
        runs when it boots is waited for first, so a fresh server does not answer "none"."""
        import sky

        with captured():
            for req in sky.api_status():
                if "check" in str(getattr(req, "name", "")):
                    with contextlib.suppress(Exception):  # a failed check leaves clouds disabled: asked below
                        sky.get(req.request_id)
            from sky.client import sdk

            return [str(c) for c in sky.get(sdk.enabled_clouds())]

    def launch(self, task_config: dict, cluster_name: str, secrets: dict[str, str], idle_minutes: int,
               on_request_id: Callable[[str], None]) -> int:
        """Provision, sync and start the run block; returns the job id once it is submitted. Autodown is
        armed (down=True + idle autostop) before the run starts, so a machine whose launcher vanished
        still ends itself after the job, plus `idle_minutes` to download."""
        import sky

        task = sky.Task.from_yaml_config(task_config, secrets_overrides=list(secrets.items()) or None)
        request_id = sky.launch(task, cluster_name=cluster_name, idle_minutes_to_autostop=idle_minutes, down=True)
        on_request_id(str(request_id))
        job_id, _handle = sky.stream_and_get(request_id, output_stream=_LineSink(self.log))
        return _first_job_id(job_id, f"SkyPilot's launch of cluster {cluster_name}")

    def wait_launch(self, request_id: str) -> int:
        """The job id of a launch request made earlier (by a launcher that was since killed)."""
        import sky

        job_id, _handle = sky.get(request_id)
        return _first_job_id(job_id, f"launch request {request_id}")

    def request_in_flight(self, request_id: str) -> bool:
        """Whether a launch request is still queued or running on the API server (it may yet make a
        cluster that SkyPilot's status does not list)."""
        import sky

        records = sky.api_status([request_id])
        return any(_status_name(getattr(r, "status", "")) in _IN_FLIGHT for r in records)

    def request_cluster(self, request_id: str) -> str | None:
        """The cluster a request acts on, as SkyPilot's request record names it (None: no record, no answer)."""
        name = _field(_request_record(request_id), "cluster_name")
        return str(name) if name else None

    def cancel(self, request_id: str) -> None:
        """Cancel a launch request still in flight (provisioning continues server-side otherwise)."""
        import sky

        with contextlib.suppress(Exception):  # a finished request can't be cancelled; down follows anyway
            sky.api_cancel(request_id, silent=True)

    def tail(self, cluster_name: str, job_id: int) -> Iterator[str]:
        """The job's log lines from the start, following until the job ends."""
        import sky

        return join_lines(sky.tail_logs(cluster_name, job_id, follow=True, preload_content=False))

    def job_exit_code(self, cluster_name: str, job_id: int) -> int | None:
        """0 / 1 once the job ended (SUCCEEDED / failed or cancelled), None while it runs."""
        import sky

        statuses = sky.get(sky.job_status(cluster_name, [job_id]))
        status = statuses.get(job_id) or statuses.get(str(job_id))
        return _ENDED.get(getattr(status, "name", str(status) if status else None))

    def cluster_state(self, cluster_name: str) -> str:
        """'up' if SkyPilot has the cluster (any status), 'gone' if not, refreshed from the cloud."""
        import sky
        from sky.utils import common

        records = sky.get(sky.status([cluster_name], refresh=common.StatusRefreshMode.AUTO))
        return "up" if any(_field(r, "name") == cluster_name for r in records) else "gone"

    def rsync_down(self, cluster_name: str, remote_dir: str, local_dir: Path) -> None:
        """rsync through the SSH alias SkyPilot writes for the cluster (~/.sky/generated/ssh)."""
        local_dir.mkdir(parents=True, exist_ok=True)
        # A dead link must fail (and be retried), not hang: ssh keepalives end a silent connection in
        # ~1 min, rsync's --timeout ends a stalled transfer, and the whole pull has a ceiling.
        ssh = "ssh -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4"
        # -rt, not -a: symlinks, devices and special files are never copied (what comes back is untrusted).
        cmd = ["rsync", "-rtz", "--partial", "--timeout=120", "--exclude", "checkpoints/", "-e", ssh,
               f"{cluster_name}:{remote_dir.rstrip('/')}/", f"{local_dir}/"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RSYNC_CEILING_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"rsync from {cluster_name}:{remote_dir} did not finish in {RSYNC_CEILING_S} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"rsync from {cluster_name}:{remote_dir} failed ({proc.returncode}): "
                               f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")

    def down(self, cluster_name: str) -> None:
        """Terminate the cluster; a cluster that no longer exists counts as down."""
        import sky

        with contextlib.suppress(sky.exceptions.ClusterDoesNotExist):
            sky.get(sky.down(cluster_name))

    # --- managed jobs (sky.jobs): SkyPilot's controller relaunches the job after a preemption ------

    def jobs_launch(self, task_config: dict, name: str, secrets: dict[str, str],
                    on_request_id: Callable[[str], None]) -> int:
        """Submit the task as a managed job (its `resources.job_recovery` says how a preemption is
        recovered); returns the managed job id. The machine is the controller's to start, relaunch and
        end: nothing here is left running when the job ends, however it ends."""
        import sky

        task = sky.Task.from_yaml_config(task_config, secrets_overrides=list(secrets.items()) or None)
        request_id = sky.jobs.launch(task, name=name)
        on_request_id(str(request_id))
        job_ids, _handle = sky.stream_and_get(request_id, output_stream=_LineSink(self.log))
        return _first_job_id(job_ids, f"SkyPilot's launch of {name}")

    def wait_jobs_launch(self, request_id: str) -> int:
        """The managed job id of a launch request made by a launcher that was since killed."""
        import sky

        try:
            job_ids, _handle = sky.get(request_id)
        except Exception:
            # The request's own failure (SkyPilot's request record says FAILED/CANCELLED) made no job;
            # anything else (an unreachable API server) is raised as it is: the job may exist.
            if _status_name(_field(_request_record(request_id), "status")) in ("FAILED", "CANCELLED"):
                raise LaunchRequestFailed(f"managed-job launch request {request_id} failed: it made no job") from None
            raise
        return _first_job_id(job_ids, f"managed-job launch request {request_id}")

    def jobs_queue(self, job_id: int, refresh: bool = False) -> dict | None:
        """The managed job's record: status (a ManagedJobStatus name), recovery_count, submitted_at,
        end_at, job_duration; None when the controller has no such job. The jobs controller stops
        itself when idle: `refresh` starts it again to answer (following a run to its end does;
        `status` does not, and an unreachable controller is then 'unknown')."""
        import sky

        with captured():
            reply = sky.get(sky.jobs.queue_v2(refresh=refresh, all_users=False, job_ids=[int(job_id)]))
        records = reply[0] if isinstance(reply, tuple) else reply
        for r in records or []:
            if int(_field(r, "job_id") or -1) == int(job_id):
                return {"status": _status_name(_field(r, "status")),
                        "job_name": _field(r, "job_name"),
                        "recovery_count": int(_field(r, "recovery_count") or 0),
                        "submitted_at": _field(r, "submitted_at"), "end_at": _field(r, "end_at"),
                        "job_duration": _field(r, "job_duration")}
        return None

    def jobs_tail(self, job_id: int) -> Iterator[str]:
        """The managed job's log lines, following across its relaunches until it ends."""
        import sky

        return join_lines(sky.jobs.tail_logs(job_id=int(job_id), follow=True, preload_content=False))

    def jobs_cancel(self, job_id: int) -> None:
        """Cancel the managed job: the controller ends its machine (graceful: MOUNT_CACHED writes are
        uploaded to the bucket first)."""
        import sky

        with captured():
            sky.get(sky.jobs.cancel(job_ids=[int(job_id)], graceful=True, graceful_timeout=300))

    def dryrun(self, task_config: dict, cluster_name: str, secrets: dict[str, str] | None = None) -> dict:
        """SkyPilot's own dry-run launch: its optimizer picks the offer; nothing is provisioned. The server
        keeps the optimized plan to itself (the optimize request returns no value), so the chosen row is
        read from the optimizer's "Considered resources" table in the request log."""
        import sky

        task = sky.Task.from_yaml_config(task_config, secrets_overrides=list((secrets or {}).items()) or None)
        lines: list[str] = []
        try:
            with captured():
                request_id = sky.launch(task, cluster_name=cluster_name, dryrun=True, down=True,
                                        idle_minutes_to_autostop=10)
                sky.stream_and_get(request_id, output_stream=_LineSink(lines.append))
        except sky.exceptions.NoCloudAccessError:
            raise NoCloudEnabled() from None
        for line in lines:
            self.log(line)
        return parse_chosen(lines)


class _LineSink(io.TextIOBase):
    """A text stream that hands SkyPilot's request log to a callback line by line."""

    def __init__(self, log: Callable[[str], None]):
        self._log = log
        self._lines = Lines(cut=True)  # linear and bounded, like join_lines

    def write(self, s: str) -> int:
        for line in self._lines.feed(s):
            self._log(line)
        return len(s)


def join_lines(chunks: Iterator[str | None], limit: int | None = None) -> Iterator[str]:
    """Whole lines from the SDK's log chunks (None marks the end): a line split across chunks is joined
    before anyone parses it; a partial last line is kept only when the stream ended cleanly, so a
    reconnect (which counts lines) loses nothing. Linear and bounded: a line over remote.MAX_LINE is cut
    there (still one line; events.parse_line refuses it), never held or re-split whole."""
    lines = Lines(limit or MAX_LINE, cut=True)
    for chunk in chunks:
        if chunk is None:
            yield from (line.rstrip("\r") for line in lines.end())
            return
        yield from (line.rstrip("\r") for line in lines.feed(chunk))


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def parse_chosen(lines: list[str]) -> dict:
    """The row marked CHOSEN in the optimizer's table: cloud, region, instance, GPUs, $/h."""
    clean = [_ANSI.sub("", ln).rstrip() for ln in lines]
    header_at = next((i for i, ln in enumerate(clean) if "INFRA" in ln and "CHOSEN" in ln), None)
    if header_at is None:
        raise RuntimeError("SkyPilot's dry run printed no optimizer table")
    header = clean[header_at]
    names = re.findall(r"\S+(?: \(\$\))?", header)
    starts = [header.index(n) for n in names]
    for row in clean[header_at + 1:]:
        if "\u2714" not in row:
            continue
        cells = {n: row[a:b].strip() for n, a, b in zip(names, starts, starts[1:] + [len(row) + 1])}
        infra = cells.get("INFRA", "")
        cloud, _, region = infra.partition(" (")
        return {"cloud": cloud.strip(), "region": region.rstrip(")") or None, "instance": cells.get("INSTANCE"),
                "accelerators": cells.get("GPUS"), "price_per_hour": float(cells.get("COST ($)", "nan")),
                "spot": "[spot]" in row.lower() or "spot" in cells.get("INSTANCE", "").lower()}
    raise RuntimeError("SkyPilot's optimizer table has no CHOSEN row")


class LaunchRequestFailed(RuntimeError):
    """`wait_jobs_launch`: the managed-job launch request itself failed or was cancelled: there is no job."""


def _request_record(request_id: str) -> Any:
    """SkyPilot's record of a request; None: no such record, or no answer (no proof of anything)."""
    import sky

    try:
        with captured():
            payloads = sky.api_status(request_ids=[request_id])
    except Exception:  # noqa: BLE001
        return None
    return next((p for p in payloads or [] if str(_field(p, "request_id") or "") == str(request_id)), None)


def _field(record: Any, name: str) -> Any:
    """A field of an SDK record, whether a dict or a (pydantic) object."""
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


def _status_name(status: Any) -> str:
    """An SDK status (an enum member, its str "Class.NAME", or a plain name) as its upper-case name."""
    return str(getattr(status, "name", status)).rsplit(".", 1)[-1].upper()


def _first_job_id(job_ids: Any, what: str) -> int:
    """The job id in what a launch request returns (sky.launch: one id; sky.jobs.launch: a list of them)."""
    ids = job_ids if isinstance(job_ids, (list, tuple)) else [job_ids]
    if not ids or ids[0] is None:
        raise RuntimeError(f"{what} returned no job id")
    return int(ids[0])


# --- catalog queries used by launcher/cost/estimate.py ------------------------------------------

# Clouds whose catalog could not be read or fetched in this process (cloud -> why): asked once only.
CATALOG_ERRORS: dict[str, str] = {}
# Clouds whose catalog SkyPilot could not download and has no copy of (cloud -> file).
CATALOG_UNFETCHED: dict[str, str] = {}
# Clouds whose catalog could not be refreshed, so SkyPilot read the copy it cached (cloud -> its date).
CATALOG_STALE: dict[str, str | None] = {}
_CATALOG_MTIME: dict[str, str] = {}


@dataclass(frozen=True)
class CatalogHealth:
    errors: dict[str, str]
    unfetched: dict[str, str]
    stale: dict[str, str | None]


def catalog_health() -> CatalogHealth:
    """What reading the catalogs in this process met: unreadable clouds, clouds never fetched and not
    cached, clouds read from a stale copy (with its date). Copies: the caller can't change ours."""
    return CatalogHealth(dict(CATALOG_ERRORS), dict(CATALOG_UNFETCHED), dict(CATALOG_STALE))


def list_offers(accelerator: str, count: int, cloud: str | None, spot: bool) -> list[dict]:
    """Priced offers of `count` x `accelerator` from SkyPilot's catalog (read offline when cached): rows
    of cloud, region, instance, card, count, price_per_h (spot price when `spot`), spot. Without `cloud`,
    only clouds whose catalog is on disk are read, so an estimate never waits on a download; with none on
    disk, SkyPilot fetches the common clouds' catalogs."""
    import sky.catalog as catalog
    from sky.catalog import common as catalog_common
    from sky.skylet import constants

    if cloud:
        clouds = [cloud.lower()]
    else:
        clouds = [c.lower() for c in constants.ALL_CLOUDS
                  if os.path.exists(catalog_common.get_catalog_path(f"{c.lower()}/vms.csv"))]
        clouds = clouds or ["aws", "gcp", "azure", "lambda", "runpod"]
    rows, seen = [], set()
    for name in clouds:
        if name in CATALOG_ERRORS:
            continue
        vms = catalog_common.get_catalog_path(f"{name}/vms.csv")
        if os.path.exists(vms):  # read before SkyPilot refreshes it (a failed refresh touches the file)
            _CATALOG_MTIME[name] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.path.getmtime(vms)))
        try:
            with captured():
                found = catalog.list_accelerators(gpus_only=True, name_filter=accelerator, quantity_filter=count,
                                                  clouds=name, case_sensitive=False, all_regions=True,
                                                  require_price=True)
        except Exception as e:  # noqa: BLE001 - one cloud's missing or unreadable catalog must not hide the others
            CATALOG_ERRORS[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            continue
        for card, infos in found.items():
            if card.lower() != accelerator.lower():
                continue  # the filter is a substring match: A100 also finds A100-80GB
            for i in infos:
                price = i.spot_price if spot else i.price
                if price is None or (isinstance(price, float) and math.isnan(price)) or price <= 0:
                    continue
                key = (i.cloud, i.instance_type, i.region)
                if int(i.accelerator_count) != count or key in seen:
                    continue
                seen.add(key)
                rows.append({"cloud": str(i.cloud), "region": i.region, "instance": i.instance_type,
                             "card": card, "count": count, "price_per_h": float(price), "spot": spot})
    return rows
