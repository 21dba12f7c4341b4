"""The run registry: runs/<run-id>/run.json, a small state machine written atomically.

    created -> provisioning -> running -> downloading -> done
         \\___________\\____________\\____________\\-> failed      (any live state)
    any state -> torn_down when `down` ends a run before it finished

Every later command (`logs`, `status`, `down`, `download`, `runs`) picks a run up from here, so a
backend saves the handles it needs (cluster name, request id, pid, working dir) in
`backend_state` *before* it creates anything. `runs/` is ./runs, or $SOCRATES_RUNS_DIR.
"""
from __future__ import annotations

import json
import os
import re
import secrets as _random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from contracts._io import atomic_write_json
from contracts.errors import ContractError

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
    "failed": ("downloading", "torn_down"),
    "torn_down": ("downloading",),
}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")


def runs_root() -> Path:
    return Path(os.environ.get("SOCRATES_RUNS_DIR") or "runs")


@dataclass
class Run:
    id: str
    dir: Path
    infra: str = "local"
    state: str = "created"
    gpu: str | None = None
    name: str = "run"
    config: dict = field(default_factory=dict)
    """The resolved run config (contracts.config.RunConfig.to_dict), after --subset/--data/--model."""
    options: dict = field(default_factory=dict)
    """What `up` was asked: cloud, spot, eval flags, deadline; no secrets."""
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
    verified: bool = False
    backend_state: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    # --- persistence -------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.dir / RUN_FILE

    def save(self) -> "Run":
        self.updated_at = time.time()
        data = asdict(self)
        data["dir"] = str(self.dir)
        atomic_write_json(self.path, data)
        return self

    def transition(self, state: str, note: str | None = None, **updates: Any) -> "Run":
        """Move to `state` (checked against TRANSITIONS), apply `updates`, write atomically."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
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
        return self.dir / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.dir / "job.log"

    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at


_FIELDS = {f.name for f in fields(Run)}


def new_run(name: str, infra: str, **kw: Any) -> Run:
    """Create runs/<name>-<utc time>-<random>/run.json in state `created`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "run"
    run_id = f"{safe}-{stamp}-{_random.token_hex(2)}"
    run_dir = runs_root() / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    run = Run(id=run_id, dir=run_dir, infra=infra, name=name, **kw)
    run.history.append({"state": "created", "ts": run.created_at})
    return run.save()


def load(run_id: str) -> Run:
    if not _RUN_ID.match(run_id or ""):
        raise ContractError(f"run {run_id!r}: not a run id (letters, digits, . _ -; `socrates-launch runs` lists them)")
    path = runs_root() / run_id / RUN_FILE
    if not path.is_file():
        raise ContractError(f"run {run_id!r}: no such run under {runs_root()}/ (`socrates-launch runs` lists them)")
    return _read(path)


def _read(path: Path) -> Run:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["dir"] = path.parent
        return Run(**{k: v for k, v in data.items() if k in _FIELDS})
    except (ValueError, TypeError) as e:
        raise ContractError(f"{path}: unreadable run record ({e})") from None


def list_runs() -> list[Run]:
    """Every run under runs/, oldest first."""
    root = runs_root()
    if not root.is_dir():
        return []
    runs = [_read(p) for p in root.glob(f"*/{RUN_FILE}")]
    return sorted(runs, key=lambda r: r.created_at)


def resolve(run_id: str | None) -> Run:
    """The named run, or the latest one when no id is given (an empty id is refused: `down "$UNSET"`
    must not end the latest run)."""
    if run_id is not None and not run_id.strip():
        raise ContractError(f"run {run_id!r}: an empty run id (name one from `socrates-launch runs`, or give "
                            "none for the latest run)")
    if run_id:
        return load(run_id)
    runs = list_runs()
    if not runs:
        raise ContractError(f"no runs under {runs_root()}/ yet (start one with `socrates-launch up`)")
    return runs[-1]
