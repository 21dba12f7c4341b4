"""The throughput benchmark's code paths on the CPU (tiny Qwen2): every lever wires up and the
printed table carries both rows and the per-step loss comparison."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

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
    assert fp8["levers"]["fp8"] and not fp8["error"] and "fp8 on 6 frozen linears (gate_proj/up_proj/down_proj;" in out.stdout
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


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_throughput_t", REPO / "bench" / "train_throughput.py")
    tt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tt  # its dataclasses look their module up there
    spec.loader.exec_module(tt)
    return tt


def _row(seed, losses, baseline=False, name=None):
    return {"name": name or f"r{seed}", "baseline": baseline, "seed": seed, "losses": losses}


def test_the_loss_check_holds_each_row_to_the_seed_to_seed_spread_of_the_plain_stack():
    tt = _bench_module()
    p42, p43 = [10.0, 9.0, 8.0, 7.0], [10.0, 9.2, 7.8, 7.3]  # seeds differ by 0, .2, -.2, .3
    rows = [_row(42, p42, True), _row(43, p43, True),
            _row(42, [10.0, 9.1, 8.1, 7.1], name="close"),                  # gaps .1: RMS .0866, later .1
            _row(43, [10.0, 9.7, 8.3, 7.8], name="far"),                    # gaps .5 against seed 43's run
            _row(42, [10.0, 9.0, 8.26, 7.26], name="late drift"),           # RMS .1838 < .2062; later .26 > .2550
            _row(44, [10.0, 9.0, 8.0, 7.0], name="no baseline at its seed")]
    got = {c["name"]: c for c in tt.loss_check(rows)}
    assert set(got) == {"close", "far", "late drift"}
    for c in got.values():  # the seeds' spread: sqrt((0 + .04 + .04 + .09) / 4), later half sqrt((.04 + .09) / 2)
        assert c["noise_rms"] == pytest.approx(0.20616, abs=1e-4)
        assert c["noise_rms_late"] == pytest.approx(0.25495, abs=1e-4)
        assert c["steps"] == 4
    assert got["close"]["rms"] == pytest.approx(0.08660, abs=1e-4) and got["close"]["within"]
    assert got["far"]["rms"] == pytest.approx(0.43301, abs=1e-4) and not got["far"]["within"]
    drift = got["late drift"]
    assert drift["rms"] == pytest.approx(0.18385, abs=1e-4) and drift["mean_late"] == pytest.approx(0.26)
    assert not drift["within"]  # within over all steps, not over the later half: a drift fails it
    assert tt.loss_check(rows[:1] + rows[2:]) == []  # one baseline seed: no noise to hold anything to


def test_learnable_targets_draw_answers_from_eight_ids_most_often_the_first():
    tt = _bench_module()
    ex = tt.make_examples(400, 152064, 42, tiny=False, targets="learnable")
    answers = [t for e in ex for t, lab in zip(e["input_ids"], e["labels"]) if lab != -100]
    prompts = [t for e in ex for t, lab in zip(e["input_ids"], e["labels"]) if lab == -100]
    assert set(answers) <= set(range(1000, 1008)) and len(set(answers)) == 8
    assert answers.count(1000) > 4 * answers.count(1007)  # weights 1 and 1/8
    assert Counter(prompts).most_common(1)[0][1] < 30  # prompts stay uniform ids (~0.8 draws an id)
    rand = tt.make_examples(400, 152064, 42, tiny=False)
    for r, e in zip(rand, ex):  # the same lengths and prompts either way: only the answers differ
        assert r["labels"].count(-100) == e["labels"].count(-100) and len(r["input_ids"]) == len(e["input_ids"])
        k = r["labels"].count(-100)
        assert r["input_ids"][:k] == e["input_ids"][:k]


@pytest.mark.slow
def test_train_throughput_runs_the_baseline_per_seed_and_prints_the_loss_check(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--final",
                          "--steps", "4", "--lr", "1e-2", "--targets", "learnable", "--baseline-seeds", "42,43",
                          "--ours", "packing,answer,fp8mlp,mb=8;packing,answer,mb=8,seed=43", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads((tmp_path / "train_throughput.json").read_text())
    rows = got["rows"]
    assert [(r["baseline"], r["seed"]) for r in rows] == [(True, 42), (True, 43), (False, 42), (False, 43)]
    assert got["targets"] == "learnable" and "fp8 on 6 frozen linears (gate_proj/up_proj/down_proj" in out.stdout
    p42, p43 = rows[0]["losses"], rows[1]["losses"]
    assert p42[0] == p43[0]  # LoRA B starts at zero: step 1 sees the base model whatever the seed
    assert p42[1:] != p43[1:]  # then the seed shows
    assert p42[-1] < p42[0] - 0.1  # answers from 8 ids: the loss falls within 4 steps
    assert [c["name"] for c in got["loss_check"]] == [rows[2]["name"], rows[3]["name"]]
    assert "Within noise?" in out.stdout and len(re.findall(r"(WITHIN|NOT within) noise", out.stdout)) == 2
