"""Backends (local, sky, ssh) implement `launcher.backends.base.Backend`; verbs don't know which.

`get_backend(infra)` maps `--infra` (local | sky | ssh://user@host[:port]) to one, importing only
that backend's module (the sky backend imports SkyPilot lazily, the ssh one paramiko). Which class
serves a run is `kind_of(infra, options)`; a backend's own options (from the plan) are
`options[kind]`. A new backend is one more row in BACKENDS (and a line in `kind_of`).
"""
from __future__ import annotations

import importlib
from typing import Any

from contracts.errors import ContractError

INFRAS = "local | sky | ssh://user@host[:port]"
# kind -> "module:Class", imported only when that kind is used.
BACKENDS: dict[str, str] = {
    "local": "launcher.backends.local:LocalBackend",
    "sky": "launcher.backends.sky:SkyBackend",
    "ssh": "launcher.backends.ssh:SshBackend",
    "managed": "launcher.backends.managed:ManagedBackend",  # sky with --spot/--managed: SkyPilot managed jobs
}


def known_infra(infra: str) -> bool:
    """Whether `infra` names a backend."""
    return infra in ("local", "sky") or (infra.startswith("ssh://") and len(infra) > len("ssh://"))


def check_infra(infra: str) -> str:
    """`infra` if it names a backend, else ContractError (exit 2, before anything is created)."""
    if known_infra(infra):
        return infra
    raise ContractError(f"--infra {infra!r}: unknown infrastructure (accepted: {INFRAS})")


def kind_of(infra: str, options: dict | None = None) -> str:
    """Which backend serves `infra` (and the run's options): a key of BACKENDS."""
    check_infra(infra)
    if infra == "sky" and (options or {}).get("managed_job"):
        return "managed"
    return "ssh" if infra.startswith("ssh://") else infra


def backend_class(kind: str) -> type:
    module, _, attr = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def get_backend(infra: str, options: dict | None = None, **opts: Any):
    """The backend for `infra`; `opts` are its own options (none: restored from the run record)."""
    cls = backend_class(kind_of(infra, options))
    return cls(infra, **opts) if infra.startswith("ssh://") else cls(**opts)


def for_plan(infra: str, options: dict):
    """The backend a new run launches on: its own options are the plan's `options[kind]`."""
    kind = kind_of(infra, options)
    return get_backend(infra, options, **dict(options.get(kind) or {}))


def for_run(run: Any):
    """The backend of a recorded run, picking it up from run.json (nothing a record must not decide,
    such as a command to run, is taken from it)."""
    return get_backend(run.infra, run.options)


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
