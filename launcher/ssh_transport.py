"""SSH plumbing for the SSH backend: a checked connection, remote commands, SFTP sync and tail.

Everything here speaks paramiko. Host keys are checked against a known_hosts file: an unknown key
is refused unless the caller trusts new hosts (then it is saved); a changed key is always refused.
Refusals and bad credentials are `ContractError` (one line, exit 2); a dropped or unreachable
connection is `SshDropped`, which callers retry.
"""
from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import shlex
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import paramiko

from contracts._io import sha256_file
from contracts.errors import ContractError
from launcher.ssh_options import SshTarget

# paramiko raises these (and plain OSErrors) when a connection dies under it.
DROPPED = (paramiko.SSHException, EOFError, socket.error, OSError)


class SshDropped(RuntimeError):
    """The connection could not be made or was lost; worth retrying."""


@dataclass(frozen=True)
class SshAuth:
    key: Path | None = None
    """Private key file; None: the default keys in ~/.ssh and the agent."""
    known_hosts: Path = field(default_factory=lambda: Path.home() / ".ssh" / "known_hosts")
    trust_new_host: bool = False
    timeout_s: float = 15.0


class _Refuse(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client, hostname, key):
        raise _UnknownHost(hostname, key)


class _UnknownHost(Exception):
    def __init__(self, hostname: str, key: paramiko.PKey):
        self.hostname, self.key = hostname, key


def fingerprint(key: paramiko.PKey) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def connect(target: SshTarget, auth: SshAuth) -> paramiko.SSHClient:
    """A connected, host-key-checked client. Bad key/user/host key: ContractError; network: SshDropped."""
    if auth.key is not None and not Path(auth.key).is_file():
        raise ContractError(f"--ssh-key {auth.key}: no such file (give a private key file)")
    client = paramiko.SSHClient()
    kh = Path(auth.known_hosts).expanduser()
    if kh.is_file():
        try:
            client.load_host_keys(str(kh))
        except (OSError, paramiko.SSHException) as e:
            raise ContractError(f"known_hosts {kh}: unreadable ({e})") from None
    client.set_missing_host_key_policy(_Refuse())
    kw = dict(hostname=target.host, port=target.port, username=target.user, timeout=auth.timeout_s,
              banner_timeout=auth.timeout_s, auth_timeout=auth.timeout_s)
    if auth.key is not None:
        kw.update(key_filename=str(auth.key), look_for_keys=False, allow_agent=False)
    try:
        client.connect(**kw)
    except (_UnknownHost, paramiko.SSHException, OSError, EOFError) as e:
        client.close()
        if isinstance(e, _UnknownHost):
            if not auth.trust_new_host:
                raise ContractError(
                    f"ssh {target}: host key {e.key.get_name()} {fingerprint(e.key)} is not in {kh}; "
                    "check it and pass --trust-new-host to accept it") from None
            kh.parent.mkdir(parents=True, exist_ok=True)
            with open(kh, "a", encoding="utf-8") as f:
                f.write(f"{target.known_hosts_name} {e.key.get_name()} {e.key.get_base64()}\n")
            return connect(target, SshAuth(auth.key, kh, False, auth.timeout_s))
        if isinstance(e, paramiko.BadHostKeyException):
            raise ContractError(
                f"ssh {target}: host key CHANGED ({fingerprint(e.key)}, {kh} has {fingerprint(e.expected_key)}); "
                f"refusing: if the host was really replaced, remove its line from {kh}") from None
        if isinstance(e, paramiko.PasswordRequiredException):  # an AuthenticationException: asked first
            raise ContractError(f"--ssh-key {auth.key}: key is passphrase-protected (load it into ssh-agent "
                                "and leave --ssh-key out)") from None
        if isinstance(e, paramiko.AuthenticationException):
            who = f"key {auth.key}" if auth.key else "the default keys/agent"
            raise ContractError(f"ssh {target}: authentication refused for user {target.user!r} with {who} "
                                "(accepted: a user whose authorized_keys holds --ssh-key's public key)") from None
        if isinstance(e, paramiko.SSHException) and "not a valid" in str(e).lower():
            raise ContractError(f"--ssh-key {auth.key}: not a private key ({e})") from None
        raise SshDropped(f"ssh {target}: {type(e).__name__}: {e}") from None
    # keepalives keep NATs and idle timers from cutting a quiet connection; the read timeouts (SFTP channel,
    # commands) are what notice a host that went silent
    client.get_transport().set_keepalive(max(1, int(auth.timeout_s / 2)))
    return client


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run(client: paramiko.SSHClient, command: str, stdin: str | None = None, timeout: float = 600) -> Result:
    """Run `command` on the host and wait for it. `stdin` is sent and closed (secrets go this way)."""
    try:
        chan = client.get_transport().open_session(timeout=30)
        chan.settimeout(timeout)
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin.encode())
        chan.shutdown_write()
        out, err = chan.makefile("rb").read(), chan.makefile_stderr("rb").read()
        rc = chan.recv_exit_status()
        chan.close()
    except DROPPED as e:
        raise SshDropped(f"{type(e).__name__}: {e}") from None
    return Result(rc, out.decode(errors="replace"), err.decode(errors="replace"))


# --- sync: SFTP, skipping files whose size and sha256 already match ---------------------------

@dataclass
class SyncStats:
    files_sent: int = 0
    bytes_sent: int = 0
    files_skipped: int = 0
    bytes_skipped: int = 0
    files_removed: int = 0

    def add(self, other: "SyncStats") -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


# One remote command lists size + sha256 of every file under a folder (python3: any host has one).
_HASH_SCRIPT = r"""
import hashlib, json, os, sys
root = sys.argv[1]; out = {}
for d, _, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n); h = hashlib.sha256()
        with open(p, 'rb') as f:
            for b in iter(lambda: f.read(1 << 20), b''): h.update(b)
        out[os.path.relpath(p, root)] = [os.path.getsize(p), h.hexdigest()]
print(json.dumps(out))
"""


def local_files(root: Path, subdirs: Iterable[str], skip=("__pycache__", ".pyc")) -> dict[str, Path]:
    """rel posix path -> local path for every file under root/<subdir> (or root/<file>)."""
    files: dict[str, Path] = {}
    for sub in subdirs:
        p = root / sub
        if p.is_file():
            files[sub] = p
            continue
        for f in sorted(p.rglob("*")):
            if f.is_file() and not any(s in f.as_posix() for s in skip):
                files[f.relative_to(root).as_posix()] = f
    return files


def remote_hashes(client: paramiko.SSHClient, remote_root: str, python: str = "python3") -> dict[str, list]:
    res = run(client, f"{shlex.quote(python)} - {shlex.quote(remote_root)}", stdin=_HASH_SCRIPT)
    if res.rc != 0:
        raise SshDropped(f"hashing {remote_root} on the host failed: {res.err.strip()[-300:]}")
    return json.loads(res.out or "{}")


def sync_tree(client: paramiko.SSHClient, files: dict[str, Path], remote_root: str,
              python: str = "python3", prune: bool = False) -> SyncStats:
    """Upload `files` under remote_root, sending only those whose size or sha256 differ."""
    stats = SyncStats()
    have = remote_hashes(client, remote_root, python)
    sftp = client.open_sftp()
    try:
        made: set[str] = set()
        for rel, path in files.items():
            size = path.stat().st_size
            if have.get(rel) == [size, sha256_file(path)]:
                stats.files_skipped += 1
                stats.bytes_skipped += size
                continue
            dest = posixpath.join(remote_root, rel)
            _mkdirs(sftp, posixpath.dirname(dest), made)
            sftp.put(str(path), f"{dest}.part", confirm=True)
            # rename, not overwrite: a run that hard-linked the old file keeps its own copy
            sftp.posix_rename(f"{dest}.part", dest)
            stats.files_sent += 1
            stats.bytes_sent += size
        if prune:
            for rel in sorted(set(have) - set(files)):
                sftp.remove(posixpath.join(remote_root, rel))
                stats.files_removed += 1
    except DROPPED as e:
        raise SshDropped(f"sync to {remote_root}: {type(e).__name__}: {e}") from None
    finally:
        sftp.close()
    return stats


def _mkdirs(sftp: paramiko.SFTPClient, path: str, made: set[str]) -> None:
    if not path or path in made or path == "/":
        return
    try:
        sftp.stat(path)
    except FileNotFoundError:
        _mkdirs(sftp, posixpath.dirname(path), made)
        sftp.mkdir(path)
    made.add(path)


def get_tree(sftp: paramiko.SFTPClient, remote: str, local: Path, skip: tuple[str, ...] = ()) -> int:
    """Copy the remote folder `remote` into `local` (minus top-level names in `skip`); returns bytes received.

    The server's listing is untrusted: a name that is not one plain path component (empty, `.`, `..`,
    with `/`, `\\` or NUL) or an entry that is a symlink or special file fails the download with
    SshUnsafe, so nothing is ever written outside `local` and no link is ever created.
    """
    local.mkdir(parents=True, exist_ok=True)
    total = 0
    for entry in sftp.listdir_attr(remote):
        name = entry.filename
        if name in skip:
            continue
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
            raise SshUnsafe(f"{remote}: the server listed a file name that is not accepted: {name!r}")
        src, dst = posixpath.join(remote, name), local / name
        mode = entry.st_mode or 0
        if stat.S_ISDIR(mode):
            total += get_tree(sftp, src, dst)
        elif stat.S_ISREG(mode):
            sftp.get(src, str(dst))
            total += entry.st_size
        else:
            raise SshUnsafe(f"{src}: a symlink or special file is not accepted in what comes back")
    return total


class SshUnsafe(ValueError):
    """The server sent something that must not be written locally (a hostile name, a link)."""


def read_from(sftp: paramiko.SFTPClient, path: str, offset: int, limit: int = 4 << 20) -> bytes:
    """Bytes of a remote file from `offset` (empty if it does not exist yet)."""
    try:
        with sftp.open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def env_exports(envs: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in envs.items())
