"""`socrates-launch image build [--push REPO]`: the job image (Dockerfile) with docker buildx.

The tag derives from requirements/job.lock and the Dockerfile (`lock-<12 hex of their sha256>`): a
changed lock is a new image. Without --push the image is loaded into the local docker; with --push REPO
it goes to that repository and the pinned reference (REPO:TAG@sha256:DIGEST) is printed for
`socrates-launch up --image REF`. `image tag` prints the reference without building.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from contracts.config import IMAGE_REF
from contracts.errors import ContractError
from launcher import stage as stagelib
from launcher.stage import local_ref, lock_tag

PLATFORM = "linux/amd64"  # the lock is compiled for x86_64 manylinux


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("build", "tag"), help="build: build (and with --push, push) the image; "
                   "tag: print the reference it gets, build nothing")
    p.add_argument("--push", metavar="REPO", default=None,
                   help="registry repository to push to, e.g. ghcr.io/you/socrates-job (the tag is derived from the lock)")


def check_repository(repo: str) -> str:
    """A registry repository without tag or digest (the tag is the lock's)."""
    last = repo.rsplit("/", 1)[-1]
    if "@" in repo or ":" in last or not IMAGE_REF.fullmatch(repo):
        raise ContractError(f"--push {repo!r}: not accepted (a registry repository without a tag, e.g. "
                            "ghcr.io/you/socrates-job; the tag is derived from requirements/job.lock)")
    return repo


def run(args: argparse.Namespace) -> int:
    ref = f"{check_repository(args.push)}:{lock_tag()}" if args.push else local_ref()
    if args.action == "tag":
        print(ref)
        return 0
    docker = require_docker()
    with tempfile.TemporaryDirectory(prefix="socrates-image-") as tmp:
        meta = Path(tmp) / "metadata.json"
        # The build context is the staged folder (launcher/stage.py): what the SSH host builds from too.
        context = stagelib.build(Path(tmp) / stagelib.FOLDER).path
        cmd = [docker, "buildx", "build", "--platform", PLATFORM, "-f", str(context / "Dockerfile"), "-t", ref,
               "--label", f"org.socrates-launch.lock={lock_tag()}", "--metadata-file", str(meta),
               "--push" if args.push else "--load", str(context)]
        print(f"building {ref} ({PLATFORM}) from Dockerfile and requirements/job.lock", flush=True)
        rc = subprocess.run(cmd, cwd=context).returncode
        if rc != 0:
            print(f"socrates-launch image: error: docker buildx build exited {rc} (its output is above)")
            return 1
        digest = _digest(meta)
    if args.push:
        pinned = f"{ref}@{digest}" if digest else ref
        print(f"pushed {pinned}")
        print(f"run it: socrates-launch up --image {pinned}")
    else:
        print(f"built {ref} (local docker only; `--push REPO` puts it where SkyPilot can pull it)")
    return 0


def require_docker() -> str:
    """docker with a reachable daemon and buildx, or one line saying which is missing (exit 2)."""
    docker = shutil.which("docker")
    if docker is None:
        raise ContractError("docker is not installed (install Docker with the buildx plugin)")
    info = _run([docker, "info", "--format", "{{.ServerVersion}}"])
    if info.returncode != 0:
        why = _last_line(info.stderr + info.stdout) or f"docker info exited {info.returncode}"
        raise ContractError(f"no docker daemon reachable ({why}); start it or build on a machine "
                            "that runs one")
    bx = _run([docker, "buildx", "version"])
    if bx.returncode != 0:
        raise ContractError("docker buildx is not installed (the docker-buildx-plugin package, "
                            f"or docs.docker.com/go/buildx): {_last_line(bx.stderr + bx.stdout)}")
    return docker


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{' '.join(cmd[1:3])} timed out after 30 s")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _digest(meta: Path) -> str | None:
    """The pushed manifest's digest from buildx's --metadata-file (untrusted: checked for shape)."""
    try:
        digest = json.loads(meta.read_text()).get("containerimage.digest")
    except (OSError, ValueError, AttributeError):
        return None
    return digest if re.fullmatch(r"sha256:[0-9a-f]{64}", str(digest)) else None  # str(): a non-string never matches
