"""Backends (local, sky, ssh) implement `launcher.backends.base.Backend`; verbs don't know which.

`get_backend(infra)` maps `--infra` (local | sky | ssh://user@host[:port]) to one, importing only
that backend's module (the sky backend imports SkyPilot lazily, the ssh one paramiko).
"""
from __future__ import annotations

from typing import Any

from contracts.errors import ContractError

INFRAS = "local | sky | ssh://user@host[:port]"


def known_infra(infra: str) -> bool:
    """Whether `infra` names a backend."""
    return infra in ("local", "sky") or (infra.startswith("ssh://") and len(infra) > len("ssh://"))


def check_infra(infra: str) -> str:
    """`infra` if it names a backend, else ContractError (exit 2, before anything is created)."""
    if known_infra(infra):
        return infra
    raise ContractError(f"--infra {infra!r}: unknown infrastructure (accepted: {INFRAS})")


def get_backend(infra: str, **opts: Any):
    check_infra(infra)
    if infra == "local":
        from launcher.backends.local import LocalBackend

        return LocalBackend(**opts)
    if infra == "sky":
        from launcher.backends.sky import SkyBackend

        return SkyBackend(**opts)
    from launcher.backends.ssh import SshBackend  # the SSH engineer's backend (issue #6)

    return SshBackend(infra, **opts)
