"""The event stream: one JSON object a line, appended and flushed by the job, rendered by the launcher.

Every event has `v` (schema version), `event` (its kind) and `ts` (unix seconds). Kinds and the
fields each must carry are in `TYPES`; extra fields are allowed. The reader is incremental and
resumable from a byte offset, and ignores a torn last line until it is complete, so a follower
(local file, SSH tail, SkyPilot log stream) never loses or doubles an event.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from contracts import remote
from contracts.errors import ContractError

SCHEMA_VERSION = 1
EVENTS_FILE = "events.jsonl"
# Lines the job prints to stdout carry this prefix so they can be picked out of a mixed log stream.
LINE_PREFIX = "@@socrates-event "
# Set by sky/train.yaml's run block (every backend runs it): the job's stdout is then the launcher's event
# channel. Unset (`python -m job VERB` by hand), the echo is a plain line for a person instead.
LINES_ENV = "SOCRATES_EVENT_LINES"


def _number(v: Any) -> bool:  # NaN/inf pass here: the job's `dumps` writes them as null
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_TYPES = {"number": _number, "whole": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "text": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
          "object": lambda v: isinstance(v, dict)}
# Each kind's required fields and what each must be ("?": or null); extra fields are allowed.
# The launcher renders and records what passes.
TYPES: dict[str, dict[str, str]] = {
    "start": {"verb": "text"},
    "phase": {"phase": "text"},  # launcher-side lifecycle: provisioning, syncing, installing, training, ...
    "check": {"ok": "bool"},
    "prepare": {"train_rows": "whole", "test_rows": "whole"},
    "step": {"step": "whole", "total_steps": "whole", "epoch": "number", "loss": "number?", "lr": "number?",
             "tokens_per_s": "number?", "gpu_mem_gib": "number?", "eta_s": "number?"},
    "eval": {"metrics": "object"},
    "checkpoint": {"step": "whole", "path": "text"},
    "artifact": {"path": "text", "sha256": "text", "size": "whole"},
    "done": {"reason": "text"},
    "error": {"message": "text"},
    "log": {"message": "text"},
    # A managed run (SkyPilot managed jobs): the machine ended before the job did and the job was started
    # again on a new one (`launch` counts the starts, 1 = the first), and where training took up again.
    "preempted": {"launch": "whole", "last_step": "whole?"},
    "resume": {"step": "whole", "steps_lost": "whole"},
}
REQUIRED: dict[str, tuple[str, ...]] = {kind: tuple(fields) for kind, fields in TYPES.items()}
KINDS = tuple(REQUIRED)
LAUNCHER_ONLY = ("phase",)  # written by the launcher; a job that sends one is refused ("==> tearing down")
MACHINE_KINDS = tuple(k for k in KINDS if k not in LAUNCHER_ONLY)
# The speed levers a train `start` event reports in `levers` (job/levers.py): each an object with
# `on` (bool) and `why` (text); checkpointed_layers also `layers` (int or null: all).
LEVERS = ("liger", "flex_attention", "fused_lora", "packing", "checkpointed_layers", "offload", "fp8")
LEVERS_NEWER = ("fp8",)  # added later: a record from an older job may lack them
DONE_REASONS = ("completed", "deadline", "max_steps", "stopped")


def make(event: str, **fields: Any) -> dict:
    """Build and validate one event (timestamped now unless `ts` is given)."""
    obj = {"v": SCHEMA_VERSION, "event": event, "ts": fields.pop("ts", None) or time.time(), **fields}
    return validate(obj)


def validate(obj: Any, typed: bool = True) -> dict:
    if not isinstance(obj, dict):
        raise ContractError(f"event: expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("event")
    if not isinstance(kind, str) or kind not in REQUIRED:  # a list or object as the kind is no key (found by the fuzz)
        raise ContractError(f"event: unknown kind {_short(kind)} (accepted: {', '.join(KINDS)})")
    if not _number(obj.get("ts")):
        raise ContractError(f"event {kind}: ts must be unix seconds, got {_short(obj.get('ts'))}")
    missing = [k for k in REQUIRED[kind] if k not in obj]
    if missing:
        raise ContractError(f"event {kind}: missing field(s) {', '.join(missing)}")
    for key, what in (TYPES[kind] if typed else {}).items():
        if not ((what.endswith("?") and obj[key] is None) or _TYPES[what.rstrip("?")](obj[key])):
            raise ContractError(f"event {kind}: {key} {_short(obj[key])} is not accepted "
                                f"({what.rstrip('?')}{' or null' if what.endswith('?') else ''})")
    if kind == "done" and obj["reason"] not in DONE_REASONS:
        raise ContractError(f"event done: reason {_short(obj['reason'])} (accepted: {', '.join(DONE_REASONS)})")
    if kind == "start" and "levers" in obj:
        _check_levers(obj["levers"])
    return obj


def _check_levers(levers: Any) -> None:
    if not isinstance(levers, dict) or set(levers) | set(LEVERS_NEWER) != set(LEVERS):
        got = sorted(levers) if isinstance(levers, dict) else type(levers).__name__
        raise ContractError(f"event start: levers {got} (accepted: an object with exactly {', '.join(LEVERS)}; "
                            f"{', '.join(LEVERS_NEWER)} may be absent)")
    for name, lv in levers.items():
        if not isinstance(lv, dict) or not isinstance(lv.get("on"), bool) or not isinstance(lv.get("why", ""), str):
            raise ContractError(f"event start: levers.{name} {lv!r} (accepted: an object with on: bool, why: text)")


def dumps(obj: dict) -> str:
    """One line of JSON; NaN/inf become null so every line stays strict JSON."""
    return json.dumps(_finite(obj), separators=(",", ":"), sort_keys=False)


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def parse_line(line: str, kinds: tuple[str, ...] = MACHINE_KINDS,
               skips: remote.Skips | None = remote.skipped, typed: bool = True) -> dict | None:
    """The event on a line (bare JSON or with LINE_PREFIX), or None for any other line. Never raises:
    what a machine sends is read with `remote.loads` (finite numbers, bounded integers) and checked
    against the schema; a line that claims to be an event (the prefix, or a bare object naming an
    `event`) and fails, or names a kind outside `kinds` (a job's `phase`), is counted in `skips`.
    `typed=False` (the launcher's own record, which `logs` shows as it is, hand edits included) checks
    the kinds and required fields but not their types."""
    if len(line) > remote.MAX_LINE:
        if skips is not None:
            skips.note(f"a line over {remote.MAX_LINE:,} bytes")
        return None
    line = line.strip()
    claimed = LINE_PREFIX.strip() in line
    if line.startswith(LINE_PREFIX):
        line = line[len(LINE_PREFIX):]
    elif LINE_PREFIX in line:  # log streams may prepend their own prefix
        line = line.split(LINE_PREFIX, 1)[1]
    if not line.startswith("{"):
        if claimed and skips is not None:
            skips.note("an event line that is not a JSON object")
        return None
    claimed = claimed or '"event"' in line
    try:
        ev = validate(remote.loads(line), typed)
        if ev["event"] not in kinds:
            raise ContractError(f"event {ev['event']}: not accepted from the job (the launcher's own)")
        return ev
    except (remote.Refused, ContractError) as e:
        if claimed and skips is not None:
            skips.note(str(e))
        return None


class EventWriter:
    """Appends events to a file, flushed and fsynced per line; optionally echoes them to stdout."""

    def __init__(self, path: str | os.PathLike, echo: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    def emit(self, event: str, **fields: Any) -> dict:
        obj = make(event, **fields)
        line = dumps(obj)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.echo:
            print(LINE_PREFIX + line if os.environ.get(LINES_ENV) == "1" else plain_line(obj), flush=True)
        return obj


def plain_line(obj: dict) -> str:
    """An event as a person reads it: `[job] kind: key=value, ...` (nested values as compact JSON, cut short)."""
    fields = []
    for key, value in obj.items():
        if key in ("v", "ts", "event"):
            continue
        text = value if isinstance(value, str) else json.dumps(_finite(value), separators=(",", ":"))
        fields.append(f"{key}={text if len(text) <= 120 else text[:117] + '...'}")
    return f"[job] {obj.get('event')}: " + ", ".join(fields)


@dataclass
class EventReader:
    """Follows an events file (or a log carrying events) from a byte offset, in bounded memory: it reads
    CHUNK bytes at a time and never holds more than one line of MAX_LINE (a longer one is dropped).
    `offset` is the end of the last whole line (a new reader resumes there, a torn last line is read
    again); `pos` is where this reader reads next."""

    path: Path
    offset: int = 0
    kinds: tuple[str, ...] = MACHINE_KINDS
    skips: remote.Skips | None = remote.skipped
    typed: bool = True
    lines: remote.Lines = field(default_factory=remote.Lines, repr=False)

    @property
    def pos(self) -> int:
        return self.offset + self.lines.pending

    def read_new(self) -> list[dict]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with f:
            f.seek(self.pos)
            return self.feed(iter(lambda: f.read(remote.CHUNK), b""))

    def feed(self, chunks: Iterable[bytes]) -> list[dict]:
        """The events in `chunks`, the stream's next bytes (from `pos` on)."""
        events = []
        for chunk in chunks:
            start = self.pos
            for raw in self.lines.feed(chunk):
                ev = parse_line(raw.decode("utf-8", errors="replace"), self.kinds, self.skips, self.typed)
                if ev is not None:
                    events.append(ev)
            self.offset = start + len(chunk) - self.lines.pending
        return events


def read_all(path: str | os.PathLike, kinds: tuple[str, ...] = MACHINE_KINDS,
             skips: remote.Skips | None = remote.skipped, typed: bool = True) -> list[dict]:
    """Every complete event line of a file (see parse_line)."""
    return EventReader(Path(path), kinds=kinds, skips=skips, typed=typed).read_new()


def read_record(path: str | os.PathLike) -> list[dict]:
    """The launcher's own record, runs/<id>/events.jsonl: its `phase` lines too, values as recorded."""
    return read_all(path, kinds=KINDS, skips=None, typed=False)


def iter_lines(lines: Iterable[str]) -> Iterator[dict]:
    for line in lines:
        ev = parse_line(line)
        if ev is not None:
            yield ev


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
