"""A run's bucket, seen from the launcher: where a managed run lives in it, create, download, delete.

MINIMAL VERSION (branch managed): only `file://` (a local folder standing in for a bucket: what the
tests and the fake managed-jobs controller use). Branch bucket's launcher/bucket.py (s3:// r2:// gs://
with their client libraries, resumable and verified downloads) replaces this file; the names and
signatures here are that module's, so the managed backend works with either.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from contracts.errors import ContractError

SCHEMES = ("s3", "r2", "gs", "file")
ACCEPTED = "s3://NAME[/PREFIX], r2://NAME[/PREFIX], gs://NAME[/PREFIX] or file:///ABSOLUTE/FOLDER"


class BucketError(ContractError):
    """A bucket URL or operation refused: one line."""


def default_name(run_id: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    return f"socrates-{slug}"[:63].rstrip("-.")


def default_url(run_id: str, scheme: str = "s3") -> str:
    return f"{scheme}://{default_name(run_id)}"


def parse_url(url: Any) -> tuple[str, str, str]:
    """(scheme, bucket name or folder, key prefix); BucketError when the URL is not accepted."""
    if not isinstance(url, str) or "://" not in url:
        raise BucketError(f"bucket {url!r} is not accepted ({ACCEPTED})")
    scheme, rest = url.split("://", 1)
    if scheme not in SCHEMES:
        raise BucketError(f"bucket {url!r}: scheme {scheme!r} is not accepted ({ACCEPTED})")
    if scheme == "file":
        if not rest.startswith("/") or os.path.normpath(rest) != rest.rstrip("/") or rest == "/":
            raise BucketError(f"bucket {url!r}: a file:// bucket is an absolute, normalized folder path ({ACCEPTED})")
        return scheme, rest.rstrip("/"), ""
    name, _, prefix = rest.partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name):
        raise BucketError(f"bucket {url!r}: name {name!r} is not accepted ({ACCEPTED})")
    return scheme, name, prefix.strip("/")


class Bucket:
    def __init__(self, url: str, scheme: str, name: str, prefix: str):
        self.url, self.scheme, self.name, self.prefix = url, scheme, name, prefix

    @classmethod
    def from_url(cls, url: str) -> "Bucket":
        return cls(url, *parse_url(url))

    @property
    def mount_source(self) -> str:
        return f"{self.scheme}://{self.name}"

    def run_prefix(self, run_id: str) -> str:
        return f"{self.prefix}/{run_id}/" if self.prefix else f"{run_id}/"

    def out_prefix(self, run_id: str) -> str:
        return self.run_prefix(run_id) + "out/"

    @property
    def _root(self) -> Path:
        if self.scheme != "file":  # parsing any URL is fine; talking to a store needs its client
            raise BucketError(f"bucket {self.url}: this build reads only file:// buckets (the s3/r2/gs client is "
                              "branch bucket's launcher/bucket.py)")
        return Path(self.name)

    def exists(self) -> bool:
        return self._root.is_dir()

    def create(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)

    def delete(self) -> None:
        shutil.rmtree(self._root / self.prefix if self.prefix else self._root, ignore_errors=True)

    def download(self, prefix: str, dest: str | os.PathLike) -> None:
        """Copy everything under `prefix` into `dest` (checkpoints left out). Links are copied as links:
        the caller's verification refuses them (what comes back is untrusted)."""
        src = self._root / prefix.strip("/")
        if not src.is_dir():
            raise BucketError(f"{self.mount_source}/{prefix}: nothing there")
        shutil.copytree(src, Path(dest), dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
