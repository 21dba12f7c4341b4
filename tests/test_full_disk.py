"""The machine's disk for a full fine-tune (#16): launcher/task.py asks SkyPilot for a disk_size that
holds what `job check` will require (contracts/sizing.py, one formula for both), never below the
template's; the real SkyPilot SDK (offline) reads the rendered task with that disk size."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from contracts.config import load_config
from launcher import registry, task as tasklib
from launcher_helpers import REPO, cli

TEMPLATE_DISK = tasklib.load_template()["resources"]["disk_size"]


def _run(overrides: dict, nodes: int = 1) -> registry.Run:
    cfg = load_config(REPO / "configs" / "paper.yaml").with_overrides({"train.method": "full", "train.micro_batch": 32,
                                                                        **overrides})
    return registry.Run(id="t", dir="/nonexistent", config=cfg.to_dict(), options={"eval": True, "nodes": nodes})


def _by_hand(params: float, kept: int, nodes: int = 1) -> int:
    """The README's arithmetic, written out: kept x 12 B/param / nodes + 2 B/param output + the bf16 base as
    downloaded (x1.1) + 2 GiB free, + 60 GiB for the image and venv, x1.15, in GB rounded up to 10."""
    gib = kept * params * 12 / nodes / 2**30 + params * 2 / 2**30 + params * 2 * 1.1 / 2**30 + 2
    return math.ceil((gib + 60) * 1.15 * 2**30 / 1e9 / 10) * 10


def test_a_14b_full_run_gets_a_disk_that_job_check_accepts(monkeypatch):
    task = tasklib.render(_run({}), gpu="A100-80GB:8")
    disk = task["resources"]["disk_size"]
    assert disk == _by_hand(14e9, kept=3)  # the launcher counts 14.0B from the model's name
    assert disk > TEMPLATE_DISK == 200
    # what job check will require on that machine, from the real 14.77B parameter count: it fits, with the
    # image and venv on the same disk
    from job.check import full_disk_gib

    monkeypatch.delenv("SKYPILOT_NUM_NODES", raising=False)
    need = full_disk_gib(load_config(REPO / "configs" / "paper.yaml").with_overrides({"train.method": "full"}))
    assert need["need_gib"] == pytest.approx(3 * 14_770_033_664 * 12 / 2**30 + 14_770_033_664 * 2 / 2**30
                                             + 14_770_033_664 * 2 * 1.1 / 2**30 + 2, abs=0.2)
    assert disk * 1e9 / 2**30 - 60 >= need["need_gib"], (disk, need)


def test_disk_follows_kept_checkpoints_and_nodes_and_never_drops_below_the_template():
    one_kept = tasklib.render(_run({"train.keep_checkpoints": 1}), gpu="A100-80GB:8")["resources"]["disk_size"]
    assert one_kept == _by_hand(14e9, kept=2)
    two_nodes = tasklib.render(_run({}, nodes=2), gpu="H100:8")["resources"]["disk_size"]
    assert two_nodes == _by_hand(14e9, kept=3, nodes=2)  # each node holds only its ranks' shards
    no_ckpt = tasklib.render(_run({"train.checkpoint_every": 0}), gpu="A100-80GB:8")["resources"]["disk_size"]
    assert no_ckpt == max(TEMPLATE_DISK, _by_hand(14e9, kept=0))
    assert no_ckpt < two_nodes < one_kept < tasklib.render(_run({}), gpu="A100-80GB:8")["resources"]["disk_size"]
    # a QLoRA run keeps the template's disk; a tiny full model is never given less than it
    qlora = load_config(REPO / "configs" / "paper.yaml")
    run = registry.Run(id="q", dir="/nonexistent", config=qlora.to_dict(), options={"eval": True})
    assert tasklib.render(run, gpu="A100:1")["resources"]["disk_size"] == TEMPLATE_DISK
    tiny = load_config(REPO / "configs" / "smoke.yaml").with_overrides({"train.method": "full"})
    run = registry.Run(id="s", dir="/nonexistent", config=tiny.to_dict(), options={"eval": True})
    assert tasklib.render(run, gpu="A100:1")["resources"]["disk_size"] == TEMPLATE_DISK


@pytest.mark.sky
def test_skypilot_reads_the_full_runs_disk_size(sky_home):
    code = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import sky
from launcher import registry, task as tasklib
from contracts.config import load_config
cfg = load_config("configs/paper.yaml").with_overrides({{"train.method": "full", "train.micro_batch": 32}})
run = registry.Run(id="t", dir="/nonexistent", config=cfg.to_dict(), options={{"eval": True}})
task = sky.Task.from_yaml_config(tasklib.render(run, gpu="A100-80GB:8", cloud="lambda"))
res = list(task.resources)[0]
print(json.dumps({{"disk": res.disk_size, "acc": res.accelerators}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=sky_home.env, timeout=240,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"disk": _by_hand(14e9, kept=3), "acc": {"A100-80GB": 8}}


@pytest.mark.slow  # a dry run through the real API server: 12-17 s on 2 cores
@pytest.mark.sky
def test_the_dry_run_shows_the_full_runs_disk(sky_home, tmp_path):
    cfg = tmp_path / "full.yaml"
    text = (REPO / "configs" / "paper.yaml").read_text().replace("method: qlora", "method: full")
    assert "method: full" in text
    cfg.write_text(text.replace("micro_batch: 64", "micro_batch: 32"))
    env = {**sky_home.env, "SOCRATES_RUNS_DIR": str(tmp_path / "runs")}
    r = cli(["up", "--gpu", "H100:8", "--config", str(cfg), "--subset", "0.1", "--dryrun", "--yes"], env,
            timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    want = _by_hand(14e9, kept=3)
    assert f"disk_size: {want}" in out
    assert f"disk {want} GB per node" in " ".join(out.split())
