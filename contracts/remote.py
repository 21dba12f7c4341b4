"""The one reader for what a machine sends: event lines, exit codes, manifests, metrics, cells, predict
lines, launch records. What comes back is data, never a command, and never the end of a healthy job.

- `loads`: JSON with finite numbers only (no NaN/Infinity, no 1e999), integers bounded (|n| < 2**63:
  a 5,000-digit integer is refused, not a ValueError three callers later), nesting bounded, size bounded.
- `Lines`: whole lines from a stream of chunks in bounded memory; a line over MAX_LINE is dropped (and
  counted) or cut, never held whole (a 1 GiB line costs MAX_LINE, not gigabytes).
- `clean`: text with every control character and terminal escape sequence removed (OSC 52 clipboard
  writes, screen clears, OSC 8 links, colours that forge a line), before anything reaches the terminal.
- `exit_code`: the integer an exit_code file holds, or None for anything else ('²', '1e9', '').
- `skipped`: lines refused on their way in are counted here; the launcher shows the count once at the
  end ("N lines from the machine were skipped").

Stdlib only: the job side (job/managed.py, before the venv exists) reads its launch record with it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

MAX_LINE = 1 << 20  # bytes (or characters) of one line: an event is a few KiB
MAX_DOC = 64 << 20  # bytes of one JSON file from the machine (metrics.json of 2,780 rows is ~100 KiB)
MAX_INT = 2 ** 63  # |n| below this: a step, a size, unix seconds; a 401-digit integer is no number of ours
MAX_DEPTH = 64  # nesting of a JSON value (json's own limit is a RecursionError at ~1,000)
CHUNK = 1 << 20  # bytes read at a time from a file that grows


class Refused(ValueError):
    """What came from the machine is not accepted; the message says why in a few words."""


# --- JSON --------------------------------------------------------------------------------------

def _constant(name: str) -> Any:
    raise Refused(f"{name} is not accepted (finite numbers only)")


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > 19:  # checked before int(): Python's own limit (4,300 digits) raises ValueError
        raise Refused(f"an integer of {digits} digits is not accepted (|n| < 2**63)")
    n = int(text)
    if abs(n) >= MAX_INT:
        raise Refused(f"an integer of {digits} digits is not accepted (|n| < 2**63)")
    return n


def _float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise Refused(f"{text[:20]} is not accepted (finite numbers only)")
    return x


def loads(text: str | bytes, max_bytes: int = MAX_DOC) -> Any:
    """JSON from the machine, or Refused (one line): too big, not JSON, not finite, too deep, huge integers."""
    if len(text) > max_bytes:
        raise Refused(f"{len(text):,} bytes, over the {max_bytes:,} accepted")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Refused(str(e)[:120]) from None
    try:
        obj = json.loads(text, parse_constant=_constant, parse_int=_int, parse_float=_float)
    except Refused:
        raise
    except RecursionError:
        raise Refused("nested too deep") from None
    except ValueError as e:
        raise Refused(str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from None  # json's own words
    if _depth(obj) > MAX_DEPTH:
        raise Refused(f"nested deeper than {MAX_DEPTH}")
    return obj


def _depth(obj: Any) -> int:
    """How deep `obj` nests (iterative: a deep value must not cost a RecursionError here)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def load_file(path: str | Path, max_bytes: int = MAX_DOC) -> Any:
    """A JSON file from the machine (read no further than `max_bytes` + 1), or Refused; OSError as is."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return loads(data, max_bytes)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -MAX_INT < v < MAX_INT


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool, bounded like `loads` bounds them (a run.json read by plain json
    may hold a 401-digit integer: comparing or formatting it as a float raises OverflowError)."""
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


# --- lines -------------------------------------------------------------------------------------

class Lines:
    """Whole lines out of a stream's chunks (bytes or str), each at most `limit` long, in bounded memory.

    A longer line is never held whole: with `cut=False` it is dropped and counted in `skipped`; with
    `cut=True` its first `limit + 1` units are handed on (a reader that counts lines, like the sky
    backend's reconnect, keeps its count; `events.parse_line` then refuses it as over-long)."""

    def __init__(self, limit: int = MAX_LINE, cut: bool = False):
        self.limit, self.cut = limit, cut
        self._parts: list = []
        self._size = 0
        self._over = False  # inside a line already over the limit
        self.pending = 0  # units since the last line's end (held, or dropped as over-long)

    def feed(self, chunk: bytes | str) -> list:
        nl = b"\n" if isinstance(chunk, bytes) else "\n"
        out, start = [], 0
        while (end := chunk.find(nl, start)) >= 0:
            self._add(chunk[start:end])
            if not self._over or self.cut:
                out.append(chunk[:0].join(self._parts))
            self._parts, self._size, self._over, self.pending = [], 0, False, 0
            start = end + 1
        if start < len(chunk):
            self._add(chunk[start:])
        return out

    def end(self) -> list:
        """The stream ended cleanly: its unterminated last line, if any (and not over-long)."""
        last = self._parts[0][:0].join(self._parts) if self._parts and (not self._over or self.cut) else None
        self._parts, self._size, self._over, self.pending = [], 0, False, 0
        return [last] if last else []

    def _add(self, piece: bytes | str) -> None:
        self.pending += len(piece)
        if self._over:
            return
        if self._size + len(piece) <= self.limit:
            if piece:
                self._parts.append(piece)
                self._size += len(piece)
            return
        self._over = True
        if self.cut:
            self._parts.append(piece[:self.limit + 1 - self._size])
        else:
            self._parts = []
            skipped.note(f"a line over {self.limit:,} bytes")


# --- text for the terminal ---------------------------------------------------------------------

# Escape sequences whole (CSI, OSC up to its terminator, DCS/SOS/PM/APC strings, 8-bit CSI/OSC), then any
# control character left (C0 but newline and tab, DEL, C1) and the bidi overrides that reorder what is shown.
_SEQUENCES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
                        r"|\x1b[PX^_][^\x1b\x9c]*(?:\x1b\\|\x9c)?|\x1b[ -/]*[0-~]?|\x9b[0-?]*[ -/]*[@-~]?"
                        r"|[\x9d\x90\x98\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """`text` as it may reach a terminal: no escape sequence, no control character but newline and tab."""
    return _CONTROLS.sub("", _SEQUENCES.sub("", text))


# --- exit codes --------------------------------------------------------------------------------

_EXIT = re.compile(r"-?[0-9]{1,3}")


def exit_code(text: str | bytes) -> int | None:
    """The exit status an exit_code file holds (ASCII digits, -255..255), or None for anything else."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    text = text.strip(" \t\r\n")
    if not _EXIT.fullmatch(text):
        return None
    code = int(text)
    return code if -255 <= code <= 255 else None


# --- what was refused --------------------------------------------------------------------------

class Skips:
    """How many lines from the machine were refused, and the first reason (shown once at the end)."""

    def __init__(self):
        self.count, self.first = 0, ""

    def note(self, why: str) -> None:
        self.count += 1
        self.first = self.first or clean(why)[:160]

    def reset(self) -> None:
        self.count, self.first = 0, ""

    def summary(self) -> str | None:
        if not self.count:
            return None
        lines = "line" if self.count == 1 else "lines"
        return f"{self.count} {lines} from the machine {'was' if self.count == 1 else 'were'} skipped " \
               f"(not accepted as events; the first: {self.first})"


skipped = Skips()
