"""The staged folder: exactly what a run's machine gets, built fresh per run (runs/<id>/code).

Every backend ships it (SkyPilot syncs it as the task's workdir). It holds the job's code (job/,
contracts/, as installed), the locks setup installs, the Dockerfile and the one table the job reads;
never the user's cwd, a checkout's other files, or site-packages. The run config travels in the task's
envs (CONFIG_YAML), so this folder is the same for every run of one installed version.
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from launcher import resources
from launcher.registry import Run

CODE_PACKAGES = ("job", "contracts")
TABLES = ("configs/socsci210_stats.json",)  # job/check.py reads it beside job/
FOLDER = "code"  # runs/<id>/code
LOCAL_REPOSITORY = "socrates-launch-job"  # the job image built from this folder (`image build`, an SSH host)


@dataclass(frozen=True)
class Staged:
    path: Path
    files: int
    bytes: int

    def line(self) -> str:
        """What the dry run shows: where, how big, what is in it."""
        top = sorted(p.name + ("/" if p.is_dir() else "") for p in self.path.iterdir())
        return f"workdir: {self.path} ({self.files} files, {self.bytes:,} bytes: {' '.join(top)})"


def build(dest: Path) -> Staged:
    """Stage the job's files into `dest` (created; it must not exist yet)."""
    dest.mkdir(parents=True)
    for name in CODE_PACKAGES:
        # found without importing it (job/ imports torch lazily, but nothing of the job needs to run here)
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"the installed package {name!r} was not found: reinstall socrates-launch")
        shutil.copytree(Path(list(spec.submodule_search_locations)[0]), dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for src in [*resources.locks(), resources.path(resources.DOCKERFILE), *map(resources.path, TABLES)]:
        rel = src.relative_to(resources.path("."))
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / rel)  # a copy, never a link: the folder must stand alone when synced
    files = [p for p in dest.rglob("*") if p.is_file()]
    return Staged(dest, len(files), sum(p.stat().st_size for p in files))


def lock_tag() -> str:
    """The job image's tag: `lock-` + 12 hex of sha256(job.lock, uv.lock, Dockerfile), what it installs and how."""
    h = hashlib.sha256()
    for rel in ("requirements/job.lock", "requirements/uv.lock", resources.DOCKERFILE):
        h.update(resources.path(rel).read_bytes())
        h.update(b"\0")
    return f"lock-{h.hexdigest()[:12]}"


def local_ref() -> str:
    return f"{LOCAL_REPOSITORY}:{lock_tag()}"


def for_run(run: Run) -> Staged:
    """The run's own staged folder, runs/<id>/code, built afresh (a leftover from a killed launch is replaced)."""
    dest = Path(run.dir).absolute() / FOLDER  # SkyPilot resolves a relative workdir against its own cwd
    if dest.is_symlink() or dest.is_file():
        dest.unlink()  # never followed: only runs/<id>/code itself is replaced
    elif dest.is_dir():
        shutil.rmtree(dest)
    return build(dest)


def entries(root: Path) -> list[str]:
    """The staged folder's top-level names (what a backend ships from it)."""
    return sorted(p.name for p in root.iterdir())

