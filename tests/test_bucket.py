"""Buckets (launcher/bucket.py) against a real S3-protocol server: moto's server mode (tests/s3server.py).

The job side writes its out/ folder the way the job does (contracts.manifest.write after training, then
`python3 -m contracts.manifest extend OUT` for the evaluations, as sky/train.yaml's EXIT trap) and the
folder becomes the bucket's content through plain boto3 uploads (what the storage mount's sync does).
The launcher side downloads and verifies with `Bucket.download`. Faults are injected around the real
client (a stream cut after N bytes); expected bytes and digests come from the files the test wrote.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts import manifest as manifest_lib
from contracts.errors import ContractError
from launcher import bucket as bucket_lib
from launcher.bucket import Bucket, BucketError
from s3server import s3_server  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parent.parent
RUN_ID = "smoke-20261201-031500-ab12"
WEIGHTS = 3_000_000  # > a few chunks of the client's stream, so a cut lands mid-file


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job_output(root: Path, seed: int = 0) -> dict[str, bytes]:
    """A job's out/ as the job leaves it; returns every result file's bytes by relative path."""
    rnd = __import__("random").Random(seed)
    files = {
        "adapter/adapter_config.json": json.dumps({"peft_type": "LORA", "r": 16}).encode(),
        "adapter/adapter_model.safetensors": rnd.randbytes(WEIGHTS),
        "train_summary.json": b'{"steps": 12}',
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    # Not results: never listed, never downloaded (the checkpoints stay in the bucket for a relaunch).
    (root / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (root / "checkpoints" / "checkpoint-4" / "optimizer.pt").write_bytes(rnd.randbytes(50_000))
    (root / "events.jsonl").write_text('{"kind": "done"}\n')
    manifest_lib.write(root, {"run": RUN_ID})
    eval_files = {"eval/metrics.json": b'{"w": 0.12}', "eval/cells.jsonl": b'{"study_id": "s1"}\n'}
    for rel, data in eval_files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "contracts.manifest", "extend", str(root)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {**files, **eval_files}


def sync_up(client, src: Path, name: str, prefix: str) -> None:
    """What the mount's background sync does: every file under src to prefix (plain boto3)."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        client.upload_file(str(path), name, prefix + path.relative_to(src).as_posix())


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.aws, no ~/.cloudflare of the user's
    return s3_server


@pytest.fixture
def uploaded(s3, tmp_path, request):
    """A bucket holding one finished run's out/ (under a prefix); (Bucket, files, client, name)."""
    name = "socrates-" + request.node.name.replace("_", "-").lower()[:40].rstrip("-")
    client = s3.client()
    client.create_bucket(Bucket=name)
    out = tmp_path / "job" / "out"
    out.mkdir(parents=True)
    files = job_output(out)
    b = Bucket.from_url(f"s3://{name}/team/runs")
    sync_up(client, out, name, b.out_prefix(RUN_ID))
    return b, files, client, name


def _dest(tmp_path: Path) -> Path:
    """runs/<id>/ as the launcher has it before the download: its own record and an older adapter."""
    dest = tmp_path / "runs" / RUN_ID
    (dest / "adapter").mkdir(parents=True)
    (dest / "run.json").write_text('{"state": "running"}')
    (dest / "adapter" / "adapter_model.safetensors").write_bytes(b"previous adapter")
    return dest


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the round trip ------------------------------------------------------------------------------

def test_job_output_uploaded_then_downloaded_and_verified(uploaded, tmp_path):
    b, files, _, _ = uploaded
    dest = _dest(tmp_path)
    got = b.download(b.out_prefix(RUN_ID), dest)
    for rel, data in files.items():
        assert _sha((dest / rel).read_bytes()) == _sha(data), rel
    assert sorted(e["path"] for e in got["files"]) == sorted(files)
    assert (dest / "run.json").read_text() == '{"state": "running"}'  # the launcher's own file untouched
    assert not (dest / "checkpoints").exists() and not (dest / "events.jsonl").exists()  # not results
    assert not (dest / bucket_lib.PARTIAL_DIR).exists() and not (dest / bucket_lib.STATE_FILE).exists()
    assert manifest_lib.verify(dest) == []
    # The job's events stay in the bucket; a follower reads them from the last offset it had (ranged GET).
    events = (tmp_path / "job" / "out" / "events.jsonl").read_bytes()
    assert b.read_bytes(b.out_prefix(RUN_ID) + "events.jsonl", start=5) == events[5:]


def test_an_interrupted_download_resumes_with_a_ranged_get(uploaded, tmp_path):
    b, files, _, _ = uploaded
    dest = _dest(tmp_path)
    before = _snapshot(dest)
    weights_key = b.out_prefix(RUN_ID) + "adapter/adapter_model.safetensors"
    real_get = b._store.get
    calls: list[tuple[str, int]] = []
    cut_after = 1_200_000

    def cut(key, start, etag):  # the connection drops after cut_after bytes of the weights
        calls.append((key, start))
        sent = 0
        for chunk in real_get(key, start, etag):
            if key == weights_key and sent + len(chunk) > cut_after:
                yield chunk[:cut_after - sent]
                raise ConnectionResetError("connection reset by peer (injected)")
            sent += len(chunk)
            yield chunk

    b._store.get = cut
    with pytest.raises(ConnectionResetError):
        b.download(b.out_prefix(RUN_ID), dest)
    partial = dest / bucket_lib.PARTIAL_DIR / "adapter" / "adapter_model.safetensors"
    assert partial.stat().st_size == cut_after
    assert _snapshot(dest / "adapter") == {k[len("adapter/"):]: v for k, v in before.items() if k.startswith("adapter/")}
    fetched_before = {k for k, _ in calls}

    calls.clear()
    b._store.get = lambda key, start, etag: (calls.append((key, start)), real_get(key, start, etag))[1]
    b.download(b.out_prefix(RUN_ID), dest)
    # The weights continued from the byte they stopped at; files that had completed were not fetched again.
    assert (weights_key, cut_after) in calls
    again = {k for k, _ in calls} & fetched_before - {weights_key, b.out_prefix(RUN_ID) + "manifest.json"}
    assert again == set(), again
    assert _sha((dest / "adapter" / "adapter_model.safetensors").read_bytes()) == \
        _sha(files["adapter/adapter_model.safetensors"])
    assert manifest_lib.verify(dest) == []


class SlowProxy:
    """A TCP relay to the S3 server that passes at most `rate` bytes/s back (a slow link, so a download
    can be killed midway). Threads only; stopped by close()."""

    def __init__(self, target_port: int, rate: int = 1_000_000, cut_after: int | None = None):
        import socket
        import threading

        self.rate, self.target_port, self.cut_after = rate, target_port, cut_after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.rate), daemon=True).start()

    def _pipe(self, src, dst, rate):
        import time

        sent = 0
        try:
            while data := src.recv(16384):
                if rate and self.cut_after is not None and sent + len(data) > self.cut_after:
                    return  # the link drops: both sockets are closed below
                dst.sendall(data)
                sent += len(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # shutdown first: it wakes the other direction's thread blocked in recv
                for end in (lambda: s.shutdown(2), s.close):
                    try:
                        end()
                    except OSError:
                        pass

    def close(self):
        self.closed = True
        self.sock.close()


def test_a_download_killed_midway_resumes_where_it_stopped(uploaded, tmp_path, s3):
    """SIGKILL the launcher's download (a slow link) while the weights are half there; the next download
    continues that file from its size with a ranged GET and verifies."""
    import signal
    import time

    b, files, _, _ = uploaded
    dest = _dest(tmp_path)
    port = int(s3.url.rsplit(":", 1)[1])
    proxy = SlowProxy(port)
    code = ("import sys; from launcher.bucket import Bucket\n"
            "b = Bucket.from_url(sys.argv[1]); b.download(b.out_prefix(sys.argv[2]), sys.argv[3])\n")
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, b.url, RUN_ID, str(dest)], env=env, cwd=REPO,
                            stderr=subprocess.PIPE)
    partial = dest / bucket_lib.PARTIAL_DIR / "adapter" / "adapter_model.safetensors"
    try:
        deadline = time.monotonic() + 60
        while not (partial.is_file() and partial.stat().st_size > WEIGHTS // 4):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the download never got a quarter of the weights"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        proxy.close()
    had = partial.stat().st_size
    assert 0 < had < WEIGHTS and not (dest / "manifest.json").exists()
    real_get = b._store.get
    starts = {}
    b._store.get = lambda key, start, etag: (starts.setdefault(key.rsplit("/", 1)[1], start),
                                             real_get(key, start, etag))[1]
    b.download(b.out_prefix(RUN_ID), dest)
    assert starts["adapter_model.safetensors"] == had  # continued, not fetched anew
    assert _sha((dest / "adapter" / "adapter_model.safetensors").read_bytes()) == \
        _sha(files["adapter/adapter_model.safetensors"])
    assert manifest_lib.verify(dest) == []


def test_a_link_that_drops_midway_is_one_line_and_the_next_download_resumes(uploaded, tmp_path, s3, monkeypatch):
    b, files, _, _ = uploaded
    dest = tmp_path / "dest"
    proxy = SlowProxy(int(s3.url.rsplit(":", 1)[1]), rate=50_000_000, cut_after=WEIGHTS // 2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    try:
        with pytest.raises(BucketError) as err:
            Bucket.from_url(b.url).download(b.out_prefix(RUN_ID), dest)
    finally:
        proxy.close()
    assert "broke off" in str(err.value) and "\n" not in str(err.value)
    partial = dest / bucket_lib.PARTIAL_DIR / "adapter" / "adapter_model.safetensors"
    had = partial.stat().st_size
    assert 0 < had < WEIGHTS
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    again = Bucket.from_url(b.url)
    real_get, starts = again._store.get, []
    again._store.get = lambda key, start, etag: (starts.append(start), real_get(key, start, etag))[1]
    again.download(again.out_prefix(RUN_ID), dest)
    assert had in starts
    assert _sha((dest / "adapter" / "adapter_model.safetensors").read_bytes()) == \
        _sha(files["adapter/adapter_model.safetensors"])


def test_a_changed_object_is_fetched_again_from_the_start(uploaded, tmp_path):
    """A partial copy of an object that has since been replaced is not continued (its ETag changed)."""
    b, files, client, name = uploaded
    dest = tmp_path / "dest"
    key = b.out_prefix(RUN_ID) + "adapter/adapter_model.safetensors"
    partial = dest / bucket_lib.PARTIAL_DIR / "adapter" / "adapter_model.safetensors"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # a stale beginning from another version of the object
    (dest / bucket_lib.STATE_FILE).write_text(json.dumps({key: "0" * 32}))
    b.download(b.out_prefix(RUN_ID), dest)
    assert _sha((dest / "adapter" / "adapter_model.safetensors").read_bytes()) == \
        _sha(files["adapter/adapter_model.safetensors"])


# --- what is refused (dest untouched) -------------------------------------------------------------

@pytest.mark.parametrize("tamper", ["same_size", "other_size"])
def test_a_tampered_file_is_refused_and_nothing_is_moved(uploaded, tmp_path, tamper):
    b, files, client, name = uploaded
    dest = _dest(tmp_path)
    before = _snapshot(dest)
    key = b.out_prefix(RUN_ID) + "adapter/adapter_model.safetensors"
    data = bytearray(files["adapter/adapter_model.safetensors"])
    data[WEIGHTS // 2] ^= 0xFF
    client.put_object(Bucket=name, Key=key, Body=bytes(data) if tamper == "same_size" else bytes(data) + b"x")
    with pytest.raises(BucketError) as err:
        b.download(b.out_prefix(RUN_ID), dest)
    msg = str(err.value)
    assert "adapter/adapter_model.safetensors" in msg and "\n" not in msg
    assert ("sha256" in msg) if tamper == "same_size" else ("size" in msg)
    after = {k: v for k, v in _snapshot(dest).items() if not k.startswith(bucket_lib.PARTIAL_DIR)}
    assert after == before
    assert not (dest / bucket_lib.PARTIAL_DIR / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("key,why", [
    ("evil.sh", "not in the manifest"),
    ("adapter/extra.bin", "not in the manifest"),
    ("a//b", "not accepted"),
    ("eval/../../escape", "not accepted"),
])
def test_unlisted_files_and_bad_names_in_the_bucket_are_refused(uploaded, tmp_path, key, why):
    b, _, client, name = uploaded
    dest = _dest(tmp_path)
    before = _snapshot(dest)
    client.put_object(Bucket=name, Key=b.out_prefix(RUN_ID) + key, Body=b"#!/bin/sh\n")
    with pytest.raises(BucketError, match=why):
        b.download(b.out_prefix(RUN_ID), dest)
    assert _snapshot(dest) == before


def test_a_manifest_naming_a_launcher_file_is_refused(uploaded, tmp_path):
    b, files, client, name = uploaded
    dest = _dest(tmp_path)
    before = _snapshot(dest)
    prefix = b.out_prefix(RUN_ID)
    m = json.loads(client.get_object(Bucket=name, Key=prefix + "manifest.json")["Body"].read())
    m["files"].append({"path": "run.json", "size": 3, "sha256": _sha(b"own")})
    client.put_object(Bucket=name, Key=prefix + "manifest.json", Body=json.dumps(m).encode())
    client.put_object(Bucket=name, Key=prefix + "run.json", Body=b"own")
    with pytest.raises(ContractError, match="run.json"):
        b.download(prefix, dest)
    assert _snapshot(dest) == before


def test_no_manifest_is_one_line(s3, tmp_path):
    s3.client().create_bucket(Bucket="socrates-empty")
    with pytest.raises(BucketError, match="no manifest.json"):
        Bucket.from_url("s3://socrates-empty").download(f"{RUN_ID}/out/", tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --- lifecycle -------------------------------------------------------------------------------------

def test_create_exists_delete_a_run_bucket(s3):
    name = bucket_lib.default_name(RUN_ID)
    b = Bucket.from_url(bucket_lib.default_url(RUN_ID))
    assert b.name == name and not b.exists()
    b.create()
    b.create()  # again: already there, no error
    assert b.exists()
    names = {x["Name"] for x in s3.client().list_buckets()["Buckets"]}
    assert name in names
    src = Path(os.environ["HOME"]) / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f.txt").write_text("x")
    assert b.upload(src, b.out_prefix(RUN_ID)) == 1
    assert [o.key for o in b.list(b.run_prefix(RUN_ID))] == [f"{RUN_ID}/out/a/f.txt"]
    b.delete()  # objects first, then the bucket
    assert not b.exists() and name not in {x["Name"] for x in s3.client().list_buckets()["Buckets"]}


def test_a_prefix_bucket_delete_removes_only_its_prefix(s3):
    client = s3.client()
    client.create_bucket(Bucket="socrates-shared")
    client.put_object(Bucket="socrates-shared", Key="other/keep.txt", Body=b"k")
    client.put_object(Bucket="socrates-shared", Key="mine/r1/out/x", Body=b"x")
    Bucket.from_url("s3://socrates-shared/mine").delete()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="socrates-shared").get("Contents", [])]
    assert keys == ["other/keep.txt"]


def test_r2_speaks_s3_at_its_endpoint(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("R2_ENDPOINT_URL", s3.url)
    b = Bucket.from_url("r2://socrates-r2-run")
    assert not b.exists()
    s3.client().create_bucket(Bucket="socrates-r2-run")  # (R2's region is "auto", which moto won't create in)
    assert b.exists()
    out = tmp_path / "out"
    out.mkdir()
    files = job_output(out)
    b.upload(out, b.out_prefix(RUN_ID))
    dest = tmp_path / "dest"
    b.download(b.out_prefix(RUN_ID), dest)
    assert {rel: _sha((dest / rel).read_bytes()) for rel in files} == {rel: _sha(d) for rel, d in files.items()}


def test_r2_reads_skypilots_credentials_file_and_leaves_the_environment_alone(s3, monkeypatch):
    monkeypatch.setenv("R2_ENDPOINT_URL", s3.url)
    s3.client().create_bucket(Bucket="socrates-r2-creds")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = Path(os.environ["HOME"]) / ".cloudflare" / "r2.credentials"
    creds.parent.mkdir(parents=True)
    creds.write_text("[r2]\naws_access_key_id = r2-key\naws_secret_access_key = r2-secret\n")
    before = dict(os.environ)
    assert Bucket.from_url("r2://socrates-r2-creds").exists()  # signed with the file's keys
    assert dict(os.environ) == before
    # ...which an s3:// bucket in the same process does not pick up.
    with pytest.raises(BucketError, match="no credentials"):
        Bucket.from_url("s3://socrates-r2-creds").exists()
    creds.write_text("[default]\nx = y\n")
    with pytest.raises(BucketError, match=r"no readable \[r2\] profile"):
        Bucket.from_url("r2://socrates-r2-creds").exists()


def test_r2_without_an_endpoint_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("R2_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(BucketError, match="R2_ENDPOINT_URL"):
        Bucket.from_url("r2://socrates-x").exists()


def test_an_unreachable_endpoint_is_one_line(s3, monkeypatch):
    s3.client().create_bucket(Bucket="socrates-private")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    with pytest.raises(BucketError) as err:
        Bucket.from_url("s3://socrates-private").exists()
    assert "\n" not in str(err.value) and "s3://socrates-private" in str(err.value)


# --- file:// (the fake managed-jobs controller's bucket) ---------------------------------------------

def test_file_bucket_round_trip_and_links_refused(tmp_path):
    root = tmp_path / "bucket"
    b = Bucket.from_url(f"file://{root}")
    assert not b.exists()
    b.create()
    out = b._store.root / b.out_prefix(RUN_ID)
    out.mkdir(parents=True)
    files = job_output(out)
    dest = tmp_path / "dest"
    b.download(b.out_prefix(RUN_ID), dest)
    assert {rel: _sha((dest / rel).read_bytes()) for rel in files} == {rel: _sha(d) for rel, d in files.items()}
    # A link in the bucket (to a file outside it) refuses the whole download.
    secret = tmp_path / "secret"
    secret.write_text("s")
    (out / "eval" / "cells.jsonl").unlink()
    (out / "eval" / "cells.jsonl").symlink_to(secret)
    dest2 = tmp_path / "dest2"
    with pytest.raises(BucketError, match="symlink"):
        b.download(b.out_prefix(RUN_ID), dest2)
    assert not (dest2 / "adapter").exists()
    b.delete()
    assert not root.exists()


# --- URLs, names, the client being optional ----------------------------------------------------------

@pytest.mark.parametrize("url", [
    "", "my-bucket", "http://x/y", "s3://", "s3://A_Bad_Name", "s3://ab", "s3://-x-bucket",
    "s3://ok-bucket/../up", "s3://ok-bucket/a b", "file://relative/path", "file:///", "gs://x",
    "ftp://host/bucket", "s3://" + "a" * 64,
])
def test_bad_urls_are_one_line_contract_errors(url):
    with pytest.raises(ContractError) as err:
        Bucket.from_url(url)
    msg = str(err.value)
    assert "\n" not in msg and repr(url) in msg


@pytest.mark.parametrize("url,scheme,name,prefix", [
    ("s3://my-bucket", "s3", "my-bucket", ""),
    ("s3://my.bucket-1/a/b/", "s3", "my.bucket-1", "a/b"),
    ("r2://socrates-x/runs", "r2", "socrates-x", "runs"),
    ("gs://socrates-x", "gs", "socrates-x", ""),
])
def test_url_forms(url, scheme, name, prefix):
    assert bucket_lib.parse_url(url) == (scheme, name, prefix)
    b = Bucket.from_url(url)
    assert b.mount_source == f"{scheme}://{name}"
    assert b.out_prefix("r1") == (f"{prefix}/r1/out/" if prefix else "r1/out/")


def test_default_name_is_a_valid_bucket_name_derived_from_the_run_id():
    run_id = "Smoke_Run-20261201-031500-ab12"
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    assert bucket_lib.default_name(run_id) == f"socrates-smoke-run-20261201-031500-ab12-{digest}"
    long = bucket_lib.default_name("x" * 120)
    assert len(long) == 63 and long.startswith("socrates-x")
    bucket_lib.parse_url(f"s3://{long}")  # accepted by its own rules


def test_long_run_names_started_in_the_same_minute_get_different_buckets():
    """Issue #25 item 2: `up --name` of 38+ characters used to lose the id's random suffix to the 63-character
    cut, so two runs started in the same minute shared one bucket."""
    name = "a-very-long-descriptive-experiment-name-for-the-paper-x"
    ids = [f"{name}-20261207-021500-{suffix}" for suffix in ("ab12", "cd34")]
    names = [bucket_lib.default_name(i) for i in ids]
    assert names[0] != names[1] and all(len(n) <= 63 for n in names)
    for n in names:
        bucket_lib.parse_url(f"s3://{n}")


def _printed_by(code: str) -> str:
    """What a fresh interpreter running `code` printed (it must exit 0)."""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_launcher_imports_no_client_library_and_a_missing_one_is_one_line(tmp_path):
    code = ("import sys; sys.modules['boto3'] = None\n"
            "from launcher.bucket import Bucket\n"
            "from launcher import task\n"
            "b = Bucket.from_url('s3://socrates-x')\n"
            "assert 'botocore' not in sys.modules\n"
            "try:\n    b.exists()\nexcept Exception as e:\n    print(type(e).__name__, '|', e)\n")
    assert _printed_by(code) == ("BucketError | s3:// buckets need boto3, which is not installed: "
                                 "pip install 'socrates-launch[bucket]'")


def test_gs_without_its_client_library_is_one_line():
    code = ("import sys; sys.modules['google.cloud.storage'] = None\n"
            "from launcher.bucket import Bucket\n"
            "try:\n    Bucket.from_url('gs://socrates-x').exists()\nexcept Exception as e:\n"
            "    print(type(e).__name__, '|', e)\n")
    assert _printed_by(code) == ("BucketError | gs:// buckets need google-cloud-storage, which is not installed: "
                                 "pip install 'socrates-launch[gcs]'")


def test_gs_client_errors_become_one_line():
    """google-cloud-storage's exceptions (injected: the suite has no GCS server) reach the user as one line."""
    Forbidden = type("Forbidden", (Exception,), {"__module__": "google.api_core.exceptions"})

    class Refusing:
        def exists(self):
            raise Forbidden("403 GET https://storage.googleapis.com/storage/v1/b/socrates-x: denied\nmore detail")

        def list_blobs(self, prefix):
            yield from ()
            raise Forbidden("403 list denied")

    b = Bucket.from_url("gs://socrates-x")
    b._store._bucket = Refusing()
    with pytest.raises(BucketError) as err:
        b.exists()
    assert str(err.value) == ("gs://socrates-x: Forbidden: 403 GET https://storage.googleapis.com/storage/v1/b/"
                              "socrates-x: denied")
    with pytest.raises(BucketError, match="list denied"):
        b.list("r1/")


def test_the_launchers_retried_download_resumes_in_a_partial_folder_outside_its_staging(uploaded, tmp_path, monkeypatch):
    """Finding 7: lifecycle.fetch_and_verify wipes runs/<id>/.download before each attempt; the managed
    backend's resume folder is runs/<id>/.bucket-partial, outside it, so attempt 2 continues the weights
    from the byte attempt 1 stopped at (a ranged GET), and is left clean after the verified move."""
    from types import SimpleNamespace

    from launcher import lifecycle, registry
    from launcher.backends.managed import ManagedBackend

    b, files, _, _ = uploaded
    runs = tmp_path / "runs"
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
    monkeypatch.setattr(lifecycle, "DOWNLOAD_RETRY_S", 0.0)
    (runs / RUN_ID).mkdir(parents=True)
    run = registry.Run(id=RUN_ID, dir=runs / RUN_ID, infra="sky", state="running",
                       backend_state={"job_name": "socrates-x", "bucket": b.url, "bucket_made": False}).save()
    weights_key = b.out_prefix(RUN_ID) + "adapter/adapter_model.safetensors"
    real_get = bucket_lib._S3Store.get
    calls: list[tuple[str, int]] = []
    cut_after, cuts = 1_200_000, [1]

    def cut(store, key, start, etag):  # attempt 1's weights stream drops after cut_after bytes
        calls.append((key, start))
        sent = 0
        for chunk in real_get(store, key, start, etag):
            if key == weights_key and cuts and sent + len(chunk) > cut_after:
                cuts.clear()
                yield chunk[:cut_after - sent]
                raise ConnectionResetError("connection reset by peer (injected)")
            sent += len(chunk)
            yield chunk

    monkeypatch.setattr(bucket_lib._S3Store, "get", cut)
    recorder = lifecycle.Recorder(run, SimpleNamespace(on_event=lambda ev: None))
    lifecycle.fetch_and_verify(run, ManagedBackend(adapter=object()), recorder, attempts=2)
    assert [s for k, s in calls if k == weights_key] == [0, cut_after]  # resumed, not fetched anew
    assert run.verified and manifest_lib.verify(run.dir) == []
    assert _sha((run.dir / "adapter" / "adapter_model.safetensors").read_bytes()) == \
        _sha(files["adapter/adapter_model.safetensors"])
    assert not (run.dir / bucket_lib.PARTIAL_DIR).exists() and not (run.dir / bucket_lib.STATE_FILE).exists()
    assert not (run.dir / ".download").exists()


def test_a_bucket_to_be_made_for_a_run_that_exists_already_is_refused(s3, tmp_path, monkeypatch):
    """Finding 4: without --bucket the run's bucket (socrates-<run id>) is made for it and deleted after;
    one that is there already is someone's: the launch is refused before anything is recorded as made
    or submitted, and the bucket is untouched."""
    from launcher import registry
    from launcher.backends.base import BackendError
    from launcher.backends.managed import ManagedBackend

    runs = tmp_path / "runs"
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
    (runs / RUN_ID).mkdir(parents=True)
    run = registry.Run(id=RUN_ID, dir=runs / RUN_ID, infra="sky", state="provisioning",
                       options={"spot": True, "managed_job": True}).save()
    client = s3.client()
    name = bucket_lib.default_name(RUN_ID)
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="theirs.txt", Body=b"someone's")

    class NoLaunch:
        def jobs_launch(self, *a, **kw):
            raise AssertionError("submitted a job after the bucket was refused")

    with pytest.raises(BackendError) as err:
        ManagedBackend(adapter=NoLaunch()).launch(run)
    assert f"s3://{name} already exists" in str(err.value) and "\n" not in str(err.value)
    assert not run.backend_state.get("bucket_made")
    assert client.get_object(Bucket=name, Key="theirs.txt")["Body"].read() == b"someone's"


def test_objects_s3_did_not_delete_fail_the_delete(s3, monkeypatch):
    """Finding 3: DeleteObjects answers HTTP 200 with per-key Errors for objects it kept (e.g. AccessDenied
    on one key); the delete is then a BucketError (one line), not a bucket recorded as deleted."""
    name = bucket_lib.default_name(RUN_ID)
    b = Bucket.from_url(bucket_lib.default_url(RUN_ID))
    b.create()
    client = s3.client()
    for key in ("r/a.txt", "r/locked.txt"):
        client.put_object(Bucket=name, Key=key, Body=b"x")
    real = b._store.client.delete_objects

    def keep_one(**kw):  # S3 refuses one key: it stays, and the reply names it in Errors
        objs = kw["Delete"]["Objects"]
        resp = real(**{**kw, "Delete": {**kw["Delete"], "Objects": [o for o in objs if o["Key"] != "r/locked.txt"]}})
        return {**resp, "Errors": [{"Key": "r/locked.txt", "Code": "AccessDenied", "Message": "Access Denied"}]}

    monkeypatch.setattr(b._store.client, "delete_objects", keep_one)
    with pytest.raises(BucketError) as err:
        b.delete()
    assert "1 object(s) not deleted" in str(err.value) and "r/locked.txt" in str(err.value)
    assert "\n" not in str(err.value)
    assert b.exists() and [o["Key"] for o in client.list_objects_v2(Bucket=name)["Contents"]] == ["r/locked.txt"]


def _managed_run(runs: Path, run_id: str, **backend_state):
    from contracts.config import load_config
    from launcher import registry

    (runs / run_id).mkdir(parents=True)
    return registry.Run(id=run_id, dir=runs / run_id, infra="sky", state="provisioning",
                        config=load_config(REPO / "configs" / "smoke.yaml").to_dict(),
                        options={"spot": True, "managed_job": True}, backend_state=backend_state).save()


class _Launched:
    """Stands in for SkyPilot's jobs API only: the bucket side is the real S3 server."""

    def jobs_launch(self, task, name, secrets, on_request_id):
        on_request_id("req-1")
        return 1


def test_two_runs_racing_for_one_bucket_name_the_second_is_refused(s3, tmp_path, monkeypatch):
    """Issue #25 item 2: both launches pass `exists()` before either creates (a race); S3 us-east-1 answers
    200 to the second create. The owner marker, written only if absent, tells: the second launch is refused
    before any job is submitted, and the bucket stays the first run's."""
    from launcher.backends.base import BackendError
    from launcher.backends.managed import ManagedBackend

    race_id = "race-20261207-021500-ab12"
    runs = tmp_path / "runs"
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
    first = _managed_run(runs, race_id)
    ManagedBackend(adapter=_Launched()).launch(first)
    second = _managed_run(tmp_path / "runs2", race_id)  # the same id: the same bucket name

    class NoLaunch:
        def jobs_launch(self, *a, **kw):
            raise AssertionError("submitted a job into another run's bucket")

    with monkeypatch.context() as m, pytest.raises((BackendError, ContractError)) as err:
        m.setattr(bucket_lib._S3Store, "exists", lambda self: False)  # it passed the check before the create
        ManagedBackend(adapter=NoLaunch()).launch(second)
    assert "made for another run" in str(err.value) and "\n" not in str(err.value)
    assert Bucket.from_url(first.backend_state["bucket"]).owned_by(race_id, first.backend_state["bucket_token"])


def test_down_deletes_a_whole_bucket_only_when_its_owner_marker_is_the_runs(s3, tmp_path, monkeypatch):
    """Issue #25 item 2: a verified run whose record says it made bucket X, but X's owner marker is another
    run's (or missing): `down` does not delete X; the run that made it does."""
    from launcher.backends.base import BackendError
    from launcher.backends.managed import ManagedBackend

    own_id = "owned-20261207-021500-ab12"
    runs = tmp_path / "runs"
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(runs))
    owner = _managed_run(runs, own_id)
    ManagedBackend(adapter=_Launched()).launch(owner)
    url = owner.backend_state["bucket"]
    client = s3.client()
    client.put_object(Bucket=Bucket.from_url(url).name, Key=f"{own_id}/out/ckpt", Body=b"the owner's checkpoint")
    # A second record for the same id (a copied runs/ folder) with its own token: not the marker's.
    other = _managed_run(tmp_path / "runs-copy", own_id, job_name="x", bucket=url, bucket_made=True,
                         bucket_token="f" * 32)
    other.update(verified=True)

    class Gone:
        def jobs_queue(self, job_id, refresh=False):
            return None

    with pytest.raises(BackendError, match="owner marker"):
        ManagedBackend(adapter=Gone()).down(other)
    assert Bucket.from_url(url).exists()
    owner.update(verified=True)
    ManagedBackend(adapter=Gone()).down(owner)
    assert not Bucket.from_url(url).exists()
