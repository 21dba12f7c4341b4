"""The run registry: runs/<run-id>/run.json, a small state machine written atomically.

    created -> provisioning -> running -> downloading -> done
         \\___________\\____________\\____________\\-> failed      (any live state)
    any state -> torn_down when `down` ends a run before it finished

Every later command (`logs`, `status`, `down`, `download`, `runs`) picks a run up from here, so a
backend saves the handles it needs (cluster name, request id, pid, working dir) in
`backend_state` *before* it creates anything. `runs/` is ./runs, or $SOCRATES_RUNS_DIR.
"""
from __future__ import annotations

import calendar
import contextlib
import copy
import json
import os
import re
import secrets as _random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from contracts._io import atomic_write_json
from contracts.events import EVENTS_FILE
from contracts.manifest import MANIFEST_FILE
from contracts.errors import ContractError
from contracts.remote import is_number

INFRAS = "local | sky | ssh://user@host[:port]"

RUN_FILE = "run.json"
STATES = ("created", "provisioning", "running", "downloading", "done", "failed", "torn_down")
LIVE_STATES = ("created", "provisioning", "running", "downloading")
# Allowed moves; `download` may re-enter downloading from an ended run (artifacts pulled again).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "created": ("provisioning", "failed", "torn_down"),
    "provisioning": ("running", "failed", "torn_down"),
    "running": ("downloading", "failed", "torn_down"),
    "downloading": ("done", "failed", "torn_down"),
    "done": ("downloading", "torn_down"),
    "failed": ("downloading", "torn_down", "running"),  # running: `logs` found the job still running
    "torn_down": ("downloading",),
}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")


PRIVATE = 0o600  # run.json and the side files: they name hosts, buckets and commands
PRIVATE_DIR = 0o700


def runs_root() -> Path:
    """./runs, or $SOCRATES_RUNS_DIR (`~` expanded); one that names something other than a folder is
    a ContractError (exit 2)."""
    raw = os.environ.get("SOCRATES_RUNS_DIR") or "runs"
    root = Path(raw).expanduser()
    if root.exists() and not root.is_dir():
        raise ContractError(f"SOCRATES_RUNS_DIR {raw!r}: {root} is not a folder (accepted: a folder, made if missing)")
    return root


def known_infra(infra: str) -> bool:
    return infra in ("local", "sky") or (infra.startswith("ssh://") and len(infra) > len("ssh://"))


def check_infra(infra: str) -> str:
    if known_infra(infra):
        return infra
    raise ContractError(f"--infra {infra!r}: unknown infrastructure (accepted: {INFRAS})")


@dataclass(frozen=True)
class RunOptions:
    """How and where a run runs, beyond its config: made once by launcher/plan.py's `resolve`, kept in
    run.json. What the job reads (subset, eval on/off, the row cap) is in the run config, never here."""

    cloud: str | None = None
    spot: bool = False
    managed_job: bool = False
    """A SkyPilot managed job (--spot/--managed): it outlives its machine, its results in a bucket."""
    max_cost: float | None = None
    max_hours: float | None = None
    deadline_s: float | None = None
    """The machine-time cap the estimate set (--max-cost/--max-hours, or the safety deadline)."""
    config_file: str | None = None
    image: str | None = None
    nodes: int = 1
    ranks: int | None = None
    weights: str = "pull"
    data_sha256: str | None = None
    """The local data's hash as sent (the job's must match)."""
    ssh: dict | None = None
    """The SSH backend's own options (launcher/ssh_options.py), for ssh:// runs."""

    @classmethod
    def from_record(cls, data: Any) -> "RunOptions":
        """From run.json (untrusted): known keys only (an older record's others are dropped), each of its
        type; ValueError names the first that is not."""
        if isinstance(data, RunOptions):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"{_short(data)} is not an object")
        kinds = {"str": str, "bool": bool, "int": int, "float": (int, float), "dict": dict}
        known = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value, allowed = data[f.name], [k.strip() for k in str(f.type).split("|")]
            ok = (value is None and "None" in allowed) or (
                value is not None and (not isinstance(value, bool) or "bool" in allowed)
                and any(k != "None" and isinstance(value, kinds[k]) for k in allowed)
                and (not isinstance(value, float) or is_number(value)))
            if not ok:
                raise ValueError(f"{f.name} {_short(value)} is not {' or '.join(allowed)}")
            known[f.name] = value
        return cls(**known)


@dataclass
class Run:
    damaged: ClassVar[bool] = False
    """A sound record (`Damaged` says True): what `scan` lists is told apart by this, not by type."""

    id: str
    dir: Path
    infra: str = "local"
    state: str = "created"
    gpu: str | None = None
    name: str = "run"
    config: dict = field(default_factory=dict)
    """The resolved run config (contracts.config.RunConfig.to_dict), after --subset/--data/--model."""
    options: RunOptions = field(default_factory=RunOptions)
    """How and where it runs (a dict given here is read as a record's); no secrets."""
    estimate: dict | None = None
    price_per_hour: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    """When the machine started billing (provisioning began)."""
    ended_at: float | None = None
    """When the machine was released."""
    exit_code: int | None = None
    error: str | None = None
    machine: str = "none"
    """What the launcher last knew of the machine: none, up, gone."""
    adapter: str | None = None
    weights_left: str | None = None
    """`up --weights leave`: where a full fine-tune's weights stayed (not pulled back); None once pulled."""
    verified: bool = False
    backend_state: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.options = RunOptions.from_record(self.options)

    # --- persistence -------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.dir / RUN_FILE

    def save(self) -> "Run":
        """Write the record: read-modify-write under runs/<id>/.lock, so two processes working on one
        run (`up` following while `down` ends it) never overwrite each other's changes: what this copy
        changed since it was read is applied over what is on disk now, and this copy is refreshed."""
        mine = {**asdict(self), "dir": str(self.dir)}
        with record_lock(self.dir):
            base = getattr(self, "_base", None)
            disk = _read_object(self.path) if base is not None else None
            merged = _merge(base, mine, disk) if disk is not None else mine
            merged["updated_at"] = time.time()
            atomic_write_json(self.path, merged, mode=PRIVATE)
        self._refresh(merged)
        return self

    def _refresh(self, data: dict, base: dict | None = None) -> None:
        """This copy set to `data`; a later save applies what changed since `base` (default: `data`)."""
        for key in (_FIELDS - {"dir"}) & data.keys():
            new, old = copy.deepcopy(data[key]), getattr(self, key, None)
            # in place: a backend holds run.backend_state and keeps writing into that very dict
            if isinstance(old, dict) and isinstance(new, dict):
                old.clear()
                old.update(new)
            elif isinstance(old, list) and isinstance(new, list):
                old[:] = new
            else:
                setattr(self, key, RunOptions.from_record(new) if key == "options" else new)
        self._base = copy.deepcopy({**(data if base is None else base), "dir": str(self.dir)})

    def transition(self, state: str, note: str | None = None, **updates: Any) -> "Run":
        """Move to `state` (checked against TRANSITIONS), apply `updates`, write atomically."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        if self.state == "torn_down" and state in ("failed", "done"):
            state = self.state  # `down` ended the run meanwhile (another process): its word stands
        if state != self.state and state not in TRANSITIONS[self.state]:
            raise ValueError(f"run {self.id}: {self.state} -> {state} is not a valid transition")
        for key, value in updates.items():
            if key not in _FIELDS:
                raise ValueError(f"run {self.id}: unknown field {key!r}")
            setattr(self, key, value)
        if state != self.state:
            self.history.append({"state": state, "ts": time.time(), **({"note": note} if note else {})})
        self.state = state
        return self.save()

    def update(self, **updates: Any) -> "Run":
        """Change fields without a state change (backend handles, machine, adapter), atomically."""
        return self.transition(self.state, **updates)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def events_path(self) -> Path:
        return self.dir / EVENTS_FILE

    @property
    def log_path(self) -> Path:
        return self.dir / "job.log"

    def duration_s(self) -> float | None:
        return None if self.started_at is None else (self.ended_at or time.time()) - self.started_at

    def expected_cost(self) -> float | None:
        """The estimate's expected dollars (SCHEMA: estimate.dollars is null or [low, expected, high])."""
        dollars = (self.estimate or {}).get("dollars")
        return dollars[1] if dollars else None

    def actual_cost(self) -> float | None:
        """Price x billed time (launcher/cost/caps.py), None without a price or a start."""
        from launcher.cost.caps import actual_cost  # keeps --help light (launcher/cost/)

        return actual_cost(self)


_FIELDS = {f.name for f in fields(Run)}
LOCK_FILE = ".lock"
FOLLOW_LOCK_FILE = ".follow.lock"
BUCKET_PARTIAL_DIR = ".bucket-partial"  # launcher/bucket.py: a bucket pull's resumable staging
BUCKET_STATE_FILE = ".bucket-partial.json"
TEARDOWN_FILE = ".on-teardown"  # ssh: the --on-teardown command, 0600, never run from here
# Names in runs/<id>/ that the launcher keeps for itself: a manifest listing one of them is refused
# (lifecycle's and the bucket pull's verification both use this one list).
RESERVED = (RUN_FILE, EVENTS_FILE, "job.log", "task.yaml", "launch.log", ".download", LOCK_FILE,
            FOLLOW_LOCK_FILE, MANIFEST_FILE, "checkpoints", BUCKET_PARTIAL_DIR, BUCKET_STATE_FILE, TEARDOWN_FILE)


@contextlib.contextmanager
def record_lock(run_dir: Path):
    """Exclusive, short: held only around one read-modify-write of run.json."""
    import fcntl

    with open(Path(run_dir) / LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # closing the file (also on an error in the block) drops it
        yield


class Follower:
    """One follower per run (`up`, `logs`, `download`): an exclusive lock on runs/<id>/.follow.lock held
    while it follows, downloads or verifies. `acquire()` is False when another process holds it (its pid
    is in `holder`): then only read (replay events), never append, pull or move results."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / FOLLOW_LOCK_FILE
        self._file = None
        self.holder: str = ""

    def acquire(self) -> bool:
        import fcntl

        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            self.holder = f.read().strip()
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


def _read_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _merge(base: dict, mine: dict, disk: dict) -> dict:
    """Three-way: start from disk, apply what `mine` changed relative to `base` (the copy it was read as).
    History: disk's plus the entries `mine` added. backend_state: per key. A state change is applied only
    if it is a valid move from the state on disk (a `down`'s torn_down stands over this copy's 'failed')."""
    out = dict(disk)
    was, now, new = base.get("state"), disk.get("state"), mine.get("state")
    # a move not allowed from the state on disk is refused, unless nobody moved the record since this copy read it
    refused = new != was and not (new == now or now not in TRANSITIONS or new in TRANSITIONS[now] or now == was)
    # A run that ended done meanwhile is never moved backwards: a stale copy's refused move is dropped with
    # what came with it (its error, machine, ended_at), so "machine gone while live" never lands on it.
    ended_well = refused and now == "done"
    for key, value in mine.items():
        if key in ("history", "state", "updated_at") or value == base.get(key):
            continue
        if ended_well and key != "backend_state":
            continue
        if key == "backend_state" and isinstance(disk.get(key), dict) and isinstance(base.get(key), dict):
            merged = dict(disk[key])
            for k in set(value) | set(base[key]):
                if value.get(k, _MISSING) != base[key].get(k, _MISSING):
                    if k in value:
                        merged[k] = value[k]
                    else:
                        merged.pop(k, None)
            out[key] = merged
        else:
            out[key] = value
    added = list(mine.get("history") or [])[len(base.get("history") or []):]
    out["state"] = now
    if new != was:
        if not refused:
            out["state"] = new
        else:  # someone else moved the run meanwhile, to where this move is not allowed: theirs stands
            added = [h for h in added if h.get("state") != new]
    if isinstance(disk.get("history"), list):
        out["history"] = disk["history"] + added
    return out


_MISSING = object()


def new_run(name: str, infra: str, **kw: Any) -> Run:
    """Create runs/<name>-<utc time>-<random>/run.json in state `created`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "run"
    run_id = f"{safe}-{stamp}-{_random.token_hex(2)}"
    root = runs_root()
    try:  # made (0700) if missing and checked writable: a ContractError (exit 2) before a run exists
        root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        probe = root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ContractError(f"SOCRATES_RUNS_DIR {str(root)!r}: runs cannot be written there ({e.strerror or e}); "
                            "accepted: a folder you can write") from None
    run_dir = root / run_id
    run_dir.mkdir(mode=PRIVATE_DIR)
    run = Run(id=run_id, dir=run_dir, infra=infra, name=name, **kw)
    run.history.append({"state": "created", "ts": run.created_at})
    return run.save()


# --- what a record on disk may hold ------------------------------------------------------------
# A record is checked against this table when it is read: a hand-edited or foreign run.json is
# refused with one line naming the file and the field, not a traceback three verbs later. Numbers are
# finite and bounded (is_number): a 401-digit created_at is damage in one record, not an OverflowError.

def _opt(check):
    return lambda v: v is None or check(v)


def _estimate(v: Any) -> bool:
    """What the verbs read of an estimate: dollars [low, expected, high] and the cheapest offer's price."""
    if not isinstance(v, dict):
        return False
    dollars, cheapest = v.get("dollars"), v.get("cheapest")
    return ((dollars is None or (isinstance(dollars, list) and len(dollars) == 3 and all(map(is_number, dollars))))
            and (not cheapest or (isinstance(cheapest, dict) and _opt(is_number)(cheapest.get("price_per_h"))))
            and _opt(is_number)(v.get("price_per_hour")))


def _storage_of_older_record(config: Any, options: Any) -> Any:
    """Records written before the run config's storage section held --bucket/--keep-bucket kept them in
    `options`: carried over, so such a managed run still finds the bucket it writes to, and keeps the
    bucket it was told to keep (RunOptions drops the keys it no longer knows)."""
    if not isinstance(options, dict) or not isinstance(config, dict):
        return config
    old = {k: options[k] for k, kind in (("bucket", str), ("keep_bucket", bool)) if isinstance(options.get(k), kind)}
    if not old:
        return config
    storage = dict(config["storage"]) if isinstance(config.get("storage"), dict) else {}
    storage.update({k: v for k, v in old.items() if not storage.get(k)})
    return {**config, "storage": storage}


def _options(v: Any) -> bool:
    try:
        RunOptions.from_record(v)
    except ValueError:
        return False
    return True


_str = lambda v: isinstance(v, str)  # noqa: E731
_dict = lambda v: isinstance(v, dict)  # noqa: E731

# field -> (check, what it must be). A field missing from the file takes the dataclass default.
SCHEMA: dict[str, tuple[Any, str]] = {
    "id": (_str, "a string"),
    "infra": (lambda v: isinstance(v, str) and known_infra(v), f"a known infrastructure ({INFRAS})"),
    "state": (lambda v: v in STATES, f"a run state ({', '.join(STATES)})"),
    "gpu": (_opt(_str), "a string or null"),
    "name": (_str, "a string"),
    "config": (_dict, "an object"),
    "options": (_options, "an object of run options (launcher/registry.py RunOptions)"),
    "estimate": (_opt(_estimate), "null or an object with dollars [low, expected, high] as numbers"),
    "price_per_hour": (_opt(is_number), "a number or null"),
    "created_at": (is_number, "a number"),
    "updated_at": (is_number, "a number"),
    "started_at": (_opt(is_number), "a number"),
    "ended_at": (_opt(is_number), "a number"),
    "exit_code": (_opt(lambda v: isinstance(v, int) and not isinstance(v, bool)), "a whole number or null"),
    "error": (_opt(_str), "a string or null"),
    "machine": (_str, "a string"),
    "adapter": (_opt(_str), "a string or null"),
    "weights_left": (_opt(_str), "a string or null"),
    "verified": (lambda v: isinstance(v, bool), "true or false"),
    "backend_state": (_dict, "an object"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v), "a list of objects"),
}
assert set(SCHEMA) == _FIELDS - {"dir"}, "every Run field has a row in SCHEMA"


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class Salvaged(Run):
    """A damaged record read only so that `down` can end its machine: the sound fields, with the
    damaged ones at their defaults; saving writes back the sound fields only, leaving the damaged
    ones as they were on disk (the evidence stays for the user to fix)."""

    _raw: dict
    _damaged: frozenset
    damage: str
    """The one line that says what is wrong with the record."""

    def save(self) -> "Run":
        self.updated_at = time.time()
        data = {**asdict(self), "dir": str(self.dir)}
        out = {**self._raw, **{k: v for k, v in data.items() if k not in self._damaged}}
        atomic_write_json(self.path, out, mode=PRIVATE)
        return self


@dataclass
class Damaged:
    """A record under runs/ that can't be used: `error` is the one line that says why."""

    damaged: ClassVar[bool] = True

    id: str
    dir: Path
    error: str
    created_at: float
    salvageable: bool = False
    handles: Any = None
    """Its backend_state as read, where it can't be salvaged: launcher/backends still says from it what
    ends its machine by hand (`end_by_hand`)."""


class DamagedRecord(ContractError):
    """A run record that can't be used: its one line, and `handles` (see `Damaged`)."""

    def __init__(self, record: Damaged):
        super().__init__(record.error)
        self.handles = record.handles


def _fail(path: Path, what: str, hint: str) -> str:
    return f"{path}: {what}; the record is damaged: {hint}"


def _parse(path: Path) -> tuple[Run | None, Damaged | None]:
    """Read one run.json: (run, None) when sound, else (salvaged run or None, Damaged)."""
    folder = path.parent.name
    when = _folder_time(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, Damaged(folder, path.parent, _fail(path, f"not readable JSON ({e})", "fix or remove the folder"), when)
    if not isinstance(data, dict):
        return None, Damaged(folder, path.parent, _fail(path, "not a JSON object", "fix or remove the folder"), when)
    if is_number(data.get("created_at")):
        when = data["created_at"]
    damaged = {k for k, (check, _) in SCHEMA.items() if k in data and not check(data[k])}
    found = [f"{key} {_short(data[key])} is not {what}" for key, (_, what) in SCHEMA.items() if key in damaged]
    if "id" not in data:
        found.insert(0, "id is missing")
    elif isinstance(data["id"], str) and data["id"] != folder:
        found.append(f"id {data['id']!r} is not its folder's name {folder!r}")
    if not found:
        data["dir"] = path.parent
        read = {**data, "config": _storage_of_older_record(data.get("config"), data.get("options"))}
        run = Run(**{k: v for k, v in read.items() if k in _FIELDS})
        run._refresh(read, base=data)  # a later save applies only what this copy changed (a carried-over storage too)
        return run, None
    if data.get("id") != folder:
        damaged.add("id")
    # `down` can still end the machine when it knows which backend and the backend's handles.
    salvageable = not ({"infra", "backend_state"} & damaged) and bool(data.get("backend_state"))
    hint = (f"fix it, or end its machine with `socrates-launch down {folder}` and remove the folder" if salvageable
            else "fix or remove the folder")
    bad = Damaged(folder, path.parent, _fail(path, "; ".join(found), hint), when, salvageable,
                  None if salvageable else data.get("backend_state"))
    if not salvageable:
        return None, bad
    sound = {k: v for k, v in data.items() if k in _FIELDS and k not in damaged}
    sound["id"] = folder  # the folder is what every verb names it by
    run = Salvaged(**{**sound, "dir": path.parent})
    run._raw, run._damaged, run.damage = data, frozenset(damaged), bad.error
    return run, bad


_STAMP = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]{4}$")


def _folder_time(path: Path) -> float:
    """When a run began, for a record whose created_at can't be read: the UTC stamp `new_run` put in
    its folder's name, else the file's modification time."""
    if m := _STAMP.search(path.parent.name):
        try:
            return float(calendar.timegm(time.strptime(m.group(1), "%Y%m%d-%H%M%S")))
        except ValueError:
            pass
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def load(run_id: str, salvage: bool = False) -> Run:
    """The run `run_id`; a damaged record is a ContractError naming the file and the field. With
    `salvage` (only `down`: money), a damaged record whose infra and backend_state are sound comes
    back as a `Salvaged` run so its machine can still be ended."""
    if not _RUN_ID.match(run_id or ""):
        raise ContractError(f"run {run_id!r}: not a run id (letters, digits, . _ -; `socrates-launch runs` lists them)")
    path = runs_root() / run_id / RUN_FILE
    if not path.is_file():
        raise ContractError(f"run {run_id!r}: no such run under {runs_root()}/ (`socrates-launch runs` lists them)")
    run, bad = _parse(path)
    if bad is not None and not (salvage and run is not None):
        raise DamagedRecord(bad)
    return run


def scan() -> list[Run | Damaged]:
    """Every record under runs/, sound or damaged, oldest first (damaged ones by their folder's stamp)."""
    root = runs_root()
    if not root.is_dir():
        return []
    found = [bad if bad is not None else run for run, bad in map(_parse, root.glob(f"*/{RUN_FILE}"))]
    return sorted(found, key=lambda r: (r.created_at, r.id))


def resolve(run_id: str | None, salvage: bool = False) -> Run:
    """The named run, or the latest one when no id is given (an empty id is refused: `down "$UNSET"`
    must not end the latest run). The latest is never a damaged record passed over for an older
    one: if the latest is damaged, the error names it."""
    if run_id is not None and not run_id.strip():
        raise ContractError(f"run {run_id!r}: an empty run id (name one from `socrates-launch runs`, or give "
                            "none for the latest run)")
    if run_id:
        return load(run_id, salvage=salvage)
    records = scan()
    if not records:
        raise ContractError(f"no runs under {runs_root()}/ yet (start one with `socrates-launch up`)")
    latest = records[-1]
    if isinstance(latest, Damaged):
        if salvage and latest.salvageable:
            return load(latest.id, salvage=True)
        raise DamagedRecord(latest)
    return latest
