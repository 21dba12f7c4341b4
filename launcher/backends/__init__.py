"""Backends (local, sky, managed, ssh) implement `launcher.backends.base.Backend`; verbs don't know which.

`for_plan(infra, options)` maps `--infra` (local | sky | ssh://user@host[:port]) and the run's
options to one, importing only that backend's module (the sky backends import SkyPilot lazily, the
ssh one paramiko). A new backend is one more row in BACKENDS (and a line in `kind_of`).
"""
from __future__ import annotations

import importlib
from typing import Any

from contracts.errors import ContractError
from launcher.registry import Damaged, Run, RunOptions, check_infra

# kind -> "module:Class", imported only when that kind is used.
BACKENDS: dict[str, str] = {
    "local": "launcher.backends.local:LocalBackend",
    "sky": "launcher.backends.sky:SkyBackend",
    "ssh": "launcher.backends.ssh:SshBackend",
    "managed": "launcher.backends.managed:ManagedBackend",  # sky with --spot/--managed: SkyPilot managed jobs
}


def kind_of(infra: str, options: RunOptions) -> str:
    """Which backend serves `infra` with these options: a key of BACKENDS."""
    check_infra(infra)
    if infra == "sky" and options.managed_job:
        return "managed"
    return "ssh" if infra.startswith("ssh://") else infra


def backend_class(kind: str) -> type:
    module, _, attr = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def for_plan(infra: str, options: RunOptions, own: dict | None = None):
    """The backend a new run launches on, with its own options from the plan (ssh's: `options.ssh`)."""
    cls, own = backend_class(kind_of(infra, options)), options.ssh if own is None else own
    return cls(infra, **(own or {})) if infra.startswith("ssh://") else cls()


def for_run(run: Run):
    """The backend of a recorded run, picking it up from run.json (nothing a record must not decide,
    such as a command to run, is taken from it: without own options, ssh restores them from its record)."""
    return for_plan(run.infra, run.options, own={})


def end_by_hand(handles: Any) -> str | None:
    """For a damaged run.json: the command that ends its machine, from its backend_state alone."""
    if not isinstance(handles, dict):
        return None
    for kind in BACKENDS:
        try:
            hint = backend_class(kind).end_by_hand(handles)
        except ContractError:  # an optional extra that is not installed (paramiko)
            continue
        if hint:
            return hint
    return None


def damage_line(record: Damaged) -> str:
    """A damaged record's line, with what ends its machine by hand where its handles say."""
    by_hand = end_by_hand(record.handles)
    return f"{record.error} ({by_hand})" if by_hand else record.error
