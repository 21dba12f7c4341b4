"""A rehearsal of the cloud machine: the task `up --dryrun` renders, run the way SkyPilot runs it.

No cloud can be reached from here, so the machine is simulated, and only the machine: everything that
decides what happens on it is the real thing.
- The task is the file `up --dryrun --save-task` wrote (the same text the dry run prints), parsed by
  SkyPilot's own `sky.Task.from_yaml_config`.
- A fresh node: an empty HOME, and a `python3` that is an environment of its own, of an older Python
  than the lock's: SkyPilot 0.14's default user env (`~/sky-user-env`), made by SkyPilot's own
  SKY_USER_ENV_CREATION_COMMANDS from a Python 3.10 (as SkyPilot's images ship). The job's own 3.12
  comes through uv, as on the cloud; uv cannot download it here, so the node's PATH has a `python3.12`
  and UV_PYTHON_DOWNLOADS=never (the one stand-in: on the cloud uv downloads the same CPython).
  The one-node test's node has nothing else; the later tests' nodes (two nodes, a managed relaunch) start with
  its job venv hard-linked in (as a reused machine or an image brings one): their setup block runs in full
  and finds the lock satisfied, which spares the suite four installs and four first imports (~25 CPU-s each).
- The workdir is synced to ~/sky_workdir by SkyPilot's own rsync command (LocalProcessCommandRunner:
  its filters, .skyignore included).
- The setup and run blocks are wrapped by SkyPilot's own `make_task_bash_script` (and the run block by
  TaskCodeGen.build_task_bash_script, as its job codegen does), with the envs SkyPilot exports (the
  task's envs and secrets, SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES,
  SKYPILOT_NUM_GPUS_PER_NODE, SKYPILOT_TASK_ID, ...), and run with `/bin/bash -i FILE` as SkyPilot does.
- The lock is installed for real from the package index; the uv and pip caches are shared with this
  machine's (UV_CACHE_DIR, PIP_CACHE_DIR), so a second rehearsal downloads nothing.
What only a real cloud shows: the cloud's image and driver, a real GPU, uv's CPython download, the
network between nodes, the bucket mount (rclone), SkyPilot's controller.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NETWORK_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_INDEX_URL",
               "UV_INDEX_URL", "UV_DEFAULT_INDEX", "PIP_DEFAULT_TIMEOUT")


def find_python(version: str) -> str | None:
    """An interpreter of `version` (e.g. "3.10"), found without running the shims of a version manager."""
    home = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    for cand in sorted(home.glob(f"versions/{version}.*/bin/python{version}"), reverse=True):
        if os.access(cand, os.X_OK):
            return str(cand)
    for d in ("/usr/local/bin", "/usr/bin"):
        cand = Path(d) / f"python{version}"
        if cand.exists() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def network_env() -> dict[str, str]:
    """This machine's network settings (its CA bundle, proxies): they pass through, as a cloud image has its own."""
    return {k: v for k, v in os.environ.items() if k.lower().endswith("_proxy") or k in NETWORK_ENV}


def _sky(code: str, *args: str, timeout: float = 120) -> str:
    """Run `code` with SkyPilot imported in a subprocess (this process never imports sky); its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPILOT_")}
    env["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"SkyPilot helper failed: {r.stderr[-2000:]}")
    return r.stdout


_PARSE = textwrap.dedent("""
    import json, sys, yaml
    import sky
    from sky import task as task_lib
    config = yaml.safe_load(open(sys.argv[1]))
    secrets = json.loads(sys.argv[2])
    # as launcher/sky_adapter.py builds the task it launches, the secrets' values given at launch
    t = sky.Task.from_yaml_config(config, secrets_overrides=list(secrets.items()) or None)
    envs = task_lib.get_plaintext_envs_and_secrets(t.envs_and_secrets)
    print(json.dumps({"setup": t.setup, "run": t.run, "envs": envs, "workdir": t.workdir,
                      "num_nodes": t.num_nodes}))
""")

_RECEIVE = textwrap.dedent("""
    import json, sys
    from sky.backends.task_codegen import TaskCodeGen, UNSET_RAY_ENV_VARS
    from sky.skylet import log_lib
    from sky.utils.command_runner import LocalProcessCommandRunner
    spec = json.load(open(sys.argv[1]))
    # SkyPilot's workdir sync (its rsync command and filters)
    LocalProcessCommandRunner().rsync(source=spec["workdir"], target=spec["target"], up=True, stream_logs=False)
    for block in spec["blocks"]:  # each block's script, as SkyPilot writes it
        body = block["body"]
        if block["kind"] == "run":  # as the job codegen wraps a run block
            body = TaskCodeGen.build_task_bash_script(body, env_prefix=" && ".join(f"unset {v}" for v in UNSET_RAY_ENV_VARS))
        open(block["out"], "w").write(log_lib.make_task_bash_script(body, env_vars=block["envs"]))
""")

_USER_ENV = textwrap.dedent("""
    import sys
    from sky.skylet import constants
    print(constants.SKY_USER_ENV_CREATION_COMMANDS.replace(constants.SKY_UV_CMD, sys.argv[1]))
""")


@dataclass
class Task:
    """The parts of a rendered task that decide what runs on the node."""
    setup: str
    run: str
    envs: dict
    workdir: str
    num_nodes: int

    @classmethod
    def from_file(cls, path: Path, secrets: dict[str, str]) -> Task:
        return cls(**json.loads(_sky(_PARSE, str(path), json.dumps(secrets))))


@dataclass
class Node:
    """One simulated fresh node under `root`: HOME, a bin folder on PATH, SkyPilot's user env."""
    root: Path
    rank: int = 0
    home: Path = field(init=False)
    bin: Path = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.bin = self.root / "bin"

    @property
    def workdir(self) -> Path:
        return self.home / "sky_workdir"

    def env(self) -> dict[str, str]:
        """The node's process environment: nothing of this machine's but the caches (shared) and locale."""
        real_home = Path.home()
        return {**network_env(),
            "HOME": str(self.home), "USER": os.environ.get("USER", "root"), "LANG": "C.UTF-8",
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR") or str(real_home / ".cache" / "uv"),
            "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR") or str(real_home / ".cache" / "pip"),
            "UV_PYTHON_DOWNLOADS": "never",  # the node's python3.12 stands for uv's download (see above)
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }

    def provision(self, python3: str, python312: str, uv: str) -> None:
        """A fresh node as SkyPilot leaves it before setup: `python3` an old CPython, SkyPilot's user env
        made from it by SkyPilot's own commands (with `uv` standing for SkyPilot's ~/.local/bin/uv)."""
        self.home.mkdir(parents=True)
        self.bin.mkdir(parents=True)
        (self.bin / "python3").symlink_to(python3)
        (self.bin / "python3.12").symlink_to(python312)
        commands = user_env_commands(uv)
        r = subprocess.run(["bash", "-c", commands], env=self.env(), cwd=self.home, capture_output=True,
                           text=True, timeout=300)
        if not (self.home / "sky-user-env" / "bin" / "pip").exists():
            raise RuntimeError(f"SkyPilot's user env was not created: {r.stdout[-1000:]} {r.stderr[-1000:]}")

    def seed_venv(self, other: "Node") -> None:
        """The job's venv of `other` (after its setup) on this node, as a reused machine or an image brings one:
        hard links (the setup block only adds or replaces files, never writes into one), compiled bytecode
        included. Setup still runs in full here and finds the lock satisfied; the install from the lock is
        the one-node test's."""
        subprocess.run(["cp", "-al", str(other.home / "socrates-venv"), str(self.home / "socrates-venv")], check=True)

    def receive(self, workdir: str, blocks: dict[str, tuple[str, dict[str, str]]]) -> None:
        """What SkyPilot does before it runs anything: the workdir synced into ~/sky_workdir by its rsync
        command and filters, and each block (`setup`, `run`: its body and the envs exported to it) written
        as SkyPilot's script file. One SkyPilot process for both."""
        spec = self.root / f"receive_{self.rank}.json"
        spec.write_text(json.dumps({"workdir": workdir.rstrip("/") + "/", "target": str(self.workdir), "blocks": [
            {"kind": kind, "body": body, "envs": envs, "out": str(self.script(kind))}
            for kind, (body, envs) in blocks.items()]}))
        _sky(_RECEIVE, str(spec), timeout=300)

    def script(self, kind: str) -> Path:
        return self.root / f"sky_{kind}_{self.rank}.sh"

    def block(self, kind: str, log: Path, timeout: float, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start the `setup` or `run` block's script (written by `receive`) as SkyPilot does: `/bin/bash -i FILE`."""
        env = self.env()
        env.update(extra_env or {})
        out = open(log, "ab")
        return subprocess.Popen(["/bin/bash", "-i", str(self.script(kind))], env=env, cwd=self.home,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@functools.lru_cache(maxsize=None)
def user_env_commands(uv: str) -> str:
    """SkyPilot's own commands that make its user env on a fresh node (`uv` for its ~/.local/bin/uv): one
    SkyPilot process for every node of a session."""
    return _sky(_USER_ENV, shlex_quote(uv)).strip()


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def setup_envs(task: Task, node: int, ips: list[str], gpus: int) -> dict[str, str]:
    """What SkyPilot exports to the setup block (cloud_vm_ray_backend._setup)."""
    envs = dict(task.envs)
    envs.update({"SKYPILOT_TASK_ID": "sky-rehearsal-task", "SKYPILOT_NUM_NODES": str(len(ips)),
                 "SKYPILOT_SETUP_NODE_IPS": "\n".join(ips), "SKYPILOT_SETUP_NODE_RANK": str(node),
                 "SKYPILOT_SETUP_NUM_GPUS_PER_NODE": str(gpus)})
    return envs


def run_envs(task: Task, node: int, ips: list[str], gpus: int) -> dict[str, str]:
    """What SkyPilot's job codegen exports to the run block on node `node`."""
    envs = dict(task.envs)
    envs.update({"SKYPILOT_TASK_ID": "sky-rehearsal-task", "SKYPILOT_NODE_IPS": "\n".join(ips),
                 "SKYPILOT_NUM_NODES": str(len(ips)), "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus),
                 "SKYPILOT_NODE_RANK": str(node), "SKYPILOT_INTERNAL_JOB_ID": "1"})
    return envs


def bootstrap_uv(dest: Path) -> str:
    """The pinned uv (requirements/uv.lock) for SkyPilot's own user-env commands, as the setup block installs it."""
    uv = dest / "bin" / "uv"
    if not uv.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes", "--target",
                        str(dest), "-r", str(REPO / "requirements" / "uv.lock")], check=True, timeout=600)
    return str(uv)


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a block's bash and every process under it at once, as a machine that ends takes them all:
    not its process group only (`bash -i` gives each command a group of its own, and job.deadline starts
    the job in a session of its own). Returns the pids killed."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # ppid -> pid
    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    for pid in tree:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    proc.wait()
    return tree


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def build_image_as_script(dockerfile: Path, context: Path, app: Path, opt: Path, env: dict[str, str]) -> None:
    """No Docker daemon here: the Dockerfile's COPY and RUN steps in order, COPY from the build `context`
    into `app` (the WORKDIR), every RUN but the apt-get one (no Ubuntu here) with bash in `app`, `/opt/`
    pointed at `opt`. ENV lines are the caller's `env` (PATH, caches)."""
    logical = re.sub(r"\\\n", " ", dockerfile.read_text())
    ran = 0
    for line in logical.splitlines():
        word, _, args = line.strip().partition(" ")
        if word == "COPY":
            *sources, dest = args.split()
            for src in sources:  # Docker's rule: a folder's contents go into dest; a file into dest/ by its name
                target = app / dest / Path(src).name if dest.endswith("/") else app / dest
                if (context / src).is_dir():
                    shutil.copytree(context / src, app / dest, dirs_exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(context / src, target)
        elif word == "RUN" and "apt-get" not in args:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", args.replace("/opt/", f"{opt}/")], cwd=app,
                               env=env, capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(f"RUN {args[:200]} exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}")
            ran += 1
    if not ran:
        raise RuntimeError(f"{dockerfile}: no RUN step to rehearse")
