"""The progress display: a rich bar (step/total, loss, tokens/s, ETA, $ so far) and phase lines,
fed by the job's events; plain lines when stdout is not a terminal (CI, pipes, log files)."""
from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.markup import escape as _escape

from contracts.remote import clean

class Progress:
    """`on_event(ev)` for every job or launcher event; `close()` at the end (idempotent)."""

    def __init__(self, console: Console | None = None, price_per_hour: float | None = None,
                 started_at: float | None = None, plain: bool | None = None):
        self.console = console or Console()
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self.price_per_hour = price_per_hour
        self.started_at = started_at or time.time()
        self.last_step: dict | None = None
        self._bar = None
        self._task = None

    def on_event(self, ev: dict) -> None:
        """Render one event. A recorded event is shown as it is, an odd value as '?' or verbatim:
        events.jsonl is read back by `logs` and may have been edited by hand."""
        if not isinstance(ev, dict):
            return
        kind = ev.get("event")
        v = lambda key: _text(ev.get(key))  # noqa: E731
        if kind == "step":
            self._step(ev)
        elif kind == "phase":
            self.line(f"[bold cyan]==>[/] {_escape(v('phase'))}" + (f": {_escape(v('detail'))}" if ev.get("detail") else ""))
        elif kind == "start":
            levers = ev.get("levers")
            shown = ", ".join(f"{_text(k)} {'on' if isinstance(lv, dict) and lv.get('on') is True else 'off'}"
                              for k, lv in levers.items()) if isinstance(levers, dict) else ""
            self.line(f"    job {_escape(v('verb'))} started" + (f" (speed levers: {_escape(shown)})" if shown else ""))
        elif kind == "check":
            ok = ev.get("ok")
            fields = " ".join(f"{k}={_text(ev[k])}" for k in ("card", "gpu", "device", "reason") if ev.get(k) is not None)
            self.line(f"    check: {'ok' if ok is True else 'FAILED' if ok is False else '?'} " + _escape(fields))
        elif kind == "prepare":
            self.line(f"    data: {_escape(v('train_rows'))} train rows, {_escape(v('test_rows'))} test rows")
        elif kind == "checkpoint":
            self.line(f"    checkpoint at step {_escape(v('step'))}")
        elif kind == "eval":
            metrics = ev.get("metrics")
            shown = _text(metrics) if not isinstance(metrics, dict) else ", ".join(
                f"{_text(k)}={_num(m)}" for k, m in list(metrics.items())[:6] if not isinstance(m, (dict, list)))
            self.line(f"    eval: {_escape(shown)}")
        elif kind == "artifact":
            self.line(f"    artifact {_escape(v('path'))} ({_escape(v('size'))} bytes)")
        elif kind == "done":
            self.line(f"    job done: {_escape(v('reason'))}")
        elif kind == "error":
            self.line(f"[bold red]    job error:[/] {_escape(v('message'))}")
        elif kind == "log":
            self.line(f"    {_escape(v('message'))}")
        elif kind == "preempted":
            self.line(f"[bold yellow]    preempted:[/] launch {_escape(v('launch'))} on a new machine "
                      f"(the last logged step was {_escape(v('last_step'))})")
        elif kind == "resume":
            self.line(f"    resumed from step {_escape(v('step'))} ({_escape(v('steps_lost'))} step(s) trained again)")

    def line(self, text: str) -> None:
        """A phase or status line, printed above the bar (the bar's console is this one) or plain; no control
        character reaches the terminal."""
        self.console.print(clean(text), highlight=False, soft_wrap=True if self.plain else None)

    def _step(self, ev: dict) -> None:
        self.last_step = ev
        cost = None if self.price_per_hour is None else self.price_per_hour * (time.time() - self.started_at) / 3600
        extras = (f"loss {_num(ev.get('loss'))}  {_num(ev.get('tokens_per_s'))} tok/s  ETA {_eta(ev.get('eta_s'))}"
                  + (f"  ${cost:.2f} so far" if cost is not None else ""))
        counts = all(isinstance(ev.get(k), int) and not isinstance(ev.get(k), bool) for k in ("step", "total_steps"))
        if self.plain or not counts:  # a bar needs whole numbers; anything else is a plain line
            self.line(_escape(f"    step {_text(ev.get('step'))}/{_text(ev.get('total_steps'))}  {extras}"))
            return
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn

            self._bar = Bar(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[extras]}"), console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=ev["total_steps"], extras="")
        self._bar.update(self._task, completed=ev["step"], total=ev["total_steps"], extras=extras)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else _text(v)


def _text(v: Any) -> str:
    """A recorded value as it is (missing: '?'), kept to one short line."""
    if v is None:
        return "?"
    text = " ".join(clean(str(v)).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _eta(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) \
            or not 0 <= seconds < 10 ** 9:  # about 30 years: anything longer is no estimate
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
