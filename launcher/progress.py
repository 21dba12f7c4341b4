"""The progress display: a rich bar (step/total, loss, tokens/s, ETA, $ so far) and phase lines,
fed by the job's events; plain lines when stdout is not a terminal (CI, pipes, log files)."""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console

PHASES = ("provisioning", "syncing", "installing", "training", "evaluating", "downloading", "tearing down")


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

    def dollars(self) -> float | None:
        if self.price_per_hour is None:
            return None
        return self.price_per_hour * (time.time() - self.started_at) / 3600

    def on_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "step":
            self._step(ev)
        elif kind == "phase":
            self.line(f"[bold cyan]==>[/] {ev['phase']}" + (f": {ev['detail']}" if ev.get("detail") else ""))
        elif kind == "start":
            self.line(f"    job {ev['verb']} started")
        elif kind == "check":
            self.line(f"    check: {'ok' if ev['ok'] else 'FAILED'} " + _fmt_fields(ev, ("card", "gpu", "device", "reason")))
        elif kind == "prepare":
            self.line(f"    data: {ev['train_rows']} train rows, {ev['test_rows']} test rows")
        elif kind == "checkpoint":
            self.line(f"    checkpoint at step {ev['step']}")
        elif kind == "eval":
            metrics = ev.get("metrics") or {}
            shown = ", ".join(f"{k}={_num(v)}" for k, v in list(metrics.items())[:6] if not isinstance(v, (dict, list)))
            self.line(f"    eval: {shown}")
        elif kind == "artifact":
            self.line(f"    artifact {ev['path']} ({ev['size']} bytes)")
        elif kind == "done":
            self.line(f"    job done: {ev['reason']}")
        elif kind == "error":
            self.line(f"[bold red]    job error:[/] {ev['message']}")
        elif kind == "log":
            self.line(f"    {ev['message']}")

    def line(self, text: str) -> None:
        """A phase or status line, printed above the bar (or plain)."""
        if self.plain:
            self.console.print(text, highlight=False, soft_wrap=True)
        elif self._bar is not None:
            self._bar.console.print(text, highlight=False)
        else:
            self.console.print(text, highlight=False)

    def _step(self, ev: dict) -> None:
        self.last_step = ev
        cost = self.dollars()
        extras = (f"loss {_num(ev['loss'])}  {_num(ev['tokens_per_s'])} tok/s  ETA {_eta(ev['eta_s'])}"
                  + (f"  ${cost:.2f} so far" if cost is not None else ""))
        if self.plain:
            self.console.print(f"    step {ev['step']}/{ev['total_steps']}  {extras}", highlight=False, soft_wrap=True)
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
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _eta(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _fmt_fields(ev: dict, keys: tuple[str, ...]) -> str:
    return " ".join(f"{k}={ev[k]}" for k in keys if ev.get(k) is not None)
