"""A real OpenSSH server on 127.0.0.1 for the SSH backend's tests.

`SshServer.start(tmp)` generates a host key and a client key in `tmp`, writes an sshd_config
(127.0.0.1 only, a free port, keys-only root login, authorized_keys in `tmp`) and runs
`/usr/sbin/sshd -D -f CONFIG`. Nothing is installed here: without sshd the tests skip
(`make sysdeps` installs openssh-server in CI).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def sshd_available() -> str | None:
    """None when a real sshd can run here, else why not (a skip reason)."""
    if not Path(SSHD).is_file():
        return "openssh-server is not installed (run `make sysdeps` as root)"
    if not shutil.which("ssh-keygen"):
        return "ssh-keygen is missing (openssh-client)"
    if os.geteuid() != 0:
        return "sshd needs root here (privilege separation dir /run/sshd)"
    return None


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "socrates-test", "-f", str(path)],
                   check=True, stdout=subprocess.DEVNULL)
    return path


@dataclass
class SshServer:
    root: Path
    port: int = 0
    host_key: Path = field(init=False)
    client_key: Path = field(init=False)
    known_hosts: Path = field(init=False)
    proc: subprocess.Popen | None = None
    extra_config: str = ""
    """More sshd_config lines (e.g. `SetEnv PATH=...` to put tools on the host's PATH)."""

    @classmethod
    def start(cls, root: Path, extra_config: str = "") -> "SshServer":
        root.mkdir(parents=True, exist_ok=True)
        srv = cls(root=root, port=free_port(), extra_config=extra_config)
        srv.host_key = keygen(root / "ssh_host_ed25519_key")
        srv.client_key = keygen(root / "client_key")
        shutil.copy(root / "client_key.pub", root / "authorized_keys")
        srv.known_hosts = root / "known_hosts"
        srv.known_hosts.write_text("")
        srv._write_config()
        srv._spawn()
        return srv

    @property
    def config(self) -> Path:
        return self.root / "sshd_config"

    def _write_config(self) -> None:
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "Subsystem sftp internal-sftp\n"
            "MaxSessions 50\n"
            "MaxStartups 50\n"
            "LogLevel ERROR\n"
            + self.extra_config
        )

    def _spawn(self) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.root / "sshd.log", "ab"))
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {(self.root / 'sshd.log').read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not listen within 10 s")

    def new_host_key(self) -> None:
        """Restart with a different host key: what a client sees when a host was replaced (or spoofed)."""
        self.stop()
        for p in (self.host_key, Path(f"{self.host_key}.pub")):
            p.unlink()
        keygen(self.host_key)
        self._spawn()

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listener), from /proc."""
        assert self.proc is not None
        kids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past "(comm)"
            if ppid == self.proc.pid:
                kids.append(int(pid))
        return kids

    def kill_sessions(self) -> int:
        """Drop every open SSH connection the hard way (SIGKILL the session processes)."""
        pids = self.session_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            for pid in self.session_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --- pytest fixtures (imported by tests/test_ssh_*.py) -----------------------------------------

import sys  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the "remote" python: on this machine the venv that has the job's deps


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    why = sshd_available()
    if why:
        pytest.skip(why)
    srv = SshServer.start(tmp_path_factory.mktemp("sshd"))
    yield srv
    srv.stop()


def ssh_backend(srv: SshServer, tmp: Path, run_block: str | None, **kw):
    """An SshBackend on `srv` as the SSH tests drive it: the server's keys, its host trusted, this machine's
    python as the remote one, the remote folder under `tmp`; `kw` overrides any option."""
    from launcher.backends.ssh import SshBackend

    opts = dict(key=str(srv.client_key), known_hosts=str(srv.known_hosts), trust_new_host=True, allow_cpu=True,
                remote_python=PYTHON, remote_dir=str(tmp / "remote"), poll_s=0.1)
    opts.update(kw)
    return SshBackend(f"ssh://root@127.0.0.1:{srv.port}", run_block=run_block, **opts)
