"""A managed run's state across relaunches, kept in the bucket (stdlib only: runs before the venv exists).

    python3 -m job.managed start --state DIR --events OUT/events.jsonl [--deadline-s N] [--t0 UNIX_TS]

SkyPilot's managed jobs start the task again on a new machine after a preemption (or a lost host);
everything on the old machine's disk is gone, the bucket mounted at $SOCRATES_BUCKET is not. Each
start of the run block calls this first. It

- counts the start in DIR/launches.json (1 = the first launch; written atomically);
- fixes the remote deadline at the first start (`--t0` + `--deadline-s`: setup's start on that first
  machine) and hands the same one to every relaunch: a cap is never reset by a preemption, so the time
  spent recovering and every relaunch's machine time count against it;
- on a relaunch, appends a `preempted` event (this launch's number and the last step the events
  recorded) to the run's events, so the launcher and the record show each one;
- prints shell assignments for the run block to `eval`: SOCRATES_LAUNCH, and SOCRATES_DEADLINE
  when there is a deadline.

`python -m job train --resume auto` then resumes from the newest complete checkpoint in the bucket
and emits a `resume` event (the step, the steps lost since the last logged one, SOCRATES_LAUNCH).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from contracts import remote
from contracts._io import atomic_write_json
from contracts.errors import EXIT_BAD_INPUT
from contracts.events import LINE_PREFIX, EventWriter, dumps, make, read_all

STATE_FILE = "launches.json"
# The time-based checkpoint interval a managed run gets when its config leaves train.checkpoint_every_s unset.
CHECKPOINT_EVERY_S = 600


def checkpoint_every_s(train) -> int:
    if train.checkpoint_every_s is not None:
        return train.checkpoint_every_s
    return CHECKPOINT_EVERY_S if os.environ.get("SOCRATES_MANAGED") == "1" else 0


def launch_number() -> int | None:
    raw = os.environ.get("SOCRATES_LAUNCH", "")
    return int(raw) if raw.isdigit() else None


def last_logged_step(events: Path) -> int | None:
    """The highest step of the `step` events in an events.jsonl (None: none, or no file)."""
    return max((e["step"] for e in read_all(events) if e.get("event") == "step"), default=None) \
        if events.is_file() else None


def read_state(state_dir: Path, now: float | None = None) -> dict:
    """The stored state, or a fresh one. A state file that does not parse or does not hold a launch
    record is refused, never reset or repaired: a reset would restart the deadline (a longer cost cap)."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return {"launches": 0, "first_start": None, "deadline": 0, "starts": []}
    try:
        state = remote.load_file(path, 1 << 20)  # finite numbers, bounded integers
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e}); it holds the run's deadline and launch "
                         "count, so it is not reset") from None
    why = _not_a_record(state, time.time() if now is None else now)
    if why:
        raise ValueError(f"{path}: not a launch record ({why}); it holds the run's deadline, so it is not "
                         "reset or repaired: the run stops here")
    return state


def _not_a_record(state, now: float) -> str | None:
    """What is wrong with a launch record (None when sound): launches counts `starts`, a started run has
    its first start (in the past) and a deadline that is 0 (none) or after that start, as whole seconds."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, expected an object"
    launches, first, deadline, starts = (state.get(k) for k in ("launches", "first_start", "deadline", "starts"))
    if not (remote.is_int(launches) and 0 <= launches <= 100_000):
        return f"launches {repr(launches)[:20]} is not a count"
    if not (isinstance(starts, list) and len(starts) == launches and all(remote.is_number(t) for t in starts)):
        return f"starts is not a list of {launches} unix times"
    if not (remote.is_int(deadline) and deadline >= 0):
        return f"deadline {repr(deadline)[:20]} is not whole unix seconds"
    if launches == 0:
        return None if first is None else "first_start is set but nothing was launched"
    if not (remote.is_number(first) and 0 < first <= now + 86_400):
        return f"first_start {repr(first)[:20]} is not the unix time of a start"
    if deadline and deadline <= first:
        return f"deadline {deadline} is not after the first start {int(first)}"
    return None


def start(state_dir: Path, events: Path | None, deadline_s: float, t0: float | None = None) -> dict:
    """Count this start; return the state (with this launch's number and the run's deadline)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(state_dir)
    now = time.time()
    if state["launches"] and deadline_s > 0 and not state["deadline"]:
        raise ValueError(f"{state_dir / STATE_FILE}: records no deadline, but the run has a cap of {deadline_s:g} s: "
                         "not a launch record of this run; it is not reset: the run stops here")
    state["launches"] += 1
    if state["launches"] == 1:
        state["first_start"] = t0 or now
        state["deadline"] = int(state["first_start"] + deadline_s) if deadline_s > 0 else 0
    state["starts"].append(now)
    atomic_write_json(state_dir / STATE_FILE, state)
    if state["launches"] > 1 and events is not None:
        ev = EventWriter(events).emit(
            "preempted", launch=state["launches"], last_step=last_logged_step(events),
            message=f"launch {state['launches']}: the previous machine ended before the job did (a preemption or a "
                    "lost host); SkyPilot started it again on a new one")
        # stdout is the run block's `eval` input: the log stream gets the event on stderr
        print(LINE_PREFIX + dumps(ev), file=sys.stderr, flush=True)
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m job.managed", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start", help="count this launch, fix or read the deadline, print shell assignments")
    s.add_argument("--state", type=Path, required=True, help="the run's state folder in the bucket mount")
    s.add_argument("--events", type=Path, default=None, help="the run's events.jsonl (in the bucket)")
    s.add_argument("--deadline-s", type=float, default=0.0, help="the cap in seconds from the first start (0: none)")
    s.add_argument("--t0", type=float, default=None, help="when the first start began (setup's first line); default now")
    args = p.parse_args(argv)
    try:
        state = start(args.state, args.events, args.deadline_s, args.t0)
    except ValueError as e:
        _refused(args.events, f"job.managed: error: {e}")
        return EXIT_BAD_INPUT
    print(f"export SOCRATES_LAUNCH={int(state['launches'])}")
    if state["deadline"]:
        print(f"export SOCRATES_DEADLINE={int(state['deadline'])}")
    return 0


def _refused(events: Path | None, message: str) -> None:
    """One line on stderr, and an `error` event the launcher shows (the run block stops: set -e)."""
    try:
        ev = EventWriter(events).emit("error", message=message) if events is not None else make("error", message=message)
        print(LINE_PREFIX + dumps(ev), file=sys.stderr, flush=True)
    except OSError:
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
