"""The event stream: one JSON object a line, appended and flushed by the job, rendered by the launcher.

Every event has `v` (schema version), `event` (its kind) and `ts` (unix seconds). Kinds and the
fields each must carry are in `REQUIRED`; extra fields are allowed. The reader is incremental and
resumable from a byte offset, and ignores a torn last line until it is complete, so a follower
(local file, SSH tail, SkyPilot log stream) never loses or doubles an event.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from contracts.errors import ContractError

SCHEMA_VERSION = 1
EVENTS_FILE = "events.jsonl"
# Lines the job prints to stdout carry this prefix so they can be picked out of a mixed log stream.
LINE_PREFIX = "@@socrates-event "
# Set by sky/train.yaml's run block (every backend runs it): the job's stdout is then the launcher's event
# channel. Unset (`python -m job VERB` by hand), the echo is a plain line for a person instead.
LINES_ENV = "SOCRATES_EVENT_LINES"

REQUIRED: dict[str, tuple[str, ...]] = {
    "start": ("verb",),
    "phase": ("phase",),  # launcher-side lifecycle: provisioning, syncing, installing, training, ...
    "check": ("ok",),
    "prepare": ("train_rows", "test_rows"),
    "step": ("step", "total_steps", "epoch", "loss", "lr", "tokens_per_s", "gpu_mem_gib", "eta_s"),
    "eval": ("metrics",),
    "checkpoint": ("step", "path"),
    "artifact": ("path", "sha256", "size"),
    "done": ("reason",),
    "error": ("message",),
    "log": ("message",),
    # A managed run (SkyPilot managed jobs): the machine ended before the job did and the job was started
    # again on a new one (`launch` counts the starts, 1 = the first), and where training took up again.
    "preempted": ("launch", "last_step"),
    "resume": ("step", "steps_lost"),
}
KINDS = tuple(REQUIRED)
# The speed levers a train `start` event reports in `levers` (job/levers.py): each an object with
# `on` (bool) and `why` (text); checkpointed_layers also `layers` (int or null: all).
LEVERS = ("liger", "flex_attention", "fused_lora", "packing", "checkpointed_layers", "offload", "fp8")
LEVERS_NEWER = ("fp8",)  # added later: a record from an older job may lack them
DONE_REASONS = ("completed", "deadline", "max_steps", "stopped")


def make(event: str, **fields: Any) -> dict:
    """Build and validate one event (timestamped now unless `ts` is given)."""
    obj = {"v": SCHEMA_VERSION, "event": event, "ts": fields.pop("ts", None) or time.time(), **fields}
    return validate(obj)


def validate(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise ContractError(f"event: expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("event")
    if kind not in REQUIRED:
        raise ContractError(f"event: unknown kind {kind!r} (accepted: {', '.join(KINDS)})")
    if not isinstance(obj.get("ts"), (int, float)):
        raise ContractError(f"event {kind}: ts must be unix seconds, got {obj.get('ts')!r}")
    missing = [k for k in REQUIRED[kind] if k not in obj]
    if missing:
        raise ContractError(f"event {kind}: missing field(s) {', '.join(missing)}")
    if kind == "done" and obj["reason"] not in DONE_REASONS:
        raise ContractError(f"event done: reason {obj['reason']!r} (accepted: {', '.join(DONE_REASONS)})")
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


def parse_line(line: str) -> dict | None:
    """The event on a line (bare JSON or with LINE_PREFIX), or None for any other line."""
    line = line.strip()
    if line.startswith(LINE_PREFIX):
        line = line[len(LINE_PREFIX):]
    elif LINE_PREFIX in line:  # log streams may prepend their own prefix
        line = line.split(LINE_PREFIX, 1)[1]
    if not line.startswith("{"):
        return None
    try:
        return validate(json.loads(line))
    except (json.JSONDecodeError, ContractError):
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
    """Follows an events file from a byte offset; `offset` is where the next read starts."""

    path: Path
    offset: int = 0

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        events, consumed = parse_chunk(data)
        self.offset += consumed
        return events


def parse_chunk(data: bytes) -> tuple[list[dict], int]:
    """Events in the complete lines of `data`, and how many bytes those lines took."""
    end = data.rfind(b"\n") + 1
    events = []
    for raw in data[:end].splitlines():
        ev = parse_line(raw.decode("utf-8", errors="replace"))
        if ev is not None:
            events.append(ev)
    return events, end


def read_all(path: str | os.PathLike) -> list[dict]:
    return EventReader(Path(path)).read_new()


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
