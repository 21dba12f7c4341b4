"""The throughput benchmark's code paths on the CPU (tiny Qwen2): every lever wires up and the
printed table carries both rows and the per-step loss comparison."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("peft")


@pytest.mark.slow
def test_train_throughput_tiny_runs_baseline_and_ours_with_new_levers(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--final",
                          "--steps", "2", "--ours", "packing,answer,fp8,mb=8;packing,answer,fused,offload,mb=8,gc=1",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "train_throughput.json").read_text())["rows"]
    assert [r["baseline"] for r in rows] == [True, False, False]
    fp8 = rows[1]  # fp8 (emulated off CUDA): the base's matmul inputs rounded to e4m3, so close, not equal
    assert fp8["levers"]["fp8"] and not fp8["error"] and "fp8 on 14 frozen linears" in out.stdout
    assert fp8["losses"][0] != rows[0]["losses"][0]
    assert fp8["losses"][0] == pytest.approx(rows[0]["losses"][0], rel=1e-2)
    ours = rows[2]  # runs on the same base after the fp8 row: its layers must be back to bf16
    assert ours["levers"]["fused_lora"] and ours["levers"]["offload_checkpoints"] and ours["levers"]["checkpoint_layers"] == 1
    assert not ours["error"] and len(ours["losses"]) == len(rows[0]["losses"]) == 2
    # Step 1: LoRA B starts at zero, so the plain stack and ours see the same model: same loss.
    assert ours["losses"][0] == pytest.approx(rows[0]["losses"][0], rel=1e-4)
    assert "Loss per optimizer step" in out.stdout and "largest |ours - baseline|" in out.stdout


@pytest.mark.slow
def test_train_throughput_refuses_an_unknown_lever(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--final",
                          "--ours", "packing,warp", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode != 0 and "'warp' is not accepted" in out.stderr
