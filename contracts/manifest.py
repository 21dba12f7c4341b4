"""The artifacts manifest: every output file with its size and sha256, plus what made it.

The job writes `manifest.json` last (atomically) over its output folder; the launcher verifies
the downloaded copy against it before it calls a run done. Secrets never enter a manifest:
`build` refuses metadata whose keys or values look like credentials.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Iterable

from contracts._io import atomic_write_json, sha256_file
from contracts.errors import ContractError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Files that keep changing after the manifest is written, or are not results.
DEFAULT_EXCLUDE = (MANIFEST_FILE, "events.jsonl", "job.log", "checkpoints/*")
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_?key|credentials?)($|_)", re.I)
_SECRET_VALUE = re.compile(r"(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9]{20,})")


class ManifestError(ContractError):
    pass


def build(root: str | os.PathLike, meta: dict | None = None,
          exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict:
    """List every file under `root` (sorted, relative POSIX paths) with size and sha256."""
    root = Path(root)
    patterns = tuple(exclude)
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(fnmatch.fnmatchcase(rel, pat) for pat in patterns):
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    meta = dict(meta or {})
    _refuse_secrets(meta)
    return {"schema": SCHEMA_VERSION, "files": files, **meta}


def write(root: str | os.PathLike, meta: dict | None = None, **kw: Any) -> dict:
    manifest = build(root, meta, **kw)
    atomic_write_json(Path(root) / MANIFEST_FILE, manifest)
    return manifest


def load(root_or_file: str | os.PathLike) -> dict:
    import json

    path = Path(root_or_file)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (the job writes it last; the run did not finish)") from None
    except ValueError as e:
        raise ManifestError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ManifestError(f"{path}: manifest has no 'files' list")
    return manifest


def verify(root: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Problems found comparing `root` to its manifest; an empty list means every file checks out."""
    root = Path(root)
    manifest = manifest if manifest is not None else load(root)
    problems = []
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{entry['path']}: size {path.stat().st_size} != {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 mismatch")
    return problems


def verify_or_raise(root: str | os.PathLike, manifest: dict | None = None) -> dict:
    manifest = manifest if manifest is not None else load(root)
    problems = verify(root, manifest)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(f"{root}: artifacts do not match the manifest: {problems[0]}{more}")
    return manifest


def _refuse_secrets(obj: Any, where: str = "meta") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if _SECRET_KEY.search(str(k)) and v not in (None, "", False):
                raise ManifestError(f"manifest {where}.{k}: refusing to record a secret-looking field")
            _refuse_secrets(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _refuse_secrets(v, f"{where}[{i}]")
    elif isinstance(obj, str) and _SECRET_VALUE.search(obj):
        raise ManifestError(f"manifest {where}: refusing to record a credential-looking value")
