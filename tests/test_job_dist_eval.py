"""Evaluation sharded over 2 gloo ranks (torchrun) on CPU: rank 0 gathers the rows every rank scored
and writes the same metrics (and cells) as one process, in both modes."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from contracts.config import load_config
from contracts.events import read_all
from conftest import REPO, random_adapter
from ranks import run_job

TIMING = {"seconds", "prompt_tokens_per_s"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Synthetic test rows, a smoke config whose eval batches are small (several batches to split),
    and a LoRA adapter whose B weights are random (so it changes the model)."""
    from job.prepare import prepare

    root = tmp_path_factory.mktemp("disteval")
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw["eval"] = {**raw.get("eval", {}), "batch_size": 4, "temperature": 1.0, "rows": 30}
    cfg_path = root / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    prepare("synthetic:240", root / "data", cfg=cfg)
    random_adapter(cfg, root / "adapter")
    return root


def _evaluate(root: Path, ranks: int, mode: str, out: Path) -> subprocess.CompletedProcess:
    return run_job(ranks, "evaluate", "--config", str(root / "smoke.yaml"), "--data", str(root / "data"),
                   "--adapter", str(root / "adapter"), "--mode", mode, "--out", str(out), "--tokens-per-batch", "1500")


def _result(out: Path, mode: str) -> dict:
    res = json.loads((out / "metrics.json").read_text())["results"][f"fine-tuned/{mode}"]
    return {k: v for k, v in res.items() if k not in TIMING}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["distribution", "sample"])
def test_two_ranks_write_the_metrics_one_process_writes(prepared, tmp_path, mode):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _evaluate(prepared, 1, mode, one)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _evaluate(prepared, 2, mode, two)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _result(one, mode), _result(two, mode)
    # eval.rows 30 keeps whole cells only: at most 30 rows, and every cell scored or skipped is whole.
    test = [json.loads(x) for x in (prepared / "data" / "test.jsonl").read_text().splitlines()]
    sizes = {}
    for r in test:
        sizes[(r["study_id"], r["condition_num"], r["task_num"])] = sizes.get((r["study_id"], r["condition_num"], r["task_num"]), 0) + 1
    named = a["cells"] + a["cells_skipped"]
    assert a["rows"] == sum(c["n"] for c in named) <= 30 and all(c["n"] == sizes[tuple(c["cell"])] for c in named)
    assert a == b  # bit for bit: every number, every example
    for cells in ("cells.jsonl",):  # written beside metrics.json where the scorer writes cells
        if (one / cells).exists():
            assert (one / cells).read_text() == (two / cells).read_text()
    # rank 0 alone wrote events: one start, one eval
    kinds = [e["event"] for e in read_all(two / "events.jsonl")]
    assert kinds.count("start") == 1 and kinds.count("eval") == 1
    assert r2.stdout.count("fine-tuned/" + mode + ":") == 1
