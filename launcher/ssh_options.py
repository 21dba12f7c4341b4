"""The SSH backend's options and `up` flags, kept apart from paramiko so `up --help` stays fast."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from contracts.errors import ContractError

DEFAULT_PORT = 22
DEFAULT_REMOTE_DIR = "~/.socrates-launch"
DEFAULT_IMAGE = "socrates-launch-job:latest"


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"


def parse_infra(infra: str) -> SshTarget:
    """`ssh://user@host[:port]` -> SshTarget; anything else is a one-line ContractError."""
    accepted = "ssh://USER@HOST[:PORT], e.g. ssh://root@gpu-box:2222"
    parts = urlsplit(infra)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ContractError(f"--infra {infra!r}: bad port (accepted: {accepted})") from None
    if parts.scheme != "ssh" or not parts.hostname or not parts.username or parts.path not in ("", "/") \
            or parts.password or parts.query or parts.fragment:
        raise ContractError(f"--infra {infra!r} is not accepted ({accepted})")
    return SshTarget(user=parts.username, host=parts.hostname, port=port)


@dataclass(frozen=True)
class SshOptions:
    """Everything the SSH backend needs besides the run; stored in the run record (no secrets)."""

    key: str | None = None
    """Private key file; None: the default keys in ~/.ssh and the agent."""
    known_hosts: str | None = None
    """known_hosts file; None: ~/.ssh/known_hosts."""
    trust_new_host: bool = False
    allow_cpu: bool = False
    remote_python: str | None = None
    """A python on the host that has the job's deps; None: the job image under docker, else the
    venv that sky/train.yaml's setup block builds from requirements/job.lock."""
    remote_dir: str = DEFAULT_REMOTE_DIR
    on_teardown: str | None = None
    """A local shell command run after teardown (e.g. a provider CLI that stops the instance)."""
    min_free_gb: float | None = None
    """Disk the host must have free under remote_dir; None: 1 GB with allow_cpu, else 60 GB."""
    image: str = DEFAULT_IMAGE
    """The job image: `up --image REF` / the config's image (pulled), else the lock's tag (built on the host)."""
    pull_image: bool = False
    """True: `image` is a registry reference to pull, never to build from the synced Dockerfile."""
    poll_s: float = 0.5
    reconnect_s: float = 300.0
    """How long follow/download keep retrying a dropped connection (down: at most 60 s) before giving up loudly."""
    timeout_s: float = 30.0
    """How long one SSH step (connect, a log read, a short command) may wait in silence before the connection
    counts as dropped (a host that went silent, not only one that closed); keepalives go every timeout_s/2."""

    def to_dict(self) -> dict:
        return asdict(self)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The SSH-only flags of `up` (other backends ignore them)."""
    g = p.add_argument_group("ssh (--infra ssh://user@host[:port])")
    g.add_argument("--ssh-key", metavar="PATH", help="private key for the host (default: ~/.ssh keys and the agent)")
    g.add_argument("--known-hosts", metavar="PATH", help="known_hosts file (default ~/.ssh/known_hosts)")
    g.add_argument("--trust-new-host", action="store_true",
                   help="accept and remember an unknown host key (a changed key is always refused)")
    g.add_argument("--remote-python", metavar="PATH", help="python on the host with the job's deps (default: the "
                   "job image under docker when the host has a GPU, else a venv built from requirements/job.lock)")
    g.add_argument("--remote-dir", metavar="DIR", default=DEFAULT_REMOTE_DIR,
                   help=f"where runs and the sync cache live on the host (default {DEFAULT_REMOTE_DIR})")
    g.add_argument("--on-teardown", metavar="CMD", help="local command run after teardown, e.g. a provider's stop CLI")
    g.add_argument("--min-free-gb", type=float, metavar="GB",
                   help="refuse a host with less free disk (default 60, or 1 with --allow-cpu)")


def options_from_args(args: argparse.Namespace) -> dict:
    """SshOptions fields from `up`'s flags, validated (exit 2 before anything exists)."""
    key = getattr(args, "ssh_key", None)
    if key and not Path(key).expanduser().is_file():
        raise ContractError(f"--ssh-key {key}: no such file (give a private key file)")
    min_free = getattr(args, "min_free_gb", None)
    if min_free is not None and not min_free >= 0:
        raise ContractError(f"--min-free-gb {min_free}: not accepted (a number >= 0)")
    remote_dir = getattr(args, "remote_dir", None) or DEFAULT_REMOTE_DIR
    if not remote_dir.startswith(("/", "~")):
        raise ContractError(f"--remote-dir {remote_dir!r}: not accepted (an absolute path or ~/...)")
    return SshOptions(
        key=str(Path(key).expanduser().resolve()) if key else None,
        known_hosts=getattr(args, "known_hosts", None), trust_new_host=bool(getattr(args, "trust_new_host", False)),
        allow_cpu=bool(getattr(args, "allow_cpu", False)), remote_python=getattr(args, "remote_python", None),
        remote_dir=remote_dir, on_teardown=getattr(args, "on_teardown", None), min_free_gb=min_free).to_dict()
