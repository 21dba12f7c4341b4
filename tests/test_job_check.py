"""job check on CPU: the real NF4 self-test, the fit estimate, and exit 3 when the machine can't run it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contracts.config import load_config
from contracts.sizing import Shape
from job.check import NF4_TOLERANCE, fit_estimate, nf4_self_test
from job.model import qwen2_config
from conftest import REPO


def test_nf4_self_test_quantizes_for_real():
    r = nf4_self_test(torch.device("cpu"), n=256)
    assert r["bytes_per_param"] == 0.5  # two 4-bit codes per byte
    assert 0.01 < r["weight_rel_error"] < 0.2  # lossy, but close: a real NF4 round trip
    assert 0.0 < r["rel_error"] < NF4_TOLERANCE


def test_qwen25_14b_preset_has_the_real_parameter_count():
    cfg = load_config(REPO / "configs" / "bench-14b.yaml")
    qc = qwen2_config(cfg, 151680)
    assert (qc.hidden_size, qc.num_hidden_layers, qc.vocab_size, qc.tie_word_embeddings) == (5120, 48, 152064, False)
    assert 14.7e9 < Shape.of(qc).params < 14.8e9  # Qwen2.5-14B: 14.77B
    est = fit_estimate(cfg, None)
    assert 8 < est["base_gib"] < 12 and est["total_gib"] < 80  # 4-bit 14B fits one 80 GB card


def _check(*args):
    return subprocess.run([sys.executable, "-m", "job", "check", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # two real `job check` processes (the NF4 self-test): ~12 s on 2 cores
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_check_on_cpu_passes_with_allow_cpu_and_exits_3_without(tmp_path):
    r = _check("--config", "configs/smoke.yaml", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] and report["card"]["name"] == "cpu" and report["nf4"]["rel_error"] < NF4_TOLERANCE
    assert "nf4 self-test" in r.stdout
    r = _check("--config", "configs/paper.yaml")
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "no GPU" in r.stderr


def test_offloaded_checkpoints_need_host_memory_and_check_says_so():
    from contracts.config import load_config
    from job.check import fit_estimate, host_fit
    from job.errors import JobCannotRun

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml").with_overrides(
        {"train.micro_batch": 64, "train.checkpoint_layers": 46, "train.offload_checkpoints": False})  # round 4's shape
    assert fit_estimate(cfg, None)["host_gib"] == 0  # not offloaded: nothing on the host
    off = cfg.with_overrides({"train.offload_checkpoints": True})
    fit = fit_estimate(off, None)
    # 46 checkpointed layers x 64 rows x ~323 tokens x 5120 x 2 bytes: ~9 GiB
    assert 8.5 <= fit["host_gib"] <= 10
    host_fit(off, fit, 64.0)  # a typical A100-40GB machine has far more
    with pytest.raises(JobCannotRun, match=r"offload_checkpoints.*12\.0 GiB available"):
        host_fit(off, fit, 12.0)
    host_fit(off, fit, None)  # no /proc/meminfo: nothing to go on, no refusal
