"""The remote deadline: run a command so it ends by a wall-clock time, with or without the laptop.

    python -m job.deadline --at UNIX_TS --grace 300 [--events out/events.jsonl] -- CMD ARGS...

The command gets SOCRATES_DEADLINE=UNIX_TS in its environment: the train job checks it at every
step boundary, saves the adapter and manifest, and ends with `done` reason `deadline`. This wrapper
is the hard stop behind that: if the command still runs `grace` seconds after the deadline (a hung
step, an evaluation that ignores the time), its whole process group gets SIGTERM, then SIGKILL
`KILL_AFTER_S` later; SkyPilot's autodown then releases the machine. `--at 0` runs the command
unwrapped. Exit code: the command's own, or 124 (like `timeout`) when this wrapper ended it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from contracts.errors import EXIT_BAD_INPUT
from contracts.events import EventWriter

EXIT_DEADLINE = 124
KILL_AFTER_S = 15.0
POLL_S = 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m job.deadline", description=__doc__.splitlines()[0])
    p.add_argument("--at", type=float, required=True, help="unix seconds; 0 or less: no deadline")
    p.add_argument("--grace", type=float, default=300.0, help="seconds after the deadline before the hard kill")
    p.add_argument("--kill-after", type=float, default=KILL_AFTER_S, help="seconds from SIGTERM to SIGKILL")
    p.add_argument("--events", type=Path, help="events.jsonl to record the hard kill in")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("job.deadline: error: no command given (python -m job.deadline --at TS -- CMD ...)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.grace < 0:
        print(f"job.deadline: error: --grace {args.grace:g} is not accepted (seconds >= 0)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_until(cmd, args.at, args.grace, args.events, args.kill_after)


def run_until(cmd: list[str], at: float, grace: float, events: Path | None = None,
              kill_after: float = KILL_AFTER_S) -> int:
    """Run `cmd` in its own process group; end the group once `at + grace` has passed."""
    env = dict(os.environ)
    if at > 0:
        env["SOCRATES_DEADLINE"] = str(int(at))
    # Its own session, so the hard stop can end the job's whole group and not this wrapper; and tied
    # to this wrapper's life, so a SIGKILL of the wrapper (a backend's teardown) ends the job too.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    # A cancel (SkyPilot's or Ctrl-C) reaches the whole group, not only this wrapper.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: _signal_group(proc, s))
    hard_stop = at + grace if at > 0 else None
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=POLL_S)
        if hard_stop is not None and time.time() >= hard_stop:
            break
    if events is not None:
        try:
            EventWriter(events, echo=True).emit("log", message=f"deadline: still running {grace:g} s after {int(at)}; "
                                                f"sending SIGTERM, SIGKILL in {kill_after:g} s")
        except OSError:
            pass  # the kill matters more than the note
    print(f"job.deadline: deadline passed {grace:g} s ago; stopping the job (SIGTERM, then SIGKILL)", file=sys.stderr, flush=True)
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    return EXIT_DEADLINE


def _die_with_parent(parent: int):
    """A preexec hook: the child gets SIGKILL when its parent dies (Linux prctl; elsewhere a no-op)."""
    def hook() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return hook


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


if __name__ == "__main__":
    sys.exit(main())
