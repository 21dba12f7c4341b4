"""Buckets: where a managed run's checkpoints and out/ live, and how the launcher gets them back.

A managed run (`up --spot` / `up --managed`) mounts a bucket on the machine (launcher/task.py:
`MOUNT_CACHED` at `/socrates-bucket`); the job writes `<run id>/out/` (adapter, manifest.json, eval,
events, checkpoints) into it. The launcher downloads `out/` from the bucket, also when it was off
for the whole run, with the provider's own client library, and verifies it with contracts/manifest.py:

    b = Bucket.from_url("s3://my-bucket/some/prefix")       # or r2://, gs://, file:///abs/folder
    b.download(b.out_prefix(run_id), runs_dir / run_id)      # resumable, verified, then moved in

URL forms (a bad one is a ContractError: one line, exit 2):
  s3://NAME[/PREFIX]     AWS S3 (boto3; credentials from the environment or ~/.aws, as boto3 reads
                         them; `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` point it at another S3 server)
  r2://NAME[/PREFIX]     Cloudflare R2 through its S3 API (boto3): the endpoint from `R2_ENDPOINT_URL`
                         or SkyPilot's ~/.cloudflare/accountid; credentials from the `r2` profile of
                         ~/.cloudflare/r2.credentials (SkyPilot's file) when it exists, else the environment
  gs://NAME[/PREFIX]     Google Cloud Storage (google-cloud-storage, application-default credentials)
  file:///ABS/FOLDER     a local folder standing in for a bucket (tests, the fake managed-jobs controller)
boto3 and google-cloud-storage are optional extras (`pip install 'socrates-launch[bucket]'`, `[gcs]`);
imported only when a bucket of that kind is used. Credentials are never written anywhere by this module.
"""
from __future__ import annotations

import configparser
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from contracts import manifest as manifest_lib
from contracts._io import atomic_write_json, sha256_file
from contracts.errors import ContractError
from launcher import registry

SCHEMES = ("s3", "r2", "gs", "file")
ACCEPTED = "s3://NAME[/PREFIX], r2://NAME[/PREFIX], gs://NAME[/PREFIX] or file:///ABSOLUTE/FOLDER"
# S3/R2/GCS bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting and ending alnum.
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_PART = re.compile(r"^[A-Za-z0-9._=+@-]+$")
PARTIAL_DIR = registry.BUCKET_PARTIAL_DIR
STATE_FILE = registry.BUCKET_STATE_FILE
RESERVED = registry.RESERVED  # names in runs/<id>/ that the launcher keeps: a manifest listing one is refused
CHUNK = 1 << 20
MAX_MANIFEST = 16 << 20
OWNER_KEY = ".socrates-owner.json"  # at the bucket's root: which run made it (never under a run's out/)
MAX_OWNER = 4096


class BucketError(ContractError):
    """A bucket that can't be used or a download that is refused: one line for the user."""


@dataclass(frozen=True)
class Obj:
    key: str          # the full object key
    size: int
    etag: str         # the store's version tag (S3 ETag, GCS generation, file: size+mtime_ns)
    kind: str = "file"  # file | link | special (only file:// can say the latter two)


def default_name(run_id: str) -> str:
    """The bucket made for a run when none is given: `socrates-<run id>`, lowercased, cut to fit 63 with a
    hash of the whole run id (two ids that share their first 50 characters never share a bucket)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    name = f"{f'socrates-{slug}'[:54].rstrip('-.')}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"
    if not _NAME.match(name):
        raise BucketError(f"run id {run_id!r}: no valid bucket name can be derived from it")
    return name


def default_url(run_id: str, scheme: str = "s3") -> str:
    if scheme not in SCHEMES or scheme == "file":
        raise BucketError(f"bucket scheme {scheme!r} is not accepted for a created bucket (s3, r2 or gs)")
    return f"{scheme}://{default_name(run_id)}"


def url_for_run(run: registry.Run) -> str:
    """The run's bucket: the config's storage.bucket (--bucket URL), where the run writes under
    `<run id>/`; else a bucket named after the run, made for it on --cloud's store (gcp: gs://, any
    other or none: s3://)."""
    store = {"gcp": "gs"}.get(str(run.options.cloud or "").lower(), "s3")
    return (given_bucket(run) or "").rstrip("/") or default_url(run.id, store)


def given_bucket(run: registry.Run) -> str | None:
    """The bucket the run was given (--bucket, the config's storage.bucket); None: one is made for it."""
    return (run.config.get("storage") or {}).get("bucket")


def parse_url(url: Any) -> tuple[str, str, str]:
    """(scheme, bucket name or folder, key prefix without slashes at the ends); ContractError if bad."""
    if not isinstance(url, str) or "://" not in url:
        raise BucketError(f"bucket {url!r} is not accepted ({ACCEPTED})")
    scheme, rest = url.split("://", 1)
    if scheme not in SCHEMES:
        raise BucketError(f"bucket {url!r}: scheme {scheme!r} is not accepted ({ACCEPTED})")
    if scheme == "file":
        if not rest.startswith("/") or "\x00" in rest or os.path.normpath(rest) != rest.rstrip("/") or rest == "/":
            raise BucketError(f"bucket {url!r}: a file:// bucket is an absolute, normalized folder path ({ACCEPTED})")
        return scheme, rest.rstrip("/"), ""
    name, _, prefix = rest.partition("/")
    if not _NAME.match(name) or ".." in name:
        raise BucketError(f"bucket {url!r}: name {name!r} is not accepted (3-63 lowercase letters, digits, "
                          f"dots, hyphens; starting and ending with a letter or digit)")
    prefix = prefix.strip("/")
    if prefix and not all(_PREFIX_PART.match(p) and p not in (".", "..") for p in prefix.split("/")):
        raise BucketError(f"bucket {url!r}: prefix {prefix!r} is not accepted (path parts of letters, "
                          f"digits and ._=+@-)")
    return scheme, name, prefix


class Bucket:
    """One bucket (plus an optional key prefix) and the operations a managed run needs."""

    def __init__(self, url: str, scheme: str, name: str, prefix: str, store: "_Store"):
        self.url, self.scheme, self.name, self.prefix, self._store = url, scheme, name, prefix, store

    @classmethod
    def from_url(cls, url: str) -> "Bucket":
        scheme, name, prefix = parse_url(url)
        store = (_FileStore(Path(name)) if scheme == "file" else _GCSStore(name) if scheme == "gs"
                 else _S3Store(name, r2=(scheme == "r2")))
        return cls(url, scheme, name, prefix, store)

    def __repr__(self) -> str:
        return f"Bucket({self.url!r})"

    # --- where a run lives in the bucket -------------------------------------------------------
    @property
    def mount_source(self) -> str:
        """What SkyPilot mounts (`file_mounts.<path>.source`): the bucket itself, never a prefix."""
        return f"{self.scheme}://{self.name}"

    def run_prefix(self, run_id: str) -> str:
        """`[PREFIX/]<run id>/`: everything of one run (out/, checkpoints under out/)."""
        return f"{self.prefix}/{run_id}/" if self.prefix else f"{run_id}/"

    def out_prefix(self, run_id: str) -> str:
        return self.run_prefix(run_id) + "out/"

    # --- lifecycle -------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self._store.exists()

    def create(self) -> None:
        """Make the bucket (a no-op when it is there already and ours to use)."""
        if not self._store.exists():
            self._store.create()

    def create_for(self, run_id: str, token: str) -> None:
        """Make the bucket for run `run_id`, or fail (BucketError) when it was there already or another
        create raced this one: S3 (us-east-1) answers 200 to a second create of a bucket one owns, so what
        tells is the owner marker, put only if absent with this run's token (`owned_by` checks it)."""
        if self._store.exists():
            raise BucketError(f"the bucket {self.mount_source} already exists: a bucket made for a run must be new")
        self._store.create()
        marker = json.dumps({"run_id": run_id, "token": token}).encode()
        if not self._store.put_new(OWNER_KEY, marker):
            raise BucketError(f"the bucket {self.mount_source} was made for another run at the same time "
                              f"(its {OWNER_KEY} is not this run's): not used")

    def owned_by(self, run_id: str, token: str) -> bool:
        """Whether the bucket's owner marker says it was made for run `run_id` with `token`."""
        try:
            raw = self._store.read(OWNER_KEY, MAX_OWNER)
            owner = json.loads(raw.decode("utf-8")) if raw is not None else None
        except (ValueError, UnicodeDecodeError):
            return False
        return bool(token) and isinstance(owner, dict) and (owner.get("run_id"), owner.get("token")) == (run_id, token)

    def delete(self) -> None:
        """Delete every object, then the bucket. Only for the bucket made for a run (`--keep-bucket`
        keeps it); a prefix URL (a bucket you gave) deletes only the objects under its prefix."""
        if not self._store.exists():
            return
        self._store.delete_objects(self.prefix + "/" if self.prefix else "")
        if not self.prefix:
            self._store.delete_bucket()

    # --- objects -----------------------------------------------------------------------------------
    def list(self, prefix: str) -> list[Obj]:
        return list(self._store.list(prefix))

    def read_bytes(self, key: str, start: int = 0) -> bytes:
        """The object's bytes from `start` (a ranged GET): e.g. events.jsonl from the last offset read."""
        return b"".join(self._store.get(key, start, None))

    def upload(self, src: str | os.PathLike, prefix: str) -> int:
        """Copy every regular file under `src` to `prefix` (what the mount's sync does); the file count."""
        src = Path(src)
        files = [p for p in sorted(src.rglob("*")) if not p.is_symlink() and p.is_file()]
        for path in files:
            self._store.put(prefix + path.relative_to(src).as_posix(), path)
        return len(files)

    # --- download + verify -------------------------------------------------------------------------
    def download(self, prefix: str, dest: str | os.PathLike, reserved: tuple[str, ...] = RESERVED,
                 leave: Any = None, partial_dir: str | os.PathLike | None = None) -> dict:
        """Pull the job's output under `prefix` into `dest`: resumable (`_fetch`), sha256-checked, moved into dest
        only once the tree verifies (a refusal leaves dest as it was); returns the manifest.
        `leave(path)`: manifest entries that stay in the bucket (a full fine-tune's weights, `up --weights
        leave`): checked present in the listing with the manifest's size, not fetched.
        The files land in `partial_dir` (default `<dest>/.bucket-partial`, its resume state beside it as
        `<partial_dir>.json`): a caller that wipes dest between attempts passes one outside it, so a retry resumes.
        """
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        dest = Path(dest)
        where = f"{self.mount_source}/{prefix}"
        found = [o for o in self._store.list(prefix + manifest_lib.MANIFEST_FILE)
                 if o.key == prefix + manifest_lib.MANIFEST_FILE]
        if not found or found[0].kind != "file":
            raise BucketError(f"{where}: no {manifest_lib.MANIFEST_FILE} (the job writes it last; the run did not "
                              f"finish, or its results are elsewhere)")
        if found[0].size > MAX_MANIFEST:
            raise BucketError(f"{where}{manifest_lib.MANIFEST_FILE}: {found[0].size} bytes is not accepted "
                              f"(a manifest is at most {MAX_MANIFEST} bytes)")
        raw = self.read_bytes(found[0].key)
        try:
            manifest = manifest_lib.validate(json.loads(raw.decode("utf-8")), where + manifest_lib.MANIFEST_FILE,
                                             reserved)
        except (ValueError, UnicodeDecodeError) as e:
            raise BucketError(f"{where}{manifest_lib.MANIFEST_FILE}: not valid JSON ({e})") from None
        listed = {e["path"]: e for e in manifest["files"]}
        objects = self._checked_listing(prefix, listed, where)
        if missing := sorted(set(listed) - set(objects)):
            raise BucketError(f"{where}: listed in the manifest but not in the bucket: {', '.join(missing[:5])}")
        left = {rel for rel in listed if leave is not None and leave(rel)}
        dest.mkdir(parents=True, exist_ok=True)
        partial = Path(partial_dir) if partial_dir is not None else dest / PARTIAL_DIR
        state_path = partial.with_name(partial.name + ".json") if partial_dir is not None else dest / STATE_FILE
        state = _load_state(state_path)
        for rel, entry in sorted(listed.items()):
            obj = objects[rel]
            if obj.size != entry["size"]:
                raise BucketError(f"{where}{rel}: size {obj.size} in the bucket != {entry['size']} in the manifest")
            if rel in left:
                continue
            self._fetch(obj, partial / rel, state, state_path)
            if sha256_file(partial / rel) != entry["sha256"]:
                (partial / rel).unlink()  # a retry fetches it again
                state.pop(obj.key, None)
                atomic_write_json(state_path, state)
                raise BucketError(f"{where}{rel}: sha256 does not match the manifest (refused; nothing was moved "
                                  f"into {dest})")
        atomic_write_json(partial / manifest_lib.MANIFEST_FILE, manifest)
        if problems := manifest_lib.verify_tree(partial, manifest, reserved=reserved, left=left):
            raise BucketError(f"{where}: refused: {'; '.join(problems[:3])}")
        # Only what the manifest lists (and the manifest) is moved in, replacing what dest had.
        manifest_lib.move_listed(partial, dest, manifest)
        state_path.unlink(missing_ok=True)
        if partial_dir is not None:
            shutil.rmtree(partial, ignore_errors=True)  # what is left: empty folders (all was moved)
        manifest_lib.verify_or_raise(dest, manifest, left=left)
        return manifest

    def _checked_listing(self, prefix: str, listed: dict, where: str) -> dict[str, Obj]:
        """The listed objects by path; one that is not a plain relative path, a link or special file, or a file
        the manifest does not list (except events.jsonl, job.log, checkpoints/) refuses the whole download."""
        objects: dict[str, Obj] = {}
        unlisted = []
        for obj in self._store.list(prefix):
            rel = obj.key[len(prefix):]
            try:
                manifest_lib.check_path(rel, where)
            except ContractError:
                raise BucketError(f"{where}: object name {rel!r} is not accepted (one plain relative path)") from None
            if obj.kind == "link":
                raise BucketError(f"{where}{rel}: a symlink (not accepted in what comes back)")
            if obj.kind != "file":
                raise BucketError(f"{where}{rel}: not a regular file (not accepted in what comes back)")
            if rel == manifest_lib.MANIFEST_FILE:
                continue
            if rel in listed:
                objects[rel] = obj
            elif not manifest_lib.excluded(rel):
                unlisted.append(rel)
        if unlisted:
            raise BucketError(f"{where}: not in the manifest: {', '.join(sorted(unlisted)[:5])}"
                              f"{' ...' if len(unlisted) > 5 else ''} (refused)")
        return objects

    def _fetch(self, obj: Obj, path: Path, state: dict, state_path: Path) -> None:
        """Bring one object to `path`: kept if complete, continued with a ranged GET, or fetched anew."""
        have = path.stat().st_size if path.is_file() and not path.is_symlink() else 0
        known = state.get(obj.key)
        if known != obj.etag or have > obj.size:
            have = 0  # a changed object (or a longer local file) starts over
        if have == obj.size and path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state[obj.key] = obj.etag
        atomic_write_json(state_path, state)
        with open(path, "r+b" if have else "wb") as f:
            f.seek(have)
            f.truncate()
            for chunk in self._store.get(obj.key, have, obj.etag):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if (got := path.stat().st_size) != obj.size:
            raise BucketError(f"{obj.key}: got {got} of {obj.size} bytes (the object changed or the stream ended early; "
                              f"download again to resume)")


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}
    return state if isinstance(state, dict) and all(isinstance(v, str) for v in state.values()) else {}


# --- stores: the thin part that differs per provider ----------------------------------------------

class _Store:
    def exists(self) -> bool: raise NotImplementedError
    def create(self) -> None: raise NotImplementedError
    def put_new(self, key: str, data: bytes) -> bool: raise NotImplementedError  # only if absent: False if not
    def read(self, key: str, limit: int) -> bytes | None: raise NotImplementedError  # None: no such object
    def delete_bucket(self) -> None: raise NotImplementedError
    def delete_objects(self, prefix: str) -> None: raise NotImplementedError
    def list(self, prefix: str) -> Iterator[Obj]: raise NotImplementedError
    def get(self, key: str, start: int, etag: str | None) -> Iterator[bytes]: raise NotImplementedError
    def put(self, key: str, path: Path) -> None: raise NotImplementedError


class _FileStore(_Store):
    """A local folder as a bucket: keys are paths below it. Links and special files are reported as such."""

    def __init__(self, root: Path):
        self.root = root

    def exists(self) -> bool:
        return self.root.is_dir()

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def put_new(self, key: str, data: bytes) -> bool:
        try:
            fd = os.open(self.root / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self, key: str, limit: int) -> bytes | None:
        try:
            fd = os.open(self.root / key, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(limit)

    def delete_bucket(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def delete_objects(self, prefix: str) -> None:
        if prefix and (base := self.root / prefix).is_dir() and not base.is_symlink():
            shutil.rmtree(base)

    def list(self, prefix: str) -> Iterator[Obj]:
        # The deepest folder the prefix names, walked without following links; keys filtered by prefix.
        top = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if top.is_symlink() or not top.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(top):
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    continue
                kind = "link" if stat.S_ISLNK(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "special"
                yield Obj(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}", kind)

    def get(self, key: str, start: int, etag: str | None) -> Iterator[bytes]:
        path = self.root / key
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            f.seek(start)
            while chunk := f.read(CHUNK):
                yield chunk

    def put(self, key: str, path: Path) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp-upload")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)


def _need(module: str, package: str, extra: str, scheme: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BucketError(f"{scheme}:// buckets need {package}, which is not installed: "
                          f"pip install 'socrates-launch[{extra}]'") from None


def _provider_errors(fn):
    """A store's method: its client library's exceptions (and its transport's: the modules in the store's
    ERRORS) as the store's one BucketError line (`_err`), also where a generator raises them mid-stream."""
    def convert(self, e: Exception) -> Exception:
        return e if isinstance(e, BucketError) or not type(e).__module__.startswith(self.ERRORS) else self._err(e)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(self, *a, **kw):
            try:
                yield from fn(self, *a, **kw)
            except Exception as e:  # noqa: BLE001
                raise convert(self, e) from None
        return gen

    @functools.wraps(fn)
    def call(self, *a, **kw):
        try:
            return fn(self, *a, **kw)
        except Exception as e:  # noqa: BLE001
            raise convert(self, e) from None
    return call


class _S3Store(_Store):
    """S3 and R2 through boto3 (its own credential chain; R2: SkyPilot's endpoint and profile files)."""

    ERRORS = ("botocore.", "boto3.", "s3transfer.", "urllib3.")

    def __init__(self, name: str, r2: bool = False):
        self.name, self.r2, self._client = name, r2, None

    @property
    def client(self):
        if self._client is None:
            boto3 = _need("boto3", "boto3", "bucket", "r2" if self.r2 else "s3")
            from botocore.config import Config

            r2 = {"endpoint_url": _r2_endpoint(), "region_name": "auto", **_r2_credentials()} if self.r2 else {}
            self._client = boto3.session.Session().client(
                "s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}), **r2)
        return self._client

    def _err(self, e: Exception) -> BucketError:
        code = _s3_code(e)
        what = f"{'r2' if self.r2 else 's3'}://{self.name}"
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return BucketError(f"{what}: no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run "
                               f"`aws configure`{'; R2: ~/.cloudflare/r2.credentials' if self.r2 else ''})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return BucketError(f"{what}: access denied ({code}): check the credentials for this bucket")
        if code in ("NoSuchBucket", "404"):
            return BucketError(f"{what}: no such bucket")
        return BucketError(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else code}")

    @_provider_errors
    def exists(self) -> bool:
        return _or(None, ("404", "NoSuchBucket", "NotFound"), self.client.head_bucket, Bucket=self.name) is not None

    @_provider_errors
    def create(self) -> None:
        kw: dict[str, Any] = {"Bucket": self.name}
        region = self.client.meta.region_name
        if not self.r2 and region and region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        self.client.create_bucket(**kw)

    @_provider_errors
    def put_new(self, key: str, data: bytes) -> bool:
        return _or(False, ("PreconditionFailed", "412", "ConditionalRequestConflict"), self.client.put_object,
                   Bucket=self.name, Key=key, Body=data, IfNoneMatch="*") is not False

    @_provider_errors
    def read(self, key: str, limit: int) -> bytes | None:
        got = _or(None, ("NoSuchKey", "404", "NoSuchBucket"), self.client.get_object, Bucket=self.name, Key=key,
                  Range=f"bytes=0-{limit - 1}")
        if got is None:
            return None
        try:
            return got["Body"].read(limit)
        finally:
            got["Body"].close()

    @_provider_errors
    def delete_bucket(self) -> None:
        self.client.delete_bucket(Bucket=self.name)

    @_provider_errors
    def delete_objects(self, prefix: str) -> None:
        keys = [o.key for o in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            resp = self.client.delete_objects(Bucket=self.name, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                                        "Quiet": True})
            # S3 answers 200 and names each key it did not delete in Errors: those objects are still there.
            if errors := (resp or {}).get("Errors") or []:
                first = errors[0]
                raise BucketError(f"s3://{self.name}: {len(errors)} object(s) not deleted (first: "
                                  f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')})".rstrip())

    @_provider_errors
    def list(self, prefix: str) -> Iterator[Obj]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            for o in page.get("Contents", []):
                yield Obj(o["Key"], int(o["Size"]), str(o.get("ETag", "")).strip('"'))

    @_provider_errors
    def get(self, key: str, start: int, etag: str | None) -> Iterator[bytes]:
        # IfMatch: the object we started on, or a precondition failure
        kw = {**({"Range": f"bytes={start}-"} if start else {}), **({"IfMatch": f'"{etag}"'} if etag else {})}
        body = self.client.get_object(Bucket=self.name, Key=key, **kw)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        except Exception as e:  # noqa: BLE001  (urllib3/botocore read errors: the stream broke midway)
            if isinstance(e, (OSError, ValueError)) or type(e).__module__.startswith(self.ERRORS):
                raise BucketError(f"{'r2' if self.r2 else 's3'}://{self.name}/{key}: the download broke off "
                                  f"({type(e).__name__}); run it again: it resumes where it stopped") from None
            raise
        finally:
            body.close()

    @_provider_errors
    def put(self, key: str, path: Path) -> None:
        self.client.upload_file(Filename=str(path), Bucket=self.name, Key=key)


def _s3_code(e: Exception) -> str:
    """The error code S3 answered with (botocore's ClientError), else ''."""
    response = getattr(e, "response", None)
    return str(((response if isinstance(response, dict) else {}).get("Error") or {}).get("Code") or "")


def _or(fallback, answers: tuple[str, ...], call, *args, **kw):
    """call(*args, **kw), or `fallback` where it raises one of `answers` (an S3 error code or the exception's
    class name: no such object, a failed precondition); anything else is raised (one line, by _provider_errors)."""
    try:
        return call(*args, **kw)
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ in answers or _s3_code(e) in answers:
            return fallback
        raise


def _r2_endpoint() -> str:
    if url := os.environ.get("R2_ENDPOINT_URL"):
        return url
    account = Path.home() / ".cloudflare" / "accountid"
    if account.is_file() and account.read_text().strip():
        return f"https://{account.read_text().strip()}.r2.cloudflarestorage.com"
    raise BucketError("r2:// buckets need the account's endpoint: set R2_ENDPOINT_URL or write the account id "
                      "to ~/.cloudflare/accountid (as SkyPilot's R2 setup does)")


def _r2_credentials() -> dict:
    """The `r2` profile of SkyPilot's ~/.cloudflare/r2.credentials, read (never copied) when it exists;
    else nothing, and boto3 takes the environment's credentials."""
    path = Path.home() / ".cloudflare" / "r2.credentials"
    if not path.is_file():
        return {}
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
        section = parser["r2"]
        return {"aws_access_key_id": section["aws_access_key_id"],
                "aws_secret_access_key": section["aws_secret_access_key"]}
    except (configparser.Error, KeyError, UnicodeDecodeError):
        raise BucketError(f"{path}: no readable [r2] profile with aws_access_key_id and aws_secret_access_key "
                          f"(SkyPilot's R2 setup writes it)") from None


class _GCSStore(_Store):
    """GCS through google-cloud-storage (application-default credentials). Not exercised by the suite:
    it has no GCS server; the S3 path carries the tests."""

    ERRORS = ("google.", "requests.", "urllib3.")

    def __init__(self, name: str):
        self.name, self._bucket = name, None

    def _err(self, e: Exception) -> BucketError:
        first = str(e).splitlines()[0] if str(e) else ""
        return BucketError(f"gs://{self.name}: {type(e).__name__}: {first[:200]}")

    @property
    def bucket(self):
        if self._bucket is None:
            storage = _need("google.cloud.storage", "google-cloud-storage", "gcs", "gs")
            try:
                self._bucket = storage.Client().bucket(self.name)
            except Exception as e:  # noqa: BLE001  (google.auth's DefaultCredentialsError and kin: one line)
                raise BucketError(f"gs://{self.name}: {type(e).__name__}: {str(e).splitlines()[0]} "
                                  f"(`gcloud auth application-default login`)") from None
        return self._bucket

    @_provider_errors
    def exists(self) -> bool:
        return self.bucket.exists()

    @_provider_errors
    def create(self) -> None:
        self.bucket.create()

    @_provider_errors
    def put_new(self, key: str, data: bytes) -> bool:  # generation 0: only if no object is there
        return _or(False, ("PreconditionFailed",), self.bucket.blob(key).upload_from_string, data,
                   if_generation_match=0) is None

    @_provider_errors
    def read(self, key: str, limit: int) -> bytes | None:
        return _or(None, ("NotFound",), self.bucket.blob(key).download_as_bytes, start=0, end=limit - 1)

    @_provider_errors
    def delete_bucket(self) -> None:
        self.bucket.delete()

    @_provider_errors
    def delete_objects(self, prefix: str) -> None:
        for blob in self.bucket.list_blobs(prefix=prefix):
            blob.delete()

    @_provider_errors
    def list(self, prefix: str) -> Iterator[Obj]:
        for blob in self.bucket.list_blobs(prefix=prefix):
            yield Obj(blob.name, int(blob.size or 0), str(blob.generation))

    @_provider_errors
    def get(self, key: str, start: int, etag: str | None) -> Iterator[bytes]:
        blob = self.bucket.blob(key, generation=int(etag) if etag else None)  # that version, or an error
        step = 16 * CHUNK
        while True:  # ranged reads of 16 MiB: a large adapter never sits in memory whole
            try:
                data = blob.download_as_bytes(start=start, end=start + step - 1)
            except Exception as e:  # noqa: BLE001  (past the end of an object of a whole number of steps)
                if type(e).__name__ == "RequestRangeNotSatisfiable" and start > 0:
                    return
                raise
            if data:
                yield data
            if len(data) < step:
                return
            start += len(data)

    @_provider_errors
    def put(self, key: str, path: Path) -> None:
        self.bucket.blob(key).upload_from_filename(str(path))
