"""Bring your own GPU host: the SSH backend (`--infra ssh://user@host[:port]`).

What `launch` does on the host, in order, each step before anything costs more:
    probe      the remote folder is writable and its disk has room (`up` runs this as `preflight`
               before a run exists: host key, credentials, disk refused with exit 2)
    sync       code + data into content-addressed cache folders over SFTP, sending only files whose
               size or sha256 differ (bytes counted into the run's backend_state["sync"])
    check      `python -m job check` against the run's config (a refusal fails the run, job not started)
    start      the run block, detached in its own session (setsid), in the job image with
               `docker run --gpus all` when the host has docker and a GPU, else with a python
               that has the job's deps (--remote-python, or a venv built from requirements/job.lock)
What runs is sky/train.yaml's `setup:` (venv mode) and `run:` blocks with the task's envs, rendered
by launcher/task.py: the same as SkyPilot and the local backend. `follow` tails the job's log
(events ride on it with their LINE_PREFIX) over SFTP from the last byte read, reconnecting when the
connection drops; `down` kills the job's process group, removes the run's folder, then runs the
`--on-teardown` command locally and records whether it worked.

Remote layout (REMOTE_DIR defaults to ~/.socrates-launch):
    REMOTE_DIR/cache/          code/<content hash>/ and data/<content hash>/ (`_sync`), kept between runs so
                               unchanged files aren't resent; cache/ and runs/ are 0700
    REMOTE_DIR/runs/<run-id>/  one run: code hard-linked from the cache, out/, job.log, job.pid, exit_code
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
from shlex import quote as q
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from contracts import events as ev
from contracts import remote
from contracts.config import RunConfig
from contracts.errors import ContractError

try:
    import paramiko
except ImportError:  # an optional extra: say how to get it instead of a traceback
    raise ContractError("--infra ssh://...: needs paramiko (pip install 'socrates-launch[ssh]')") from None
from contracts._io import atomic_write_text, sha256_file
from contracts.events import LINES_ENV
from contracts.manifest import data_files
from launcher import stage as stagelib
from launcher import task as tasklib
from launcher.backends.base import Backend, BackendError, EventCallback, StreamLost, disk_full
from launcher.registry import PRIVATE, TEARDOWN_FILE, Run
from launcher.secrets import collect as secret_envs, redact
from launcher.ssh_options import SshOptions, parse_infra
from launcher.ssh_transport import (
    DROPPED, SshAuth, SshDropped, SshTarget, SshUnsafe, SyncStats, connect, env_exports, get_tree, local_files,
    read_from, remote_hashes, run as ssh_run, sync_tree,
)

LOG_FILE, EXIT_FILE, PID_FILE = "job.log", "exit_code", "job.pid"
SECRETS_FILE = ".secrets.env"  # docker mode only: 0600, removed by the container before the job starts


class SshBackend(Backend):
    name = "ssh"
    HANDLES = ("target", "work", "pgid")

    def __init__(self, infra: str, run_block: str | None = None, code_root: Path | None = None, **options: Any):
        self.target: SshTarget = parse_infra(infra)
        self.opts = SshOptions(**options)
        # Built without options (logs/status/down/download after a restart): the run record's are used,
        # except what a record must not decide: a command to run (--on-teardown, which `down
        # --on-teardown` passes again as `on_teardown_override`) and trusting a new host key.
        self._restore = not options
        self.on_teardown_override: str | None = None
        self.run_block = run_block
        """Bash the host runs as the job; None: sky/train.yaml's run block (launcher/task.py)."""
        self.code_root = code_root
        """The folder sent as the job's code; None: the run's staged folder (launcher/stage.py), built at launch."""
        self.reconnects = 0
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # --- before anything exists -------------------------------------------------------------

    def preflight(self, cfg: RunConfig) -> None:
        """Connect (host key, credentials) and probe disk/permissions; ContractError = exit 2, nothing created."""
        try:
            client = self._connect()
            data = tasklib.local_data(cfg.to_dict())
            self._probe(client, self._resolve_remote_dir(client), data)
        except SshDropped as e:
            raise ContractError(f"{e} (is the host up, and is {self.target} the right user, host and port?)") from None
        finally:
            self._drop()

    # --- lifecycle ------------------------------------------------------------------------

    def launch(self, run: Run) -> None:
        try:
            state = self._bind(run)
            # the --on-teardown command (it may hold a provider token) is kept once, in a 0600 side file
            state.update(options={**self.opts.to_dict(), "on_teardown": None}, target=str(self.target))
            if self.opts.on_teardown and Path(run.dir).is_dir():  # what `down` names when it is not passed again
                atomic_write_text(Path(run.dir) / TEARDOWN_FILE, self.opts.on_teardown, mode=PRIVATE)
            run.save()
            client = self._connect()
            base = self._resolve_remote_dir(client)
            work = posixpath.join(base, "runs", run.id)
            state.update(remote_dir=base, work=work, log=posixpath.join(work, LOG_FILE))
            run.save()  # saved before anything exists on the host: `down` can always find it

            data = tasklib.local_data(run.config)
            self.on_phase("probing", f"{self.target}: permissions and free disk under {base}")
            mode, python = self._probe(client, base, data)
            state.update(mode=mode, python=python)
            self.on_phase("syncing", f"code and data to {self.target} (unchanged files skipped)")
            if self.code_root is None:
                self.code_root = stagelib.for_run(run).path
            stats = self._sync(client, base, data, state)
            state["sync"] = asdict(stats)
            run.save()
            self.on_phase("synced", f"sent {stats.bytes_sent:,} B in {stats.files_sent} files; "
                                    f"{stats.bytes_skipped:,} B in {stats.files_skipped} unchanged files skipped")
            task = tasklib.render(run, gpu=None) if self.run_block is None else None
            self._prepare_work(client, base, work, run, task, data, mode, python)
            if mode == "venv" and task is not None:
                self.on_phase("installing", "the job's venv from requirements/job.lock (sky/train.yaml setup)")
                self._must(client, "installing", "the setup block failed", f"cd {q(work)} && bash -s",
                           stdin=task.get("setup") or "", timeout=3600)
            if mode == "docker":
                self.on_phase("installing", f"the job image {self.opts.image} (built from the synced Dockerfile "
                                            "if missing)")
                self._docker_image(client, state["code"])
            if task is not None:
                self.on_phase("checking", "python -m job check on the host")
                self._check(client, work, mode, python)
            pid = self._start(client, work, run.id)
            state.update(pid=pid, pgid=pid, started_at=time.time())
            run.save()
        except (SshDropped, *DROPPED) as e:  # the connection died mid-launch: a failed run, torn down by the caller
            raise BackendError("provisioning", f"ssh {self.target}: {type(e).__name__}: {e}") from None

    def follow(self, run: Run, on_event: EventCallback, offset: int = 0) -> int:
        """Deliver the job's events from byte `offset` of its log; a dropped connection resumes there.
        The log is read in bounded chunks (a line over remote.MAX_LINE is dropped, never held whole)."""
        state = self._bind(run)
        log, work = state["log"], state["work"]
        reader = ev.EventReader(Path(log), offset)
        exit_path, odd = posixpath.join(work, EXIT_FILE), None
        while True:
            try:
                sftp = self._sftp_client()
                finished, text = _read_exit(sftp, exit_path)  # before the log: nothing after it is missed
                data = read_from(sftp, log, reader.pos, remote.CHUNK)
                for e in reader.feed([data]):
                    on_event(e)
                if data:
                    continue  # more may be waiting; read again before sleeping
                if finished is not None:
                    state.update(exit_code=finished, log_offset=reader.offset)
                    run.save()
                    return finished
                if text is not None and text != odd:  # the runner writes the real one when the job ends
                    odd = text
                    remote.skipped.note(f"an {EXIT_FILE} file holding {text[:20]!r}, not an exit status")
                if not self._alive(run.id) and _read_exit(sftp, exit_path)[0] is None:
                    left = f"left {EXIT_FILE} holding {odd[:20]!r}" if odd is not None else "left no exit code"
                    raise BackendError("running", f"the job's process group on {self.target} is gone and {left} "
                                                  f"(killed, or the host rebooted); see {log}")
                time.sleep(self.opts.poll_s)
            except (SshDropped, *DROPPED) as e:
                if isinstance(e, FileNotFoundError):
                    raise BackendError("running", f"{self.target}:{work} is gone (torn down?)") from None
                self._drop()
                self.reconnects += 1
                state["reconnects"] = state.get("reconnects", 0) + 1
                self.on_phase("reconnecting", f"ssh connection lost ({type(e).__name__}); resuming at byte {reader.pos}")
                self._reconnect_or_fail("running", StreamLost)  # the job is not known to have failed: detach

    def log_lines(self, run: Run, max_bytes: int = 1 << 20) -> list[str]:
        """The job's stdout/stderr on the host (its last MiB)."""
        state = self._bind(run)
        try:
            sftp = self._sftp_client()
            size = sftp.stat(state["log"]).st_size
            data = read_from(sftp, state["log"], max(0, size - max_bytes), max_bytes)
        except (KeyError, SshDropped, *DROPPED):
            return []
        return data.decode("utf-8", errors="replace").splitlines()

    def download(self, run: Run, dest: Path) -> None:
        state = self._bind(run)
        remote_out = posixpath.join(state["work"], "out")
        for attempt in range(3):
            try:
                state["bytes_downloaded"] = get_tree(self._sftp_client(), remote_out, Path(dest), skip=("checkpoints",))
                run.save()
                return
            except FileNotFoundError:
                raise BackendError("downloading", f"{self.target}:{remote_out} does not exist (run torn down?)") from None
            except SshUnsafe as e:
                raise BackendError("downloading", f"{self.target}: {e}") from None
            except (SshDropped, *DROPPED) as e:
                if disk_full(e):  # this machine's disk, not the connection: retrying fills it again
                    raise
                self._drop()
                if attempt == 2:
                    raise BackendError("downloading", f"{self.target}: the connection kept dropping") from None
                self._reconnect_or_fail("downloading")

    def down(self, run: Run) -> None:
        """Kill the job's process group, remove the run's folder, run --on-teardown. Idempotent."""
        state = self._bind(run)
        if state.get("torn_down"):
            return
        error = None
        work = state.get("work")
        if work and not state.get("remote_clean"):
            _check_work(state, run.id)  # run.json is not the authority for what `rm -rf` removes
            # A provider stop keeps the disk: results that were never pulled back stay with it.
            keep = bool(self.opts.on_teardown) and not run.verified and run.exit_code == 0
            try:
                client, w = self._client_or_wait(timeout=min(60.0, self.opts.reconnect_s)), q(work)
                # the groups are found on the host by the run id (run.json's pgid is not the authority: `pgid: 1`);
                # keep: the job is ended, its folder (the results) stays for the stopped host's disk
                docker = f"docker rm -f socrates-{q(run.id)} >/dev/null 2>&1; " if state.get("mode") == "docker" else ""
                end = f"test -d {w}" if keep else f"rm -rf {w}; test ! -e {w}"
                res = ssh_run(client, _kill_script(run.id) + docker + end)
                if res.rc != 0:
                    what = f"ending the job in {work}" if keep else f"rm -rf {work}"
                    raise SshDropped(f"{what} failed: {_last_line(res)}")
                if keep:
                    state["results_kept"] = f"{self.target}:{work}/out"
            except (SshDropped, *DROPPED) as e:
                # the host's own job.pid (its runner's pid and group), never run.json's pgid; never group 1
                pid_file = q(f"{work}/{PID_FILE}")
                remote = f"pg=$(cat {pid_file}) && [ \"$pg\" -gt 1 ] && kill -9 -- -$pg; rm -rf {q(work)}"
                error = (f"could not reach {self.target} to tear down ({e}); the job may still be running there. "
                         f"End it: ssh -p {self.target.port} {q(f'{self.target.user}@{self.target.host}')} "
                         f"{q(remote)}")
        state["remote_clean"] = error is None
        hook = state.get("on_teardown")
        recorded = _kept_hook(run) or (state.get("options") or {}).get("on_teardown")  # shown, never run
        if self.opts.on_teardown and not (hook and hook["ok"]):
            # the provider's stop command runs even if the host was unreachable: it is what stops billing
            state["on_teardown"] = hook = _run_hook(self.opts.on_teardown)
        # A command found only in run.json is never run on the record's word: the user passes it again.
        unrun = bool(recorded) and not self.opts.on_teardown and not (hook and hook["ok"])
        state["torn_down"] = error is None and not unrun and (hook is None or hook["ok"])
        run.save()
        self._drop()
        if error:
            raise BackendError("down", error)
        if unrun:
            raise BackendError("down", f"the run's --on-teardown command is not run from run.json (a record is "
                                       f"not trusted to run commands); the host may still be billing. Run it "
                                       f"yourself, or: socrates-launch down {run.id} --on-teardown {q(recorded)}")
        if hook and not hook["ok"]:
            raise BackendError("down", f"--on-teardown {self.opts.on_teardown!r} exited {hook['rc']}: "
                                       f"{hook['output'].strip()[-200:]} (the host may still be billing: stop it yourself)")

    def job_running(self, run: Run) -> bool | None:
        """Asked of the host: the job has no exit code yet and its process group is alive."""
        state = self._bind(run)
        if state.get("torn_down") or not state.get("work"):
            return False
        try:
            return _read_exit(self._sftp_client(), posixpath.join(state["work"], EXIT_FILE))[0] is None \
                and self._alive(run.id)
        except (SshDropped, *DROPPED):
            return None
        finally:
            self._drop()

    def launch_submitted(self, run: Run) -> bool:
        return bool(run.backend_state.get("pid"))

    def set_on_teardown(self, run: Run, command: str) -> None:
        """`down --on-teardown CMD`: the provider's stop command, passed again (never taken from run.json)."""
        self.on_teardown_override = command

    def left_up_ends_by(self, run: Run) -> str | None:  # None with a hook: it stops a paid host, results or not
        return None if self.opts.on_teardown else \
            f"the host is yours: the run's folder on {self.target} stays until `down`"

    def machine_state(self, run: Run) -> str:
        """'up' while the run's folder or job exists on the host, 'gone' after teardown, 'unknown' if unreachable."""
        state = self._bind(run)
        if state.get("torn_down") or not state.get("work"):
            return "gone"
        try:
            res = ssh_run(self._connect(), f"test -d {q(state['work'])} && echo yes || echo no",
                          timeout=self.opts.timeout_s)
            alive = self._alive(run.id)
        except (SshDropped, *DROPPED):
            return "unknown"
        return "up" if (res.out.strip() == "yes" or alive) else "gone"

    # --- launch steps ---------------------------------------------------------------------

    def _bind(self, run: Run) -> dict:
        """The run's backend_state; restores this backend's options from it after a launcher restart."""
        state = run.backend_state
        if self._restore and state.get("options"):
            self.opts = SshOptions(**{**state["options"], "on_teardown": self.on_teardown_override,
                                      "trust_new_host": False})
            self._restore = False
        return state

    def _resolve_remote_dir(self, client: paramiko.SSHClient) -> str:
        d = self.opts.remote_dir
        if d.startswith("~"):
            d = ssh_run(client, 'printf %s "$HOME"').out.strip() + d[1:]
        if not d.startswith("/"):
            raise ContractError(f"--remote-dir {self.opts.remote_dir!r}: not accepted (an absolute path or ~/...)")
        return posixpath.normpath(d)

    def _probe(self, client: paramiko.SSHClient, base: str, data: Path | None) -> tuple[str, str]:
        """Writable folder, free disk, how the job runs (mode, python). Refuses with exit 2 before anything starts."""
        need_gb = self.opts.min_free_gb if self.opts.min_free_gb is not None else (1.0 if self.opts.allow_cpu else 60.0)
        if data:
            sent = [data] if data.is_file() else [p for p in data.rglob("*") if p.is_file()]
            need_gb += sum(p.stat().st_size for p in sent) / 2**30
        d = q(base)
        res = ssh_run(client, (
            f"mkdir -p {d} 2>&1 && t={d}/.write-test.$$ && : > \"$t\" 2>&1 && rm -f \"$t\" && echo WRITABLE && "
            f"df -Pk {d} | tail -1 | awk '{{print \"FREE_KB\", $4}}'; "
            "command -v docker >/dev/null && echo HAS_DOCKER; "
            "command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && echo HAS_GPU; "
            "command -v python3 >/dev/null && echo HAS_PYTHON3"))
        lines = res.out.splitlines()
        if "WRITABLE" not in lines:
            why = [ln for ln in (res.out + res.err).splitlines() if ln.strip()]
            raise ContractError(f"ssh {self.target}: remote dir {base} is not writable "
                                f"({why[0] if why else 'mkdir/write failed'}); pick another with --remote-dir")
        free_gb = next((int(x.split()[1]) for x in lines if x.startswith("FREE_KB ")), 0) / 2**20
        if free_gb < need_gb:
            raise ContractError(f"ssh {self.target}: only {free_gb:.2f} GB free under {base}; the run needs "
                                f"{need_gb:.2f} GB (free some disk, or use --remote-dir / --min-free-gb)")
        if self.opts.remote_python:
            return "python", self.opts.remote_python
        if "HAS_DOCKER" in lines and "HAS_GPU" in lines:
            return "docker", "python"
        if self.opts.pull_image:
            raise ContractError(f"ssh {self.target}: --image {self.opts.image} needs docker and a GPU on the host "
                                "(found: " + (", ".join(x.lower() for x in ("HAS_DOCKER", "HAS_GPU") if x in lines) or "neither") + ")")
        if "HAS_GPU" not in lines and not self.opts.allow_cpu:
            raise ContractError(f"ssh {self.target}: no GPU found (nvidia-smi -L failed); pass --allow-cpu for a CPU-only run")
        if "HAS_PYTHON3" not in lines:
            raise ContractError(f"ssh {self.target}: no python3 on the host (install it, or give --remote-python)")
        return "venv", ""  # empty JOB_PYTHON: the run block's default, the venv its setup block builds

    def _sync(self, client: paramiko.SSHClient, base: str, data: Path | None, state: dict) -> SyncStats:
        """Code (`_sync_code`) and data into folders named by their content (cache/data/<hash>), the data pruned to
        exactly what is sent and checked after the sync: a run trains on exactly its data, whatever another
        run (same folder name, fewer files, at the same time) sent."""
        python = self.opts.remote_python or "python3"
        self._must(client, "syncing", f"could not create {base}/cache and {base}/runs",  # private: data, code, results
                   f"umask 077; mkdir -p {q(base)}/cache {q(base)}/runs && chmod 700 {q(base)}/cache {q(base)}/runs")
        code = local_files(self.code_root, stagelib.entries(self.code_root))  # the run's staged folder
        stats = self._sync_code(client, base, code, python, state)
        if data is not None:
            files = {Path(data.name, f.relative_to(data)).as_posix() if f != data else data.name: f
                     for f in data_files(data)}  # the walk the row check and the data hash use
            listing, digest = _listing(files)
            root = posixpath.join(base, "cache", "data", digest[:32])
            stats.add(sync_tree(client, files, root, python=python, prune=True))
            self._check_sent(client, root, listing, python, "data")
            state["data"] = {"remote": posixpath.join(root, data.name), "sha256": digest, "files": len(listing)}
        return stats

    def _sync_code(self, client: paramiko.SSHClient, base: str, code: dict[str, Path], python: str,
                   state: dict) -> SyncStats:
        """The code into a folder named by its content (cache/code/<hash>), made complete under a run-private
        name and renamed into place: a run never sees another checkout's files, whatever runs at the same
        time. A new version starts from hard links of the last one, so only changed files are sent."""
        listing, digest = _listing(code)
        digest = digest[:32]
        codes = posixpath.join(base, "cache", "code")
        root, tmp = posixpath.join(codes, digest), posixpath.join(codes, f".tmp-{posixpath.basename(state['work'])}")
        state["code"] = root
        res = self._must(client, "syncing", f"could not prepare {codes}",
                         f"test -d {q(root)} && echo HAVE && exit 0; mkdir -p {q(codes)} && rm -rf {q(tmp)} && "
                         f"last=$(cat {q(codes)}/latest 2>/dev/null); case \"$last\" in ''|*[!0-9a-f]*) mkdir "
                         f"{q(tmp)};; *) cp -al {q(codes)}/\"$last\" {q(tmp)} 2>/dev/null || mkdir -p {q(tmp)};; esac")
        if res.out.strip() == "HAVE":  # this exact code is there, complete (it was renamed in only once whole)
            return SyncStats(files_skipped=len(listing), bytes_skipped=sum(size for size, _ in listing.values()))
        stats = sync_tree(client, code, tmp, python=python, prune=True)
        self._check_sent(client, tmp, listing, python, "code")
        # another run may have renamed the same content in first: then this copy goes, theirs is identical
        self._must(client, "syncing", f"could not put the code in place at {root}",
                   f"mv -T {q(tmp)} {q(root)} 2>/dev/null || rm -rf {q(tmp)}; printf %s {digest} > "
                   f"{q(codes)}/.latest.$$ && mv -f {q(codes)}/.latest.$$ {q(codes)}/latest; test -d {q(root)}")
        return stats

    def _check_sent(self, client: paramiko.SSHClient, root: str, listing: dict, python: str, what: str) -> None:
        """The folder on the host holds exactly `listing` (path -> [size, sha256]), re-hashed there."""
        there = remote_hashes(client, root, python)
        if there != listing:
            odd = sorted(set(there) ^ set(listing)) or sorted(r for r in listing if there.get(r) != listing[r])
            raise BackendError("syncing", f"the {what} on {self.target} under {root} is not what was sent "
                                          f"(differs at {', '.join(odd[:3])})")

    def _prepare_work(self, client: paramiko.SSHClient, base: str, work: str, run: Run, task: dict | None,
                      data: Path | None, mode: str, python: str) -> None:
        """The run's folder: code hard-linked from the cache (cheap), the rendered script, the runner."""
        if task is not None:
            data_env = {"DATA": run.backend_state["data"]["remote"]} if data else {}
            script = tasklib.run_script(task, JOB_PYTHON=python, **data_env)
        else:
            # a given block (tests' stand-in jobs): the events channel the template's run block exports too
            script = f"#!/usr/bin/env bash\nexport OUT=out {LINES_ENV}=1\n" + self.run_block
        launch = "bash ./run.sh"
        if mode == "docker":
            # Secrets never go through docker's -e (the values would be in `docker inspect`): the runner
            # writes them (from its environment, sent over stdin) to a 0600 file in the run's folder, which
            # the container sources and deletes before the job starts.
            names = " ".join(f"-e {k}" for k in ("SOCRATES_RUN_ID", "PYTHONUNBUFFERED"))
            secrets = " ".join(secret_envs())
            mounts = f"-v {q(posixpath.join(base, 'cache', 'data'))}:{q(posixpath.join(base, 'cache', 'data'))}:ro"
            inner = q(f". ./{SECRETS_FILE} 2>/dev/null; rm -f ./{SECRETS_FILE}; exec bash ./run.sh")
            launch = ((f"(umask 077; declare -p {secrets} > {SECRETS_FILE} 2>/dev/null || true); " if secrets else "")
                      + f"docker run --rm --gpus all --name socrates-{q(run.id)} -v \"$PWD\":/work -w /work {mounts} "
                      f"{names} -e PYTHONPATH=/work --entrypoint bash {q(self.opts.image)} -c {inner}")
        self._must(client, "syncing", f"could not create {work}", f"rm -rf {q(work)} && mkdir -p "
                   f"{q(posixpath.dirname(work))} && cp -al {q(run.backend_state['code'])} {q(work)} && mkdir -p {q(work)}/out")
        sftp = client.open_sftp()
        try:
            for name, text in (("run.sh", script), ("runner.sh", _RUNNER.format(launch=launch)),
                               ("run_config.yaml", yaml.safe_dump(run.config, sort_keys=False))):
                with sftp.open(posixpath.join(work, name), "w") as f:
                    f.write(text)
        except DROPPED as e:
            raise BackendError("syncing", f"writing the run's scripts to {self.target}: {e}") from None
        finally:
            sftp.close()

    def _docker_image(self, client: paramiko.SSHClient, code: str) -> None:
        image, context = q(self.opts.image), q(code)  # the run's own code folder is the build context
        get = f"docker pull -q {image}" if self.opts.pull_image else f"docker build -q -t {image} {context}"
        self._must(client, "installing", f"{'pulling' if self.opts.pull_image else 'building'} the job image "
                   f"{self.opts.image} failed", f"docker image inspect {image} >/dev/null 2>&1 || {get}", timeout=3600)

    def _check(self, client: paramiko.SSHClient, work: str, mode: str, python: str) -> None:
        """`job check` before the job is started: a card or config that can't run is refused here."""
        py = q(python) if python else '"$HOME/socrates-venv/bin/python"'  # a path with a space stays one word
        secrets = secret_envs()
        names = "".join(f" -e {k}" for k in secrets)  # docker copies the values from the environment by name
        cmd = (f"docker run --rm --gpus all{names} -v {q(work)}:/work -w /work {q(self.opts.image)} check "
               "--config run_config.yaml"
               if mode == "docker" else f"cd {q(work)} && PYTHONPATH=. {py} -m job check --config run_config.yaml")
        # the secrets reach the check as they reach the job (a gated model needs HF_TOKEN): over stdin, never argv
        res = ssh_run(client, "bash -s", stdin=env_exports(secrets) + cmd + "\n", timeout=900)
        if res.rc == 2:
            raise ContractError(f"ssh {self.target}: job check refused the run: {_last_line(res)}")
        if res.rc != 0:
            raise BackendError("checking", f"job check on {self.target} exited {res.rc}: {_last_line(res)}")

    def _start(self, client: paramiko.SSHClient, work: str, run_id: str) -> int:
        """Start the runner in its own session; returns its pid (= its process group: setsid made it leader)."""
        envs = {"SOCRATES_RUN_ID": run_id, "PYTHONUNBUFFERED": "1", "PYTHONPATH": work}
        path = f"export PATH={q(posixpath.dirname(self.opts.remote_python))}:\"$PATH\"\n" if self.opts.remote_python else ""
        script = (f"set -e\ncd {q(work)}\n" + env_exports(envs) + path
                  + env_exports(secret_envs())  # over stdin only: never in argv or a file
                  + "setsid bash ./runner.sh </dev/null >/dev/null 2>&1 &\n"
                  + f"for i in $(seq 100); do test -s {PID_FILE} && break; sleep 0.1; done\ncat {PID_FILE}\n")
        res = ssh_run(client, "bash -s", stdin=script)
        try:
            return int(res.out.split()[0])
        except (ValueError, IndexError):
            raise BackendError("running", f"the job did not start on {self.target}: {_last_line(res)}") from None

    def _must(self, client: paramiko.SSHClient, phase: str, what: str, cmd: str, **kw: Any):
        """`cmd` on the host; a non-zero exit fails the `phase`: "`what` on the host: its last line"."""
        res = ssh_run(client, cmd, **kw)
        if res.rc != 0:
            raise BackendError(phase, f"{what} on {self.target}: {_last_line(res)}")
        return res

    # --- teardown, liveness ----------------------------------------------------------------

    def _alive(self, run_id: str) -> bool:
        """Whether a live process on the host carries this run's SOCRATES_RUN_ID."""
        res = ssh_run(self._client_or_wait(), f"{_groups_script(run_id)}[ -n \"$groups\" ] && echo yes || echo no",
                      timeout=self.opts.timeout_s)
        return res.out.strip() == "yes"

    # --- connection ------------------------------------------------------------------------

    def _connect(self) -> paramiko.SSHClient:
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            self._drop()
            o = self.opts
            kh = Path(o.known_hosts).expanduser() if o.known_hosts else Path.home() / ".ssh" / "known_hosts"
            self._client = connect(self.target, SshAuth(key=Path(o.key).expanduser() if o.key else None, known_hosts=kh,
                                                        trust_new_host=o.trust_new_host, timeout_s=o.timeout_s))
        return self._client

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._connect().open_sftp()
            self._sftp.get_channel().settimeout(self.opts.timeout_s)  # a silent host is a dropped connection
        return self._sftp

    def _client_or_wait(self, timeout: float | None = None) -> paramiko.SSHClient:
        """Connect, retrying a dropped or unreachable host with backoff for up to `timeout` seconds."""
        deadline, delay = time.time() + (self.opts.reconnect_s if timeout is None else timeout), 0.2
        while True:
            try:
                return self._connect()
            except SshDropped:
                if time.time() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _reconnect_or_fail(self, phase: str, error: type[BackendError] = BackendError) -> None:
        try:
            self._client_or_wait()
        except SshDropped as e:
            raise error(phase, f"lost {self.target} for {self.opts.reconnect_s:.0f} s ({e}); the job may still "
                                      "be running there: `socrates-launch logs` re-attaches, `socrates-launch down` "
                                      "ends it") from None

    def _drop(self) -> None:
        for thing in (self._sftp, self._client):
            with contextlib.suppress(Exception):  # closing a dead connection may raise anything; it is gone
                if thing is not None:
                    thing.close()
        self._sftp = self._client = None


# The wrapper the host runs: its pid into job.pid, the job's output into job.log, and its exit code
# into exit_code last (atomically), so a follower knows the job really ended.
_RUNNER = """#!/usr/bin/env bash
cd "$(dirname "$0")"
echo $$ > job.pid.tmp && mv job.pid.tmp job.pid
{launch} > job.log 2>&1 < /dev/null
rc=$?
echo $rc > exit_code.tmp && mv exit_code.tmp exit_code
"""


def _groups_script(run_id: str) -> str:
    """Shell that sets $groups to the process groups (> 1, not its own) of the live processes on the host
    whose environment holds SOCRATES_RUN_ID=<run id> (the runner exports it; the job inherits it)."""
    want = q(f"SOCRATES_RUN_ID={run_id}")
    return (f"me=$(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3); groups=$(for e in $(grep -lzxF {want} "
            f"/proc/[0-9]*/environ 2>/dev/null); do s=$(sed 's/.*) //' ${{e%/environ}}/stat 2>/dev/null) || continue; "
            f"case \"$s\" in Z*) continue;; esac; g=$(echo \"$s\" | cut -d' ' -f3); "
            f"[ \"$g\" -gt 1 ] 2>/dev/null && [ \"$g\" != \"$me\" ] && echo $g; done | sort -u); ")


def _kill_script(run_id: str) -> str:
    """Shell that ends the run's process groups (found by its id): TERM, up to 10 s, then KILL."""
    find = _groups_script(run_id)
    return (f"{find}for g in $groups; do kill -TERM -- -$g 2>/dev/null; done; for i in $(seq 50); do "
            f"{find}[ -z \"$groups\" ] && break; sleep 0.2; done; for g in $groups; do kill -KILL -- -$g 2>/dev/null; "
            f"done; ")


def _check_work(state: dict, run_id: str) -> None:
    """The run's remote folder must be <remote_dir>/runs/<run id> under an absolute, normalized remote_dir."""
    base, work = state.get("remote_dir"), state.get("work")
    ok = (isinstance(base, str) and isinstance(work, str) and base.startswith("/") and posixpath.normpath(base) == base
          and base != "/" and work == posixpath.join(base, "runs", run_id))
    if not ok:
        raise BackendError("down", f"run.json names remote folder {work!r}, which is not run {run_id}'s "
                                   f"(<remote dir>/runs/{run_id}): refusing to delete it")


def _listing(files: dict[str, Path]) -> tuple[dict, str]:
    """path -> [size, sha256] of what is sent, and the sha256 of that listing (the folder's name by content)."""
    listing = {rel: [p.stat().st_size, sha256_file(p)] for rel, p in files.items()}
    return listing, hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def _run_hook(cmd: str) -> dict:
    """Run the --on-teardown command; what run.json keeps of it (not the command: it may hold a token)."""
    try:
        p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=600)
        return {"rc": p.returncode, "ok": p.returncode == 0, "output": redact((p.stdout + p.stderr)[-2000:])}
    except subprocess.TimeoutExpired:
        return {"rc": None, "ok": False, "output": "timed out after 600 s"}


def _kept_hook(run: Run) -> str | None:
    path = Path(run.dir) / TEARDOWN_FILE
    try:
        return path.read_text(encoding="utf-8")[:4096] if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def _read_exit(sftp: paramiko.SFTPClient, path: str) -> tuple[int | None, str | None]:
    """(the exit status in the job's exit_code file, or None; the file's text, None while there is none)."""
    data = read_from(sftp, path, 0, 64)
    return remote.exit_code(data), (data.decode("utf-8", errors="replace") if data else None)


def _last_line(res) -> str:
    lines = (res.err.strip() or res.out.strip()).splitlines()
    return lines[-1] if lines else f"exit {res.rc}"

