"""Scale-out on the launcher side: `up --gpu H100:8 --nodes 2` rendered and dry-run through the real
(offline) SkyPilot SDK, the estimate pricing every node, the flags' bad values, and the local backend
running the task's real run block with 2 CPU ranks under torchrun."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from contracts import manifest
from contracts.events import read_all
from conftest import short_smoke
from launcher_helpers import REPO, cli, fake_calls, fake_clusters, fake_python, fakesky_env, launcher_env, only_run
from ports import free_port


@pytest.fixture
def cloud(tmp_path):
    """A launcher whose SkyPilot is tests/fakesky.py (catalog seeded), the fake job on its machines."""
    return fakesky_env(tmp_path, fake_python(tmp_path))


@pytest.mark.slow  # a dry run through the real API server: ~10 s on 2 cores alone, over 15 s beside other tests
@pytest.mark.sky
def test_two_nodes_of_eight_gpus_render_and_dry_run_through_skypilot(sky_home, tmp_path):
    env = {**sky_home.env, "SOCRATES_RUNS_DIR": str(tmp_path / "runs")}
    r = cli(["up", "--gpu", "H100:8", "--nodes", "2", "--subset", "0.1", "--dryrun", "--yes"], env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "num_nodes: 2" in out and "accelerators: H100:8" in out
    flat = " ".join(out.split())
    assert "layout: 2 node(s) x 8 GPU(s) = 16 ranks" in flat
    assert "--nnodes 2 --nproc-per-node 8 --node-rank $SKYPILOT_NODE_RANK" in flat
    # the run block itself builds the torchrun line from SkyPilot's env
    assert "SKYPILOT_NODE_IPS" in out and "SKYPILOT_NODE_RANK" in out and "torch.distributed.run" in out
    chosen = next(ln for ln in out.splitlines() if ln.startswith("chosen:"))
    assert "gpu_8x_h100_sxm5" in chosen  # SkyPilot's optimizer picked the 8-GPU instance for each node
    # every node priced: the estimate's cheapest offer is 2 x the catalog's $23.92/h
    assert "47.84" in out, out[-3000:]
    assert "x 0.9 scaling efficiency (configured; measured only up to 2 GPUs: 0.97" in flat


@pytest.mark.sky
def test_the_rendered_two_node_task_is_what_skypilot_reads(sky_home):
    import subprocess
    import sys

    code = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import sky
from launcher import registry, task as tasklib
from contracts.config import load_config
cfg = load_config("configs/paper.yaml")
run = registry.Run(id="t", dir="/nonexistent", config=cfg.to_dict(), options={{"eval": True, "nodes": 2}})
conf = tasklib.render(run, gpu="H100:8", cloud="lambda")
task = sky.Task.from_yaml_config(conf)
res = list(task.resources)[0]
print(json.dumps({{"nodes": task.num_nodes, "acc": res.accelerators}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=sky_home.env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"nodes": 2, "acc": {"H100": 8}}


@pytest.mark.parametrize("argv,needle", [
    (["--infra", "local", "--nodes", "2"], "--nodes 2: not accepted with --infra local"),
    (["--nodes", "0"], "--nodes 0: not accepted"),
    (["--infra", "sky", "--gpu", "H100:8", "--ranks", "2"], "--ranks 2: not accepted with --infra sky"),
    (["--infra", "local", "--ranks", "3"], "train.global_batch: 8 is not a multiple of micro_batch x world size = 4 x 3"),
])
def test_bad_scale_flags_are_one_line_exit_2(tmp_path, argv, needle):
    env = launcher_env(tmp_path / "runs")
    r = cli(["up", "--config", "configs/smoke.yaml", "--dryrun", "--yes", *argv], env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_local_backend_runs_the_task_on_two_cpu_ranks(tmp_path):
    runs = tmp_path / "runs"
    env = launcher_env(runs, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))  # a free port: other tests may run beside it
    short = short_smoke(tmp_path, train={"max_steps": 4})  # the ranks forming a group, rank 0 alone writing: a few steps
    r = cli(["up", "--infra", "local", "--ranks", "2", "--config", str(short), "--data", "synthetic:120",
             "--eval-rows", "8", "--yes", "--name", "two-ranks"], env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    run_dir = next(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("two-ranks"))
    art = next(p for p in run_dir.rglob("manifest.json")).parent
    assert manifest.verify(art) == [] and manifest.load(art)["world_size"] == 2
    events = read_all(art / "events.jsonl")
    assert [e["event"] for e in events].count("done") == 1  # rank 0 alone wrote
    # the run block's evaluation under torchrun too (the rehearsal's two nodes leave it out for this test)
    assert (art / "eval" / "metrics.json").is_file() and "eval/metrics.json" in {f["path"] for f in manifest.load(art)["files"]}
    assert re.search(r"torchrun: 1 node\(s\) x 2 rank\(s\)", out + "".join(p.read_text(errors="replace") for p in run_dir.rglob("*.log")))


def test_a_node_lost_mid_run_fails_the_run_downs_every_node_and_keeps_the_adapter(cloud):
    """2 nodes; node 1 dies during evaluation (training finished): the run fails, the finished adapter
    is pulled back and verifies, and the cluster, every node of it, is torn down."""
    r = cli(["up", "--infra", "sky", "--gpu", "A100:1", "--nodes", "2", "--config", "configs/smoke.yaml", "--yes"],
            {**cloud, "FAKESKY_FAIL": "node-lost"}, timeout=300)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    rec = only_run(Path(cloud["SOCRATES_RUNS_DIR"]))
    assert fake_clusters(cloud) == []  # nothing left: the cluster folder (both nodes in it) is gone
    assert rec["state"] == "failed" and rec["error"].startswith("running"), rec["error"]
    assert "pulled back and verifies" in rec["error"] and rec["adapter"]
    assert manifest.verify(rec["dir"]) == []
    assert "node 1 lost" in (Path(rec["dir"]) / "job.log").read_text()
    assert f"down {rec['backend_state']['cluster']}" in fake_calls(cloud) and rec["machine"] == "gone"
    rendered = (Path(rec["dir"]) / "task.yaml").read_text()
    assert "num_nodes: 2" in rendered
