"""bench/scale.py --tiny: the scaling benchmark's code path on CPU with 1 and 2 gloo ranks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_scale_bench_tiny_measures_one_and_two_ranks(tmp_path):
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--tiny", "--gpus", "2", "--steps", "3",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {row["n"]: row for row in res["rows"]}
    assert sorted(rows) == [1, 2] and res["global_batch"] == 8 and res["micro_batch"] == 2
    one, two = rows[1], rows[2]
    assert one["steps"] == two["steps"] == 3 and one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
    # the efficiency is rate(N) / (N x rate(1)), from the rates it printed
    assert one["efficiency"] == 1.0
    assert two["efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]), abs=1e-4)
    # same global batch and data order on 1 and 2 ranks: the same losses (job/dist.py's RankBatches)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    assert "peak GiB/GPU" in r.stdout and "efficiency" in r.stdout
    assert r.stdout.count("cpu ") >= 2


def test_scale_bench_full_measures_fsdp2_ranks_without_adding_one_and_trains_every_weight():
    """--method full: no N=1 added (a 14B full fine-tune fits no single card), the config's method is full, the
    rest of the point as for QLoRA (the run itself, 1 process vs 2 FSDP2 ranks: tests/test_full_train.py)."""
    import argparse

    from bench import scale

    assert scale.rank_counts("2,4,8", "full") == [2, 4, 8] and scale.rank_counts("2,4", None) == [1, 2, 4]
    args = argparse.Namespace(tiny=True, config=None, method="full", global_batch=None, micro_batch=None, steps=2)
    raw = scale._config(args)
    assert raw["train"]["method"] == "full" and raw["train"]["max_steps"] == 2 and raw["train"]["checkpoint_every"] == 0
    from contracts.config import from_dict

    assert from_dict(raw).train.method == "full"  # a config the job accepts
