"""The artifacts manifest: every output file with its size and sha256, plus what made it.

The job writes `manifest.json` last (atomically) over its output folder; the launcher verifies
the downloaded copy against it before it calls a run done. Secrets never enter a manifest:
`build` refuses metadata whose keys or values look like credentials.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable

from contracts import remote
from contracts._io import atomic_write_json, sha256_file
from contracts.errors import ContractError
from contracts.events import EVENTS_FILE, LINE_PREFIX, dumps, make

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Files that keep changing after the manifest is written, or are not results.
DEFAULT_EXCLUDE = (MANIFEST_FILE, EVENTS_FILE, "job.log", "checkpoints/*")
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_?key|credentials?)($|_)", re.I)
_SECRET_VALUE = re.compile(r"(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9]{20,})")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What a trained run's manifest must list: a PEFT adapter (its config and its weights).
ADAPTER_CONFIG = "adapter/adapter_config.json"
ADAPTER_WEIGHTS = ("adapter/adapter_model.safetensors", "adapter/adapter_model.bin")
# ... or, for train.method: full, the whole model's weights (job/full.py): its config and safetensors shards.
FULL_CONFIG = "model/config.json"
FULL_WEIGHTS = re.compile(r"^model/model(-\d{5}-of-\d{5})?\.safetensors$")
# Folders written after training (sky/train.yaml's evaluations): `extend` lists them afterwards.
LATE_FOLDERS = ("eval", "eval-base")


class ManifestError(ContractError):
    pass


def excluded(rel: str, patterns: Iterable[str] = DEFAULT_EXCLUDE) -> bool:
    """Whether `rel` (a relative POSIX path) matches one of the patterns a manifest leaves out."""
    return any(fnmatch.fnmatchcase(rel, pat) for pat in patterns)


def build(root: str | os.PathLike, meta: dict | None = None,
          exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict:
    """List every file under `root` (sorted, relative POSIX paths) with size and sha256."""
    root = Path(root)
    patterns = tuple(exclude)
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if excluded(rel, patterns):
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
    path = Path(root_or_file)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        manifest = remote.load_file(path)  # finite numbers, bounded integers and size
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (the job writes it last; the run did not finish)") from None
    except ValueError as e:
        raise ManifestError(f"{path}: manifest is not valid JSON ({e})") from None
    return validate(manifest, str(path))


def check_path(rel: Any, where: str = "manifest") -> str:
    """`rel` if it is a relative, normalized POSIX path that stays inside its root; else ManifestError."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{where}: path {rel!r} is not accepted (a non-empty string)")
    bad = ("\\" in rel or "\x00" in rel or rel.startswith("/") or posixpath.normpath(rel) != rel
           or any(part in ("", ".", "..") for part in rel.split("/")))
    if bad:
        raise ManifestError(f"{where}: path {rel!r} is not accepted (relative, normalized, inside the output folder)")
    return rel


def validate(manifest: Any, where: str = "manifest", reserved: Iterable[str] = ()) -> dict:
    """The manifest checked against its schema before anything uses it (what comes back is untrusted).

    `schema` 1; `files` a list of {path, size, sha256}: path relative and normalized (no absolute, `..`,
    `.` or empty parts), no duplicates (nor a file listed under another listed file), size an integer >= 0,
    sha256 64 lowercase hex digits. Top-level names in `reserved` are refused (the launcher's own files).
    """
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: not accepted (a JSON object with a 'files' list)")
    if manifest.get("schema") != SCHEMA_VERSION or isinstance(manifest.get("schema"), bool):
        raise ManifestError(f"{where}: schema {manifest.get('schema')!r} is not accepted (expected {SCHEMA_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise ManifestError(f"{where}: manifest has no 'files' list")
    seen: set[str] = set()
    reserved = set(reserved)
    for i, entry in enumerate(files):
        at = f"{where}: files[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"path", "size", "sha256"}:
            raise ManifestError(f"{at} is not accepted (an object with exactly path, size, sha256)")
        rel = check_path(entry["path"], at)
        size, digest = entry["size"], entry["sha256"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{at} ({rel}): size {size!r} is not accepted (an integer >= 0)")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ManifestError(f"{at} ({rel}): sha256 {digest!r} is not accepted (64 lowercase hex digits)")
        if rel in seen:
            raise ManifestError(f"{at}: {rel} is listed twice")
        if rel.split("/")[0] in reserved or rel == MANIFEST_FILE:
            raise ManifestError(f"{at}: {rel} is not accepted (a name the launcher keeps for itself)")
        seen.add(rel)
    for rel in seen:
        parents = {"/".join(rel.split("/")[:k]) for k in range(1, rel.count("/") + 1)}
        if parents & seen:
            raise ManifestError(f"{where}: {rel} is listed under a path that is itself listed as a file")
    return manifest


def extend(root: str | os.PathLike, folders: Iterable[str] = LATE_FOLDERS) -> dict | None:
    """Add the files under `folders` (written after the manifest, e.g. evaluations) to root's manifest,
    keeping every existing entry and the metadata as they are. No manifest: nothing to extend (None)."""
    root = Path(root)
    if not (root / MANIFEST_FILE).is_file():
        return None
    manifest = load(root)
    listed = {e["path"] for e in manifest["files"]}
    for folder in folders:
        base = root / folder
        if not base.is_dir() or base.is_symlink():
            continue
        for path in sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(root).as_posix()
            if rel not in listed:
                manifest["files"].append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    atomic_write_json(root / MANIFEST_FILE, manifest)
    return manifest


def weight_files(manifest: dict) -> set[str]:
    """A full fine-tune's weight shards (model/model*.safetensors) the manifest lists: what `up --weights
    leave` does not pull back."""
    return {e["path"] for e in manifest["files"] if FULL_WEIGHTS.match(e["path"])}


def verify(root: str | os.PathLike, manifest: dict | None = None, left: Iterable[str] = ()) -> list[str]:
    """Problems found comparing the files `root`'s manifest lists; an empty list means each checks out.
    `left`: listed files deliberately not pulled back (`up --weights leave`): not looked for here.

    Only the listed files are looked at (runs/<id>/ holds the launcher's files too); a listed path that
    is a symlink or not a regular file is a problem. `verify_tree` also refuses anything unlisted.
    """
    root = Path(root)
    manifest = validate(manifest, str(root)) if manifest is not None else load(root)
    problems = []
    left = set(left)
    for entry in manifest["files"]:
        rel = entry["path"]
        if rel in left:
            continue
        path = root / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        except OSError as e:  # a listed parent that is a file, a name too long, ...
            problems.append(f"{rel}: unreadable ({e.strerror or e})")
            continue
        if _link_inside(root, rel):
            problems.append(f"{rel}: a symlink on its path (not accepted)")
        elif not stat.S_ISREG(st.st_mode):
            problems.append(f"{rel}: not a regular file")
        elif st.st_size != entry["size"]:
            problems.append(f"{rel}: size {st.st_size} != {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


def verify_tree(root: str | os.PathLike, manifest: dict | None = None, reserved: Iterable[str] = (),
                require_adapter: bool = True, exempt: Iterable[str] = DEFAULT_EXCLUDE,
                left: Iterable[str] = ()) -> list[str]:
    """Problems with a whole downloaded tree: `verify` plus no symlinks or special files anywhere, no
    file the manifest does not list (except `exempt`: the log, events, checkpoints, the manifest), and
    (with `require_adapter`) a listed adapter, or a full fine-tune's model (model/config.json and its
    model*.safetensors shards, every shard a present model.safetensors.index.json names). An empty list:
    the tree is exactly what the job wrote."""
    root = Path(root)
    manifest = validate(manifest, str(root), reserved) if manifest is not None else \
        validate(load(root), str(root / MANIFEST_FILE), reserved)
    patterns = tuple(exempt)
    listed = {e["path"] for e in manifest["files"]}
    problems = []
    has_adapter = ADAPTER_CONFIG in listed and bool(listed & set(ADAPTER_WEIGHTS))
    has_full = FULL_CONFIG in listed and any(FULL_WEIGHTS.match(p) for p in listed)
    if require_adapter and not (has_adapter or has_full):
        problems.append(f"no adapter in the manifest (it must list {ADAPTER_CONFIG} and one of "
                        f"{', '.join(ADAPTER_WEIGHTS)}; or, for a full fine-tune, {FULL_CONFIG} and "
                        "model/model*.safetensors)")
    elif require_adapter and not has_adapter:
        problems += _full_shards_missing(root, listed)
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):  # never follows links
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{rel}: a symlink (not accepted in what comes back)")
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: not a regular file (not accepted in what comes back)")
            else:
                found.add(rel)
    extra = sorted(r for r in found - listed if not excluded(r, patterns))
    if extra:
        problems.append(f"not in the manifest: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return problems + verify(root, manifest, left=left)


def verify_or_raise(root: str | os.PathLike, manifest: dict | None = None, tree: bool = False, **kw: Any) -> dict:
    manifest = manifest if manifest is not None else load(root)
    problems = verify_tree(root, manifest, **kw) if tree else verify(root, manifest, left=kw.get("left", ()))
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ManifestError(f"{root}: artifacts do not match the manifest: {'; '.join(problems[:3])}{more}")
    return manifest


def _full_shards_missing(root: Path, listed: set[str]) -> list[str]:
    """A sharded full model: every shard its index names is listed (the index is read only once it is
    itself listed; what is listed is checked against its sha256 by `verify`)."""
    index = "model/model.safetensors.index.json"
    shards = {p for p in listed if FULL_WEIGHTS.match(p) and p != "model/model.safetensors"}
    if not shards:
        return []
    if index not in listed:
        return [f"{index}: not in the manifest, but the model is sharded"]
    try:
        weight_map = json.loads((root / index).read_text(encoding="utf-8"))["weight_map"]
        named = {f"model/{v}" for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{index}: unreadable (a JSON object with a weight_map)"]
    missing = sorted(named - shards)
    return [f"{index} names {', '.join(missing[:3])}, not in the manifest"] if missing else []


def _link_inside(root: Path, rel: str) -> bool:
    """Whether any component of root/rel (below root) is a symlink."""
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            return True
    return False


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


def data_files(path: str | os.PathLike) -> list[Path]:
    """The files of a data file or folder as they are checked, hashed and sent (one walk for all three):
    the regular files under it, sorted, never following a link. A symbolic link (to a file or a folder,
    a loop) or a special file anywhere is a ContractError naming it: copy the files in instead."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):  # never follows links
        for name in sorted(dirnames) + sorted(filenames):
            entry = Path(dirpath) / name
            mode = os.lstat(entry).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                raise ContractError(f"--data {path}: {entry.relative_to(path).as_posix()} is {what} (not accepted: "
                                    "a data folder holds plain files and folders; copy the files in)")
            if stat.S_ISREG(mode):
                files.append(entry)
    return sorted(files)


def data_hash(path: str | os.PathLike) -> str:
    """sha256 of a data file or folder as sent: every file's path relative to `path` (a file: "") with
    its size and sha256. Independent of where it lies, so the launcher (what it sent) and the machine
    (what the job was given, `data-hash`) compute the same value for the same bytes."""
    path = Path(path)
    files = data_files(path)
    listing = {("" if p == path else p.relative_to(path).as_posix()): [p.stat().st_size, sha256_file(p)]
               for p in files}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    # on the machine: `extend OUT` after the evaluations; `data-hash DATA` before prepare (an event line)
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] == "extend":
        extend(sys.argv[2], sys.argv[3:] or LATE_FOLDERS)
    elif len(sys.argv) == 3 and sys.argv[1] == "data-hash":
        print(LINE_PREFIX + dumps(make("log", message="data received", data_sha256=data_hash(sys.argv[2]))),
              flush=True)
    else:
        sys.exit("usage: python3 -m contracts.manifest extend OUT_DIR [FOLDER ...] | data-hash PATH")


def move_listed(src: Path, dest: Path, manifest: dict) -> None:
    """Move what a verified `manifest` lists (its top-level names) and the manifest itself from `src`
    into `dest`, replacing what `dest` had under those names; then remove `src`. Call it only after
    verification passed on `src`: nothing else in `dest` is touched."""
    src, dest = Path(src), Path(dest)
    for name in sorted({e["path"].split("/")[0] for e in manifest["files"]} | {MANIFEST_FILE}):
        entry, target = src / name, dest / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        entry.rename(target)
    shutil.rmtree(src, ignore_errors=True)
