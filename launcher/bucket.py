"""A run's bucket, seen from the launcher: create, download (then verify), delete.

MINIMAL VERSION (branch managed): only `file://` (a local folder standing in for a bucket, what the
tests use). The object-store client for s3:// gs:// r2:// (resumable download, verification against
the manifest found there) is branch bucket's launcher/bucket.py, which replaces this file; the names
and signatures here are that module's.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from contracts.errors import ContractError

SCHEMES = ("s3://", "gs://", "r2://", "file://")


def check_url(url: str) -> str:
    """A bucket URL this launcher can mount and read back, else ContractError (exit 2, one line)."""
    if not isinstance(url, str) or not url.startswith(SCHEMES) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise ContractError(f"--bucket {url!r}: not accepted (s3://NAME[/PATH], gs://NAME[/PATH], r2://NAME[/PATH]; "
                            "file:///PATH for a local folder)")
    return url.rstrip("/")


class Bucket:
    def __init__(self, url: str, root: Path):
        self.url, self.root = url, root

    @classmethod
    def from_url(cls, url: str) -> "Bucket":
        url = check_url(url)
        if not url.startswith("file://"):
            raise ContractError(f"--bucket {url}: this build reads only file:// buckets (the s3/gs/r2 client is "
                                "launcher/bucket.py from branch bucket)")
        return cls(url, Path(url[len("file://"):]))

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return self.root.is_dir()

    def download(self, prefix: str, dest: Path) -> None:
        """Copy everything under `prefix` into `dest` (checkpoints left out). Links are copied as links:
        the caller's verification refuses them (what comes back is untrusted)."""
        src = self.root / prefix.strip("/")
        if not src.is_dir():
            raise FileNotFoundError(f"{self.url}/{prefix.strip('/')}: nothing there")
        shutil.copytree(src, dest, dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))

    def delete(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
