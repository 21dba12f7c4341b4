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
def test_train_throughput_refuses_an_unknown_lever():
    # main() parses every --ours variant before the first run (a SystemExit: the message on stderr, exit 1)
    with pytest.raises(SystemExit, match="--ours: 'warp' is not accepted"):
        _bench_module().parse_ours("packing,warp", tiny=True)


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_throughput_t", REPO / "bench" / "train_throughput.py")
    tt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tt  # its dataclasses look their module up there
    spec.loader.exec_module(tt)
    return tt


def _row(seed, losses, baseline=False, name=None):
    return {"name": name or f"r{seed}", "baseline": baseline, "seed": seed, "losses": losses}


# The plain stack run twice at seed 42 (same data, order): the repeat differs by 0, .02, -.03, .04 nats,
# RMS sqrt(.0029 / 4) = .026926, later half sqrt(.0025 / 2) = .035355, step 1 by 0 (so the floor, .01).
P42, P42_AGAIN = [10.0, 9.0, 8.0, 7.0], [10.0, 9.02, 7.97, 7.04]
P43 = [10.0, 9.2, 7.8, 7.3]  # the plain stack at seed 43: seeds differ by 0, .2, -.2, .3 (RMS .20616)


def test_the_loss_check_holds_each_row_to_the_plain_stack_run_twice_at_its_seed():
    tt = _bench_module()
    rows = [_row(42, P42, True), _row(42, P42_AGAIN, True),
            _row(42, [10.004, 9.01, 8.015, 7.02], name="genuine"),    # gaps .004 .01 .015 .02
            _row(42, [10.005, 9.01, 8.036, 7.036], name="late drift"),  # gaps .005 .01 .036 .036
            _row(42, P42_AGAIN, name="as far as the repeat"),
            _row(44, P42, name="no repeat at its seed")]
    got = {c["name"]: c for c in tt.loss_check(rows)}
    assert set(got) == {"genuine", "late drift", "as far as the repeat"}
    for c in got.values():
        assert c["noise_rms"] == pytest.approx(0.026926, abs=1e-6) and c["noise_rms_late"] == pytest.approx(0.035355, abs=1e-6)
        assert c["noise_step1"] == 0 and c["steps"] == 4
    g = got["genuine"]  # RMS sqrt(.000741 / 4) = .013611, later sqrt(.000625 / 2) = .017678, step 1 .004 < .01
    assert g["rms"] == pytest.approx(0.013611, abs=1e-6) and g["rms_late"] == pytest.approx(0.017678, abs=1e-6)
    assert g["step1"] == pytest.approx(0.004) and g["bias_ok"] and g["curve_ok"] and g["within"]
    d = got["late drift"]  # all steps .026062 < .026926, later half .036 > .035355: a drift fails it
    assert d["rms"] == pytest.approx(0.026062, abs=1e-6) and d["rms_late"] == pytest.approx(0.036, abs=1e-6)
    assert d["mean_late"] == pytest.approx(0.036) and d["bias_ok"] and not d["curve_ok"] and not d["within"]
    same = got["as far as the repeat"]  # exactly the repeat's distance: the comparison is strict
    assert same["rms"] == same["noise_rms"] and not same["curve_ok"] and not same["within"]
    assert tt.loss_check(rows[:1] + rows[2:]) == []  # one run of the plain stack: no noise to hold anything to


@pytest.mark.parametrize("name,losses,seed,fails", [
    ("a constant +0.09-nat bias", [x + 0.09 for x in P42], 42, "both"),        # step 1 .09 > .01; RMS .09
    ("a 0.7% scale-up", [x * 1.007 for x in P42], 42, "both"),                 # step 1 .07; RMS .0600
    ("seed 43 relabelled as 42", P43, 42, "curve"),                            # step 1 equal; RMS .20616
])
def test_the_loss_check_fails_the_three_regressions_the_review_found(name, losses, seed, fails):
    tt = _bench_module()
    (c,) = tt.loss_check([_row(42, P42, True), _row(42, P42_AGAIN, True), _row(seed, losses, name=name)])
    assert not c["within"] and not c["curve_ok"]
    assert c["bias_ok"] == (fails == "curve")  # relabelled seeds share step 1 (LoRA B = 0): the curve catches it
    if name.startswith("a 0.7%"):  # gaps .07 .063 .056 .049: RMS sqrt(.014406 / 4) = .060012
        assert c["step1"] == pytest.approx(0.07) and c["rms"] == pytest.approx(0.060012, abs=1e-6)


def test_a_repeat_that_agrees_bit_for_bit_holds_variants_to_the_floor():
    tt = _bench_module()
    assert tt.NOISE_FLOOR_NATS == 0.01  # stated in nats, with its reason, beside the rule
    rows = [_row(42, P42, True), _row(42, list(P42), True),
            _row(42, [x + 0.005 for x in P42], name="half the floor"), _row(42, [x + 0.02 for x in P42], name="twice")]
    got = {c["name"]: c for c in tt.loss_check(rows)}
    assert got["half the floor"]["noise_rms"] == 0 and got["half the floor"]["within"]
    assert not got["twice"]["within"] and not got["twice"]["bias_ok"]


def test_the_loss_check_on_round_8s_real_curves_fails_the_three_regressions():
    """H200, lr 1e-3 (bench/RESULTS.md round 8): the plain stack at seed 42 in calls 1 and 2 is a real
    repeat (its step 1 agrees bit for bit; RMS .1163 over 20 steps, by hand from the two JSON files)."""
    tt = _bench_module()
    res = REPO / "bench" / "results"
    c1 = json.loads((res / "train_throughput_round8_loss_lr1e-3_call1_h200.json").read_text())["rows"]
    c2 = json.loads((res / "train_throughput_round8_loss_lr1e-3_call2_h200.json").read_text())["rows"]
    a, b, s43 = c1[0]["losses"], c2[0]["losses"], c1[1]["losses"]
    assert (c1[0]["seed"], c2[0]["seed"], c1[1]["seed"]) == (42, 42, 43)
    rows = [_row(42, a, True), _row(42, b, True), _row(42, [x + 0.09 for x in a], name="bias"),
            _row(42, [x * 1.007 for x in a], name="scale"), _row(42, s43, name="relabelled")]
    got = {c["name"]: c for c in tt.loss_check(rows)}
    assert got["bias"]["noise_rms"] == pytest.approx(0.1163, abs=1e-4) and got["bias"]["noise_step1"] == 0
    assert not any(c["within"] for c in got.values())
    assert not got["bias"]["bias_ok"] and not got["scale"]["bias_ok"]
    assert got["relabelled"]["bias_ok"] and got["relabelled"]["rms"] == pytest.approx(0.7179, abs=1e-4)
    # The rows that really ran beside them: fp8 on q/o + MLP moves step 1 by -.2637 (fails the bias test),
    # the bf16 levers by +.0008 (pass it; step 1 of the plain stack repeats to the bit).
    real = {c["name"]: c for c in tt.loss_check([_row(42, a, True), _row(42, b, True),
                                                 _row(42, c1[2]["losses"], name="fp8"), _row(42, c1[3]["losses"], name="bf16")])}
    assert "fp8" in c1[2]["name"] and "fp8" not in c1[3]["name"]
    assert real["fp8"]["step1"] == pytest.approx(-0.2637, abs=1e-4) and not real["fp8"]["bias_ok"]
    assert real["bf16"]["step1"] == pytest.approx(0.0008, abs=1e-4) and real["bf16"]["bias_ok"]


def test_the_best_row_is_never_one_the_loss_check_failed():
    # Round 9's loss call on an H100 printed fp8 (5,540 tok/s) as the best row although the check had
    # just judged it outside the noise; the bf16 levers (3,077) were the fastest row within it.
    tt = _bench_module()

    def timed(row, tokens_per_s, gib=12.0):
        return {**row, "tokens_per_s": tokens_per_s, "peak_gib": gib, "error": None, "micro_batch": 32,
                "levers": {"checkpoint_layers": None}}

    rows = [timed(_row(42, P42, True), 1806.0), timed(_row(42, P42_AGAIN, True), 1978.0),
            timed(_row(42, [10.004, 9.01, 8.015, 7.02], name="within"), 3077.0),
            timed(_row(42, [x + 0.09 for x in P42], name="biased, faster"), 5540.0),
            timed(_row(44, P42, name="unjudged, too big"), 9000.0, gib=80.0)]
    best = tt.best_within(rows, max_gib=36)
    assert best["name"] == "within" and best["steady_tokens_per_s"] == 3077.0
    assert best["ratio"] == pytest.approx(3077.0 / 1806.0)
    assert tt.best_within(rows, max_gib=100)["name"] == "unjudged, too big"  # no repeat at seed 44: not judged


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
def test_train_throughput_runs_the_plain_stack_twice_ours_and_the_new_levers_and_prints_the_loss_check(tmp_path):
    """One tiny run of the bench's final mode: the plain stack twice at one seed (the loss check's noise), ours,
    fp8 (emulated off CUDA) and the fused/offload/gc levers on the same base, one after the other."""
    fp8_spec, fused_spec = "packing,answer,fp8,mb=8", "packing,answer,fused,offload,mb=8,gc=1"
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--final",
                          "--steps", "3", "--lr", "1e-2", "--targets", "learnable", "--baseline-seeds", "42,42",
                          "--lora-dropout", "0", "--ours", f"packing,answer,mb=8;{fp8_spec};{fused_spec}",
                          "--budget-s", "3000", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads((tmp_path / "train_throughput.json").read_text())
    rows = got["rows"]
    assert [(r["baseline"], r["seed"]) for r in rows] == [(True, 42), (True, 42), (False, 42), (False, 42), (False, 42)]
    assert rows[1]["name"].endswith("seed 42 run 2") and got["targets"] == "learnable"
    p, again, ours = rows[0]["losses"], rows[1]["losses"], rows[2]["losses"]
    assert p == again  # on the CPU the repeat agrees bit for bit: the check falls back to its floor
    assert p[-1] < p[0] - 0.1  # answers from 8 ids: the loss falls within 3 steps
    # packed, answer-only, no dropout: the same function summed in another order
    assert ours != p and max(abs(x - y) for x, y in zip(ours, p)) < 1e-3
    checks = {c["name"]: c for c in got["loss_check"]}
    assert set(checks) == {r["name"] for r in rows[2:]}
    assert checks[rows[2]["name"]]["noise_rms"] == 0 and checks[rows[2]["name"]]["within"]
    assert "Within noise?" in out.stdout and len(re.findall(r"(WITHIN|NOT within) noise", out.stdout)) == 3

    fp8 = rows[3]  # fp8 (emulated off CUDA): the base's matmul inputs rounded to e4m3, so close, not equal
    assert fp8["name"].endswith(f"({fp8_spec})") and fp8["levers"]["fp8"] and not fp8["error"]
    assert "fp8 on 6 frozen linears (gate_proj/up_proj/down_proj;" in out.stdout
    assert fp8["losses"][0] != p[0] and fp8["losses"][0] == pytest.approx(p[0], rel=1e-2)
    fused = rows[4]  # runs on the same base after the fp8 row: its layers must be back to bf16
    assert fused["levers"]["fused_lora"] and fused["levers"]["offload_checkpoints"] and fused["levers"]["checkpoint_layers"] == 1
    assert not fused["error"] and len(fused["losses"]) == len(p) == 3
    # Step 1: LoRA B starts at zero, so the plain stack and ours see the same model: same loss.
    assert fused["losses"][0] == pytest.approx(p[0], rel=1e-4)
    assert "Loss per optimizer step" in out.stdout and "largest |ours - baseline|" in out.stdout
