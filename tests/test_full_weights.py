"""`up --weights pull|leave` for a full fine-tune (#16): `up` says what happens to the ~30 GB of weights
before it asks; `leave` pulls and verifies everything else, checks the shards present in the bucket,
records where they are, and `download RUN` fetches them later; `leave` is refused where nothing outlives
the machine. Through the real launcher, the fake managed-jobs controller (tests/fakesky.py) and a
file:// bucket; the fake job writes a two-shard model/ (tests/fakejob.py FAKEJOB_FULL)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts import manifest
from launcher.bucket import Bucket, BucketError
from launcher_helpers import REPO, cli, fake_managed_cloud, only_run

SHARDS = ["model/model-00001-of-00002.safetensors", "model/model-00002-of-00002.safetensors"]


@pytest.fixture
def cloud(tmp_path):
    with fake_managed_cloud(tmp_path) as env:
        yield env


def full_config(tmp_path: Path, method: str = "full") -> Path:
    text = (REPO / "configs" / "smoke.yaml").read_text()
    assert "method: qlora" in text
    path = tmp_path / f"{method}.yaml"
    path.write_text(text.replace("method: qlora", f"method: {method}"))
    return path


def _model_tree(root: Path) -> dict:
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}\n")
    for i, rel in enumerate(SHARDS):
        (root / rel).write_bytes(bytes([i]) * 5000)
    (root / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": Path(SHARDS[0]).name, "b": Path(SHARDS[1]).name}}))
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text('{"wasserstein": 0.1}\n')
    return manifest.write(root, {"config": "t"})


def test_a_bucket_download_leaves_the_shards_and_checks_them_in_the_listing(tmp_path):
    bucket_dir = tmp_path / "b"
    _model_tree(bucket_dir / "r1" / "out")
    bucket = Bucket.from_url(f"file://{bucket_dir}")
    dest = tmp_path / "dest"
    got = bucket.download(bucket.out_prefix("r1"), dest, leave=lambda p: p in SHARDS)
    assert {e["path"] for e in got["files"]} >= set(SHARDS)
    assert (dest / "model" / "config.json").is_file() and (dest / "eval" / "metrics.json").is_file()
    assert not any((dest / rel).exists() for rel in SHARDS)
    assert manifest.verify(dest, left=SHARDS) == []
    assert manifest.verify(dest) == [f"{rel}: missing" for rel in SHARDS]  # without `left` they are missed
    # a shard gone from the bucket, or of another size, is refused though it is not fetched
    (bucket_dir / "r1" / "out" / SHARDS[1]).write_bytes(b"short")
    with pytest.raises(BucketError, match="00002-of-00002.safetensors: size 5 in the bucket != 5000"):
        bucket.download(bucket.out_prefix("r1"), tmp_path / "d2", leave=lambda p: p in SHARDS)
    (bucket_dir / "r1" / "out" / SHARDS[1]).unlink()
    with pytest.raises(BucketError, match="listed in the manifest but not in the bucket: model/model-00002"):
        bucket.download(bucket.out_prefix("r1"), tmp_path / "d3", leave=lambda p: p in SHARDS)


def test_leave_keeps_the_weights_in_the_bucket_and_download_fetches_them_later(cloud, tmp_path):
    # wide enough that the bucket's path (a long temp folder under pytest-xdist) is never wrapped mid-path
    env = {**cloud, "FAKEJOB_STEPS": "3", "FAKEJOB_FULL": "1", "COLUMNS": "400"}
    bucket = tmp_path / "bucket"
    r = cli(["up", "--infra", "sky", "--gpu", "A100-80GB:1", "--config", str(full_config(tmp_path)), "--managed",
             "--bucket", f"file://{bucket}", "--weights", "leave", "--yes"], env)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, out[-3000:]
    assert "weights: the full fine-tune's ~" in out and "stay in the run's bucket" in out
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    run_dir = Path(rec["dir"])
    assert rec["state"] == "done" and rec["verified"]
    assert rec["adapter"] == str((run_dir / "model").resolve())
    left = f"file://{bucket}/{rec['id']}/out/model/"
    assert rec["weights_left"] == left
    assert f"the weights were left in {left}" in out and f"socrates-launch download {rec['id']}" in out
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "model" / "model.safetensors.index.json").is_file()
    assert not any((run_dir / rel).exists() for rel in SHARDS)  # not pulled back
    assert all((bucket / rec["id"] / "out" / rel).is_file() for rel in SHARDS)  # still in the bucket
    listed = {e["path"] for e in manifest.load(run_dir)["files"]}
    assert set(SHARDS) <= listed and manifest.verify(run_dir, left=SHARDS) == []

    r = cli(["download", rec["id"]], env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert all((run_dir / rel).stat().st_size == 8192 for rel in SHARDS)
    assert manifest.verify(run_dir) == [] and rec["weights_left"] is None
    r = cli(["down", rec["id"]], env)  # the bucket, kept while it held the only copy, goes now
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert not (bucket / rec["id"]).exists()


def test_pull_is_the_default_and_says_the_size_and_time(cloud, tmp_path):
    env = {**cloud, "FAKEJOB_STEPS": "2", "FAKEJOB_FULL": "1"}
    r = cli(["up", "--infra", "sky", "--gpu", "A100-80GB:1", "--config", str(full_config(tmp_path)), "--managed",
             "--bucket", f"file://{tmp_path / 'bucket'}", "--yes"], env)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, out[-3000:]
    assert "are pulled back to this machine (~" in out and "--weights leave keeps them in the run's bucket" in out
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert manifest.verify(rec["dir"]) == [] and all((Path(rec["dir"]) / rel).is_file() for rel in SHARDS)
    assert not rec.get("weights_left")


@pytest.mark.parametrize("argv,needle", [
    (["--infra", "local"], "--weights leave: not accepted with --infra local (this machine is torn down"),
    (["--infra", "sky", "--gpu", "A100-80GB:1"], "--weights leave: not accepted with --infra sky"),
    (["--infra", "sky", "--gpu", "A100-80GB:1", "--qlora"], "--weights leave: only for train.method full"),
])
def test_leave_is_refused_where_the_weights_die_with_the_machine(cloud, tmp_path, argv, needle):
    method = "qlora" if "--qlora" in argv else "full"
    argv = [a for a in argv if a != "--qlora"]
    r = cli(["up", *argv, "--config", str(full_config(tmp_path, method)), "--weights", "leave", "--yes"], cloud)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not Path(cloud["SOCRATES_RUNS_DIR"]).exists() or not list(Path(cloud["SOCRATES_RUNS_DIR"]).iterdir())
