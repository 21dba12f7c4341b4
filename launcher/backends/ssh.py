"""Bring your own GPU host: the SSH backend (`--infra ssh://user@host[:port]`).

What `launch` does on the host, in order, each step before anything costs more:
    probe      the remote folder is writable and its disk has room        (else exit 2, nothing started)
    sync       code + data into a persistent cache over SFTP, sending only files whose size or
               sha256 differ (bytes counted into the run's backend_state["sync"])
    check      `python -m job check` against the run's config             (exit 2/3 -> refused)
    start      the run block, detached in its own session (setsid), in the job image with
               `docker run --gpus all` when the host has docker and a GPU, else with a python
               that has the job's deps (--remote-python, or a venv built from requirements/job.lock)
`follow` tails out/events.jsonl over SFTP from the last byte read, reconnecting when the
connection drops; `down` kills the job's process group, removes the run's folder, then runs the
`--on-teardown` command locally and records whether it worked.

Remote layout (REMOTE_DIR defaults to ~/.socrates-launch):
    REMOTE_DIR/cache/          synced code and data, kept between runs so unchanged files aren't resent
    REMOTE_DIR/runs/<run-id>/  one run: code hard-linked from the cache, out/, job.log, job.pid, exit_code
"""
from __future__ import annotations

import argparse
import posixpath
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import paramiko

from contracts import events as ev
from contracts.errors import ContractError
from launcher.backends.base import Backend, BackendError, EventCallback
from launcher.ssh_transport import (
    DROPPED, SshAuth, SshDropped, SshTarget, SyncStats, connect, env_exports, get_tree, local_files,
    parse_infra, read_from, run as ssh_run, secret_envs, sync_tree,
)

REPO = Path(__file__).resolve().parents[2]
CODE_PATHS = ("contracts", "job", "configs", "sky", "requirements/job.lock", "Dockerfile")
DEFAULT_IMAGE = "socrates-launch-job:latest"
RECONNECT_FOR_S = 300.0
"""How long follow/down keep retrying a dropped connection before they give up (loudly)."""


@dataclass(frozen=True)
class SshOptions:
    """Everything the SSH backend needs besides the run; all of it is stored in the run record."""

    infra: str
    key: str | None = None
    known_hosts: str | None = None
    trust_new_host: bool = False
    allow_cpu: bool = False
    remote_python: str | None = None
    """A python on the host that has the job's deps; None: docker, else a venv from the lock."""
    remote_dir: str = "~/.socrates-launch"
    on_teardown: str | None = None
    """A local shell command run after teardown (e.g. a provider CLI that stops the instance)."""
    min_free_gb: float | None = None
    """Disk the host must have free under remote_dir; None: 1 GB with allow_cpu, else 60 GB."""
    image: str = DEFAULT_IMAGE
    poll_s: float = 0.5

    def auth(self) -> SshAuth:
        kh = Path(self.known_hosts).expanduser() if self.known_hosts else Path.home() / ".ssh" / "known_hosts"
        return SshAuth(key=Path(self.key).expanduser() if self.key else None, known_hosts=kh,
                       trust_new_host=self.trust_new_host)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The SSH-only flags of `up` (ignored by other backends)."""
    g = p.add_argument_group("ssh (--infra ssh://user@host[:port])")
    g.add_argument("--ssh-key", metavar="PATH", help="private key for the host (default: ~/.ssh keys, agent)")
    g.add_argument("--known-hosts", metavar="PATH", help="known_hosts file (default ~/.ssh/known_hosts)")
    g.add_argument("--trust-new-host", action="store_true",
                   help="accept and remember an unknown host key (a changed key is always refused)")
    g.add_argument("--remote-python", metavar="PATH", help="python on the host with the job's deps "
                   "(default: the job image under docker, else a venv built from requirements/job.lock)")
    g.add_argument("--remote-dir", metavar="DIR", default="~/.socrates-launch", help="where runs live on the host")
    g.add_argument("--on-teardown", metavar="CMD", help="local command run after teardown, e.g. a provider's stop")
    g.add_argument("--min-free-gb", type=float, metavar="GB", help="refuse a host with less free disk")


def options_from_args(infra: str, args: argparse.Namespace) -> SshOptions:
    return SshOptions(
        infra=infra, key=getattr(args, "ssh_key", None), known_hosts=getattr(args, "known_hosts", None),
        trust_new_host=bool(getattr(args, "trust_new_host", False)), allow_cpu=bool(getattr(args, "allow_cpu", False)),
        remote_python=getattr(args, "remote_python", None),
        remote_dir=getattr(args, "remote_dir", None) or "~/.socrates-launch",
        on_teardown=getattr(args, "on_teardown", None), min_free_gb=getattr(args, "min_free_gb", None))


class SshBackend(Backend):
    name = "ssh"

    def __init__(self, options: SshOptions, run_block: str | None = None, code_root: Path = REPO):
        self.opts = options
        self.target: SshTarget = parse_infra(options.infra)
        self.run_block = run_block
        """Bash run for the job; None: the run block shared with the other backends (see `_run_block`)."""
        self.code_root = code_root
        self.reconnects = 0
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @classmethod
    def from_state(cls, state: dict) -> "SshBackend":
        """Rebuild the backend from a run record's backend_state (after a launcher restart)."""
        return cls(SshOptions(**state["options"]))

    # --- lifecycle ------------------------------------------------------------------------

    def launch(self, run: Any) -> None:
        config_text, data = _run_inputs(run)
        state = run.backend_state
        state.update(kind="ssh", options=asdict(self.opts), target=str(self.target))
        _save(run)
        client = self._connect()
        base = self._resolve_remote_dir(client)
        work = posixpath.join(base, "runs", run.id)
        state.update(remote_dir=base, work=work, events=posixpath.join(work, "out", ev.EVENTS_FILE))
        _save(run)  # saved before anything exists on the host: `down` can always find it

        self._phase(run, "probing", f"{self.target}: disk and permissions under {base}")
        mode, python = self._probe(client, base, data)
        state.update(mode=mode, python=python, run_id=run.id)
        self._phase(run, "syncing", f"code and data to {self.target}")
        stats = self._sync(client, base, data)
        state["sync"] = asdict(stats)
        _save(run)
        if mode == "venv":
            self._phase(run, "installing", "a venv from requirements/job.lock on the host (once per lock)")
            self._ensure_venv(client, base)
        self._prepare_work(client, base, work, config_text, data, mode, run.id)
        self._phase(run, "checking", "python -m job check on the host")
        self._check(client, work, mode, python)
        self._phase(run, "starting", f"the job, detached, in {work}")
        pid, pgid = self._start(client, work, run.id, python if mode != "docker" else None)
        state.update(pid=pid, pgid=pgid, started_at=time.time())
        _save(run)

    def follow(self, run: Any, on_event: EventCallback, offset: int = 0) -> int:
        """Stream events from `offset`; a dropped connection reconnects and resumes at the last byte read."""
        state = run.backend_state
        events_path, work = state["events"], state["work"]
        exit_path = posixpath.join(work, "exit_code")
        while True:
            try:
                sftp = self._sftp_client()
                data = read_from(sftp, events_path, offset)
                batch, used = ev.parse_chunk(data)
                for e in batch:
                    on_event(e)
                offset += used
                state["events_offset"] = offset
                if used:
                    continue  # more may be waiting; read again before sleeping
                rc = _read_int(sftp, exit_path)
                if rc is not None:
                    tail = read_from(sftp, events_path, offset)
                    for e in ev.parse_chunk(tail)[0]:
                        on_event(e)
                    state["events_offset"] = offset + ev.parse_chunk(tail)[1]
                    state["exit_code"] = rc
                    _save(run)
                    return rc
                if not self._alive(state.get("pgid")):
                    # the job died without its wrapper writing exit_code (killed -9, host rebooted)
                    if _read_int(self._sftp_client(), exit_path) is None:
                        state["exit_code"] = 137
                        _save(run)
                        return 137
                time.sleep(self.opts.poll_s)
            except (SshDropped, *DROPPED) as e:
                self._drop()
                self.reconnects += 1
                state["reconnects"] = state.get("reconnects", 0) + 1
                on_event(ev.make("log", message=f"ssh connection lost ({type(e).__name__}); reconnecting, "
                                 f"resuming at byte {offset}", source="launcher"))
                self._client_or_wait()

    def download(self, run: Any, dest: Path) -> None:
        state = run.backend_state
        remote_out = posixpath.join(state["work"], "out")
        for attempt in range(3):
            try:
                state["bytes_downloaded"] = get_tree(self._sftp_client(), remote_out, Path(dest))
                _save(run)
                return
            except FileNotFoundError:
                raise BackendError("download", f"{self.target}:{remote_out} does not exist (run torn down?)") from None
            except (SshDropped, *DROPPED):
                self._drop()
                if attempt == 2:
                    raise BackendError("download", f"{self.target}: connection kept dropping") from None
                self._client_or_wait()

    def down(self, run: Any) -> None:
        """Kill the job's process group, remove the run's folder, run --on-teardown. Idempotent."""
        state = run.backend_state
        if state.get("torn_down"):
            return
        error = None
        work = state.get("work")
        if work:
            try:
                self._client_or_wait(timeout=60)
                self._kill_and_remove(state, work)
            except (SshDropped, *DROPPED) as e:
                pg = state.get("pgid")
                error = (f"could not reach {self.target} to tear down ({e}); the job may still run there: "
                         f"ssh -p {self.target.port} {self.target.user}@{self.target.host} "
                         f"'kill -9 -- -{pg}; rm -rf {work}'" if pg else f"ssh ... 'rm -rf {work}'")
        state["remote_clean"] = error is None
        if self.opts.on_teardown and not state.get("on_teardown", {}).get("ok"):
            state["on_teardown"] = _run_hook(self.opts.on_teardown)
        state["torn_down"] = error is None and state.get("on_teardown", {}).get("ok", True)
        _save(run)
        self._drop()
        if error:
            raise BackendError("down", error)
        hook = state.get("on_teardown")
        if hook and not hook["ok"]:
            raise BackendError("down", f"--on-teardown {self.opts.on_teardown!r} exited {hook['rc']}: "
                               f"{hook['output'][-200:]} (the host may still be running; stop it yourself)")

    def machine_state(self, run: Any) -> str:
        state = run.backend_state
        if state.get("torn_down"):
            return "gone"
        if not state.get("work"):
            return "gone"
        try:
            client = self._connect()
            res = ssh_run(client, f"test -d {shlex.quote(state['work'])} && echo yes || echo no")
            alive = self._alive(state.get("pgid"))
        except (SshDropped, *DROPPED):
            return "unknown"
        return "up" if (res.out.strip() == "yes" or alive) else "gone"

    def logs_text(self, run: Any, tail: int = 200) -> str:
        """The last lines of the job's stdout/stderr on the host."""
        work = run.backend_state["work"]
        res = ssh_run(self._connect(), f"tail -n {int(tail)} {shlex.quote(posixpath.join(work, 'job.log'))}")
        return res.out

    # --- launch steps ---------------------------------------------------------------------

    def _resolve_remote_dir(self, client: paramiko.SSHClient) -> str:
        d = self.opts.remote_dir
        if d.startswith("~"):
            res = ssh_run(client, "printf %s \"$HOME\"")
            d = res.out.strip() + d[1:]
        if not d.startswith("/"):
            raise ContractError(f"--remote-dir {self.opts.remote_dir!r}: not accepted (an absolute path or ~/...)")
        return posixpath.normpath(d)

    def _probe(self, client: paramiko.SSHClient, base: str, data: Path | None) -> tuple[str, str]:
        """Writable folder, free disk, how to run the job. Refuses (exit 2) before anything starts."""
        need_gb = self.opts.min_free_gb if self.opts.min_free_gb is not None else (1.0 if self.opts.allow_cpu else 60.0)
        data_bytes = _size(data) if data else 0
        q = shlex.quote(base)
        res = ssh_run(client, (
            f"mkdir -p {q} 2>&1 && t={q}/.write-test.$$ && : > \"$t\" 2>&1 && rm -f \"$t\" && "
            f"echo WRITABLE && df -Pk {q} | tail -1 | awk '{{print \"FREE_KB\", $4}}'; "
            "command -v docker >/dev/null && echo HAS_DOCKER; "
            "command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && echo HAS_GPU; "
            "command -v python3 >/dev/null && echo HAS_PYTHON3"))
        lines = res.out.splitlines()
        if "WRITABLE" not in lines:
            why = (res.out + res.err).strip().splitlines()
            raise ContractError(f"ssh {self.target}: remote dir {base} is not writable "
                                f"({why[0] if why else 'mkdir/write failed'}); pick another with --remote-dir")
        free_kb = next((int(x.split()[1]) for x in lines if x.startswith("FREE_KB ")), 0)
        free_gb = free_kb / 2**20
        if free_gb < need_gb + data_bytes / 2**30:
            raise ContractError(f"ssh {self.target}: only {free_gb:.2f} GB free under {base}; the run needs "
                                f"{need_gb + data_bytes / 2**30:.2f} GB (free disk or use --remote-dir / --min-free-gb)")
        if "HAS_PYTHON3" not in lines and not self.opts.remote_python:
            raise ContractError(f"ssh {self.target}: no python3 on the host (install it or give --remote-python)")
        if self.opts.remote_python:
            return "python", self.opts.remote_python
        if "HAS_DOCKER" in lines and "HAS_GPU" in lines:
            return "docker", "python"
        if "HAS_GPU" not in lines and not self.opts.allow_cpu:
            raise ContractError(f"ssh {self.target}: no GPU found (nvidia-smi -L failed); "
                                "pass --allow-cpu for a CPU-only run")
        return "venv", posixpath.join(base, "venv", "bin", "python")

    def _sync(self, client: paramiko.SSHClient, base: str, data: Path | None) -> SyncStats:
        stats = sync_tree(client, local_files(self.code_root, [p for p in CODE_PATHS if (self.code_root / p).exists()]),
                          posixpath.join(base, "cache", "code"), prune=True)
        if data is not None:
            files = local_files(data.parent, [data.name])
            stats.add(sync_tree(client, files, posixpath.join(base, "cache", "data")))
        return stats

    def _prepare_work(self, client: paramiko.SSHClient, base: str, work: str, config_text: str,
                      data: Path | None, mode: str, run_id: str) -> None:
        q = shlex.quote
        run_block = _run_block(data) if self.run_block is None else self.run_block
        launch = "bash ./run_block.sh"
        if mode == "docker":
            # secrets by name only (-e NAME): docker copies them from the environment, never argv
            envs = " ".join(f"-e {k}" for k in [*self._envs(run_id, "/work"), *secret_envs()])
            launch = (f"docker run --rm --gpus all --name socrates-{q(run_id)} -v \"$PWD\":/work -w /work "
                      f"{envs} -e PYTHONPATH=/work --entrypoint bash {q(self.opts.image)} ./run_block.sh")
        res = ssh_run(client, f"rm -rf {q(work)} && mkdir -p {q(posixpath.dirname(work))} && "
                              f"cp -al {q(posixpath.join(base, 'cache', 'code'))} {q(work)} && mkdir -p {q(work)}/out")
        if res.rc != 0:
            raise BackendError("sync", f"could not create {work}: {res.err.strip()[-300:]}")
        sftp = client.open_sftp()
        try:
            for name, text in (("run_config.yaml", config_text), ("run_block.sh", run_block),
                               ("runner.sh", _RUNNER.format(launch=launch))):
                with sftp.open(posixpath.join(work, name), "w") as f:
                    f.write(text)
        finally:
            sftp.close()

    def _ensure_venv(self, client: paramiko.SSHClient, base: str) -> None:
        venv = posixpath.join(base, "venv")
        lock = posixpath.join(base, "cache", "code", "requirements", "job.lock")
        q = shlex.quote
        res = ssh_run(client, f"test -x {q(venv)}/bin/python || (python3 -m venv {q(venv)} && "
                              f"{q(venv)}/bin/pip install -q --require-hashes --no-deps -r {q(lock)})", timeout=3600)
        if res.rc != 0:
            raise BackendError("setup", f"building the job venv from requirements/job.lock failed: {res.err.strip()[-300:]}")

    def _envs(self, run_id: str, work: str) -> dict[str, str]:
        return {"SOCRATES_RUN_ID": run_id, "CONFIG": "run_config.yaml", "OUT": "out", "DATA_DIR": "data",
                "ALLOW_CPU": "1" if self.opts.allow_cpu else "", "PYTHONUNBUFFERED": "1", "PYTHONPATH": work}

    def _check(self, client: paramiko.SSHClient, work: str, mode: str, python: str) -> None:
        if self.run_block is not None:
            return  # a custom run block (tests) carries its own check
        cpu = " --allow-cpu" if self.opts.allow_cpu else ""
        q = shlex.quote
        cmd = (f"docker run --rm --gpus all -v {q(work)}:/work -w /work {q(self.opts.image)} check --config run_config.yaml"
               if mode == "docker" else f"cd {q(work)} && PYTHONPATH=. {q(python)} -m job check --config run_config.yaml{cpu}")
        res = ssh_run(client, cmd, timeout=900)
        if res.rc == 2:
            raise ContractError(f"ssh {self.target}: job check refused the run: {_last_line(res)}")
        if res.rc != 0:
            raise BackendError("check", f"job check on {self.target} exited {res.rc}: {_last_line(res)}")

    def _start(self, client: paramiko.SSHClient, work: str, run_id: str, py: str | None) -> tuple[int, int]:
        q = shlex.quote
        envs = self._envs(run_id, work)
        path_line = f"export PATH={q(posixpath.dirname(py))}:\"$PATH\"\n" if py else ""
        script = (f"set -e\ncd {q(work)}\n" + env_exports(envs) + path_line
                  + env_exports(secret_envs())  # over stdin only: never in argv or a file
                  + "setsid bash ./runner.sh </dev/null >/dev/null 2>&1 &\n"
                  + "for i in $(seq 100); do test -s job.pid && break; sleep 0.1; done\n"
                  + "cat job.pid\n")
        res = ssh_run(client, "bash -s", stdin=script)
        try:
            pid = int(res.out.split()[0])
        except (ValueError, IndexError):
            raise BackendError("run", f"the job did not start on {self.target}: {_last_line(res)}") from None
        # setsid made the runner a session (and group) leader: its pid is its process group's id
        return pid, pid

    # --- teardown, liveness ----------------------------------------------------------------

    def _kill_and_remove(self, state: dict, work: str) -> None:
        pg = state.get("pgid")
        kill = (f"kill -TERM -- -{int(pg)} 2>/dev/null; for i in $(seq 50); do kill -0 -- -{int(pg)} 2>/dev/null "
                f"|| break; sleep 0.2; done; kill -KILL -- -{int(pg)} 2>/dev/null; " if pg else "")
        docker = f"docker rm -f socrates-{shlex.quote(state.get('run_id', 'x'))} >/dev/null 2>&1; " \
            if state.get("mode") == "docker" else ""
        res = ssh_run(self._client_or_wait(), f"{kill}{docker}rm -rf {shlex.quote(work)}; test ! -e {shlex.quote(work)}")
        if res.rc != 0:
            raise SshDropped(f"rm -rf {work} failed: {res.err.strip()[-200:]}")

    def _alive(self, pgid: int | None) -> bool:
        if not pgid:
            return False
        res = ssh_run(self._client_or_wait(), f"kill -0 -- -{int(pgid)} 2>/dev/null && echo yes || echo no")
        return res.out.strip() == "yes"

    # --- connection ------------------------------------------------------------------------

    def _connect(self) -> paramiko.SSHClient:
        if self._client is None or not self._client.get_transport() or not self._client.get_transport().is_active():
            self._drop()
            self._client = connect(self.target, self.opts.auth())
        return self._client

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._connect().open_sftp()
        return self._sftp

    def _client_or_wait(self, timeout: float = RECONNECT_FOR_S) -> paramiko.SSHClient:
        """Connect, retrying a dropped/unreachable host with backoff for up to `timeout` seconds."""
        deadline, delay = time.time() + timeout, 0.2
        while True:
            try:
                return self._connect()
            except SshDropped:
                if time.time() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _drop(self) -> None:
        for thing in (self._sftp, self._client):
            try:
                if thing is not None:
                    thing.close()
            except Exception:  # closing a dead connection may raise anything; it is gone either way
                pass
        self._sftp = self._client = None

    def _phase(self, run: Any, phase: str, message: str) -> None:
        run.backend_state.setdefault("phases", []).append(phase)
        cb: Callable | None = getattr(run, "on_phase", None)
        if cb:
            cb(phase, message)


# The wrapper the host runs: its own pid into job.pid, the run block's output into job.log, and
# its exit code into exit_code last (atomically), so a follower knows the job really ended.
_RUNNER = """#!/usr/bin/env bash
cd "$(dirname "$0")"
echo $$ > job.pid.tmp && mv job.pid.tmp job.pid
{launch} > job.log 2>&1 < /dev/null
rc=$?
echo $rc > exit_code.tmp && mv exit_code.tmp exit_code
"""


def _run_block(data: Path | None) -> str:
    """The job verbs in order, as sky/train.yaml's run block calls them (envs set by `_envs`)."""
    data_arg = f" --data {shlex.quote(posixpath.join('..', '..', 'cache', 'data', data.name))}" if data else ""
    return "\n".join([
        "set -euo pipefail",
        'python -m job check --config "$CONFIG" ${ALLOW_CPU:+--allow-cpu}',
        f'python -m job prepare --config "$CONFIG"{data_arg} --out "$DATA_DIR"',
        'python -m job train --config "$CONFIG" --data "$DATA_DIR" --out "$OUT" --resume auto',
    ]) + "\n"


def _run_inputs(run: Any) -> tuple[str, Path | None]:
    """The run's resolved config (YAML text) and local data path, from the run record."""
    import yaml

    cfg = getattr(run, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    else:
        path = getattr(run, "config_path", None) or (Path(run.dir) / "config.yaml")
        text = Path(path).read_text(encoding="utf-8")
    data = getattr(run, "data", None)
    data_path = Path(data) if data and Path(data).exists() else None
    return text, data_path


def _run_hook(cmd: str) -> dict:
    try:
        p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=600)
        return {"cmd": cmd, "rc": p.returncode, "ok": p.returncode == 0, "output": (p.stdout + p.stderr)[-2000:]}
    except subprocess.TimeoutExpired:
        return {"cmd": cmd, "rc": None, "ok": False, "output": "timed out after 600 s"}


def _read_int(sftp: paramiko.SFTPClient, path: str) -> int | None:
    text = read_from(sftp, path, 0).decode().strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _last_line(res) -> str:
    lines = (res.err.strip() or res.out.strip()).splitlines()
    return lines[-1] if lines else f"exit {res.rc}"


def _save(run: Any) -> None:
    save = getattr(run, "save", None)
    if callable(save):
        save()
