"""The cost model: each term, the CLI against a seeded SkyPilot catalog, caps and bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contracts.config import load_config
from contracts.errors import ContractError
from launcher.cost.caps import DEADLINE_GRACE_S, actual_cost, deadline_for, safety_deadline
from launcher.cost.estimate import Estimate, Offer, estimate_run
from launcher.cost.hours import CLOUD_MBPS, plan_card
from launcher.cost.rates import card_throughput, load_throughput, model_params_b
from launcher.cost.tokens import count_tokens, load_hub_stats
from conftest import REPO, one_line, run_cli

PAPER = REPO / "configs" / "paper.yaml"

# Catalog rows in SkyPilot's v8 CSV layout, with prices no real catalog has, so a match proves origin.
LAMBDA_CSV = """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
cpu_4x_general,,,4.0,16.0,0.2,us-east-1,,
gpu_1x_a100,A100,1.0,30.0,200.0,1.37,us-east-1,"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 40960}}], 'TotalGpuMemoryInMiB': 40960}",
gpu_1x_a100,A100,1.0,30.0,200.0,1.41,us-west-1,"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 40960}}], 'TotalGpuMemoryInMiB': 40960}",
gpu_1x_h100_pcie,H100,1.0,26.0,200.0,3.17,us-east-1,"{'Gpus': [{'Name': 'H100', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 81920}",
"""
RUNPOD_CSV = """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Region,SpotPrice,Price,AvailabilityZone,GpuInfo
1x_A100-80GB_SECURE,A100-80GB,1.0,8.0,117.0,US,0.93,1.53,US-TX-1,"{'Gpus': [{'Name': 'A100 PCIe', 'Manufacturer': 'Nvidia', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 80}}], 'TotalGpuMemoryInMiB': 80}"
"""


@pytest.fixture(scope="module")
def sky_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("skyhome")
    for cloud, text in (("lambda", LAMBDA_CSV), ("runpod", RUNPOD_CSV)):
        d = home / ".sky" / "catalogs" / "v8" / cloud
        d.mkdir(parents=True)
        (d / "vms.csv").write_text(text)
    return home


def cli(sky_home: Path, *args: str, runs: Path | None = None, columns: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(sky_home), "PYTHONPATH": str(REPO)}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    if runs is not None:
        env["SOCRATES_RUNS_DIR"] = str(runs)
    return run_cli(list(args), env)


# --- acceptance 1: offers from the seeded catalog, totals from tokens / throughput + overhead ------

@pytest.fixture(scope="module")
def est_json(sky_home) -> dict:
    out = {}
    for subset in ("0.1", "0.01"):
        p = cli(sky_home, "estimate", "--gpu", "A100:1", "--subset", subset, "--json")
        assert p.returncode == 0, p.stderr
        out[subset] = json.loads(p.stdout)
    return out


def test_offers_come_from_the_seeded_catalog(est_json):
    est = est_json["0.1"]
    got = {(o["cloud"], o["region"], o["instance"], o["price_per_h"]) for o in est["offers"]}
    assert got == {("Lambda", "us-east-1", "gpu_1x_a100", 1.37), ("Lambda", "us-west-1", "gpu_1x_a100", 1.41)}
    assert [o["cheapest"] for o in est["offers"]] == [True, False]
    assert est["cheapest"]["price_per_h"] == 1.37


def test_totals_are_the_terms_and_dollars_are_hours_times_price(est_json):
    est = est_json["0.1"]
    terms = {t["name"]: t for t in est["terms"]}
    for i, key in enumerate(("low_s", "expected_s", "high_s")):
        assert est["hours"][i] == pytest.approx(sum(t[key] for t in est["terms"]) / 3600, rel=1e-6)
    for o in est["offers"]:
        assert o["dollars"] == pytest.approx([h * o["price_per_h"] for h in o["hours"]], abs=0.01)
    plan = est["plans"][0]
    assert terms["training"]["expected_s"] == pytest.approx(est["tokens"]["tokens"] / plan["tokens_per_s"], rel=1e-9)
    overhead = [n for n in terms if n != "training"]
    assert {"provisioning", "model download", "adapter download", "teardown"} <= set(overhead)
    assert est["hours"][0] < est["hours"][1] < est["hours"][2]


def test_subsets_differ_by_the_token_ratio_in_the_training_term(est_json):
    a, b = est_json["0.1"], est_json["0.01"]
    train = {k: next(t for t in v["terms"] if t["name"] == "training") for k, v in est_json.items()}
    ratio = a["tokens"]["tokens"] / b["tokens"]["tokens"]
    assert ratio == pytest.approx(10, rel=0.01)
    assert train["0.1"]["expected_s"] / train["0.01"]["expected_s"] == pytest.approx(ratio, rel=1e-9)
    # ...and the fixed terms do not scale with the subset.
    fixed = {k: {t["name"]: t["expected_s"] for t in v["terms"]} for k, v in est_json.items()}
    assert fixed["0.1"]["provisioning"] == fixed["0.01"]["provisioning"]
    assert fixed["0.1"]["model download"] == fixed["0.01"]["model download"]


@pytest.mark.slow
def test_spot_uses_spot_price_with_a_preemption_allowance_and_the_on_demand_price_beside(sky_home):
    on = json.loads(cli(sky_home, "estimate", "--gpu", "A100-80GB:1", "--subset", "0.01", "--json").stdout)
    spot = json.loads(cli(sky_home, "estimate", "--gpu", "A100-80GB:1", "--subset", "0.01", "--spot", "--json").stdout)
    assert on["cheapest"]["price_per_h"] == 1.53 and spot["cheapest"]["price_per_h"] == 0.93
    assert spot["cheapest"]["on_demand_per_h"] == 1.53 and on["cheapest"]["on_demand_per_h"] is None
    # The allowance, recomputed from the terms by the documented rule: 0.1 preemptions per hour of the run,
    # each a restart (every fixed term before training) + half a checkpoint interval of training.
    terms = {t["name"]: t for t in on["terms"]}
    later = ("training", "checkpoints", "evaluation", "adapter download", "teardown")
    restart = sum(t["expected_s"] for name, t in terms.items() if name not in later)
    steps, every = on["tokens"]["steps"], 50  # configs/paper.yaml: checkpoint_every 50
    interval = terms["training"]["expected_s"] * min(1.0, every / steps)
    allowance_h = 0.1 * on["hours"][1] * (restart + interval / 2) / 3600
    assert spot["hours"][0] == on["hours"][0]
    assert spot["hours"][1] == pytest.approx(on["hours"][1] + allowance_h, rel=1e-9)
    assert spot["hours"][2] > on["hours"][2] + allowance_h
    note = next(n for n in spot["notes"] if "preemption allowance" in n)
    assert "$1.53/h" in note and f"{allowance_h:.2f} h" in note
    table = cli(sky_home, "estimate", "--gpu", "A100-80GB:1", "--subset", "0.01", "--spot", columns=160).stdout
    header = next(line for line in table.splitlines() if " offer " in line)
    assert header.split()[-4:-2] == ["on", "demand"] and "$/h is the spot price" in table
    row = next(line.split() for line in table.splitlines() if line.lstrip().startswith("*"))
    assert row[row.index("A100-80GB:1") + 1:][:2] == ["0.93", "1.53"], table  # spot $/h, then on demand


def test_without_gpu_every_fitting_card_competes_and_the_cheapest_wins(sky_home):
    est = json.loads(cli(sky_home, "estimate", "--subset", "0.01", "--json").stdout)
    cards = {o["card"] for o in est["offers"]}
    assert cards == {"A100", "A100-80GB", "H100"}
    best = min(est["offers"], key=lambda o: o["dollars"][1])
    assert est["cheapest"] == best


def test_table_and_explain_render(sky_home):
    p = cli(sky_home, "estimate", "--gpu", "A100:1", "--subset", "0.01", "--explain")
    assert p.returncode == 0, p.stderr
    for word in ("cheapest", "Lambda", "1.37", "training", "provisioning", "evaluation", "total"):
        assert word in p.stdout


# --- bad input: exit 2, one line, nothing created ---------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (("--max-cost", "0"), "--max-cost"), (("--max-cost", "-5"), "--max-cost"), (("--max-hours", "0"), "--max-hours"),
    (("--max-hours", "nan"), "--max-hours"), (("--gpu", "Z100:1"), "Z100"), (("--gpu", "T4:1"), "bf16"),
    (("--subset", "1.5"), "1.5"), (("--subset", "0"), "subset"), (("--config", "nope.yaml"), "nope.yaml"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    # These fail before any catalog lookup, so they run in-process (no sky import).
    from launcher.cli import main

    rc = main(["estimate", *args])
    err = capsys.readouterr().err
    one_line(subprocess.CompletedProcess([], rc, "", err), needle)


@pytest.mark.parametrize("args,needle", [
    (("--gpu", "L40S:1"), "no price"), (("--cloud", "runpod", "--gpu", "A100:1"), "no price"),
])
def test_a_card_the_catalog_has_no_price_for_is_exit_2(sky_home, args, needle):
    one_line(cli(sky_home, "estimate", *args), needle)


@pytest.mark.slow
def test_max_cost_below_the_low_estimate_refuses_and_launches_nothing(sky_home, est_json, tmp_path):
    est = est_json["0.1"]
    cap = est["dollars"][0] * 0.9
    p = cli(sky_home, "estimate", "--gpu", "A100:1", "--subset", "0.1", "--max-cost", f"{cap:.2f}")
    one_line(p, "--max-cost", "high estimate", f"${est['dollars'][2]:,.2f}")
    runs = tmp_path / "runs"
    p = cli(sky_home, "up", "--gpu", "A100:1", "--subset", "0.1", "--max-cost", f"{cap:.2f}", "--yes", runs=runs)
    one_line(p, "--max-cost")
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("verb", ["estimate", "up"])
@pytest.mark.parametrize("infra", ["local", "ssh://ubuntu@127.0.0.1:1"])
def test_max_cost_on_a_machine_without_a_price_is_refused_not_ignored(sky_home, tmp_path, verb, infra):
    # Local and ssh machines have no cloud price, so a dollar cap can't become a deadline: exit 2, one
    # line, before a run exists or a host is contacted (port 1: nothing listens there).
    runs = tmp_path / "runs"
    extra = ("--yes",) if verb == "up" else ()
    p = cli(sky_home, verb, "--infra", infra, "--max-cost", "0.01", *extra, runs=runs)
    one_line(p, "--max-cost 0.01", "cloud price", "--infra sky", "--max-hours")
    assert not runs.exists() or not any(runs.iterdir())


# --- the terms, one by one --------------------------------------------------------------------

def test_hub_tokens_scale_with_subset_and_split_rows():
    hub = load_hub_stats()
    cfg = load_config(PAPER).with_overrides({"data.subset": 0.1})
    tok = count_tokens(cfg)
    assert tok.train_rows == round(2_418_748 * 0.1) and tok.test_rows == 482_642
    assert tok.steps == math.ceil(tok.train_rows / 256)
    assert tok.tokens == pytest.approx(tok.train_rows * hub["tokens_per_row"]["mean"])
    assert tok.low < tok.tokens < tok.high and not tok.exact


def test_unseen_participants_trains_its_fraction_of_the_rows_and_the_estimate_names_the_split(sky_home, tmp_path):
    cfg = load_config(PAPER).with_overrides({"data.split": "unseen-participants", "data.participant_fraction": 0.2})
    tok = count_tokens(cfg)
    # Rows per participant are alike within a study: about 20% of all 2,901,390 rows train, 80% are test.
    assert tok.train_rows == round(2_901_390 * 0.2) and tok.test_rows == round(2_901_390 * 0.8)
    assert tok.split == "unseen-participants, 0.2 of each study's participants in training"
    assert count_tokens(load_config(PAPER)).split == "unseen-studies"
    # A prepared folder's own split wins over the config's.
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "stats.json").write_text(json.dumps(
        {"subset": 1.0, "split": "unseen-participants", "participant_fraction": 0.1,
         "train": {"rows": 100, "tokens": {"total": 25_000, "mean": 250.0}},
         "test": {"rows": 900, "tokens": {"total": 234_000, "mean": 260.0}}}))
    assert count_tokens(load_config(PAPER), data=str(tmp_path / "prep")).split == \
        "unseen-participants, 0.1 of each study's participants in training"
    conf = tmp_path / "up.yaml"
    conf.write_text(PAPER.read_text().replace("split: unseen-studies", "split: unseen-participants"))
    assert "split: unseen-participants" in conf.read_text()
    p = cli(sky_home, "estimate", "--config", str(conf), "--gpu", "A100:1", "--subset", "0.01")
    assert p.returncode == 0, p.stderr
    assert "training rows (split unseen-participants, 0.1 of each study's participants in training)" in \
        " ".join(p.stdout.split())


def test_prepared_stats_give_exact_tokens_and_max_steps_caps_them(tmp_path):
    stats = {"subset": 1.0, "tokenizer": "qwen2.5-offline",
             "train": {"rows": 1000, "tokens": {"total": 250_000, "mean": 250.0}},
             "test": {"rows": 200, "tokens": {"total": 52_000, "mean": 260.0}}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    cfg = load_config(PAPER)
    tok = count_tokens(cfg, data=str(tmp_path))
    assert tok.exact and tok.tokens == 250_000 and tok.low == tok.high == tok.tokens
    assert tok.steps == math.ceil(1000 / 256) and tok.test_rows == 200
    capped = count_tokens(cfg.with_overrides({"train.max_steps": 2}), data=str(tmp_path))
    assert capped.steps == 2 and capped.tokens == pytest.approx(250_000 * 512 / 1000)
    two_epochs = count_tokens(cfg.with_overrides({"train.epochs": 2.0}), data=str(tmp_path))
    assert two_epochs.tokens == pytest.approx(500_000) and two_epochs.steps == math.ceil(2000 / 256)


def test_broken_prepared_stats_is_a_contract_error(tmp_path):
    (tmp_path / "stats.json").write_text("{\"train\": {}}")
    with pytest.raises(ContractError, match="stats.json"):
        count_tokens(load_config(PAPER), data=str(tmp_path))


def test_raw_local_file_counts_rows(tmp_path):
    f = tmp_path / "rows.jsonl"
    row = '{"study_id": "s", "response": 1, "condition_num": 0, "task_num": 0, "prompt": "q?"}'  # valid rows
    f.write_text("\n".join(row for _ in range(1200)) + "\n")
    tok = count_tokens(load_config(PAPER), data=str(f))
    share = 2_418_748 / 2_901_390
    assert tok.train_rows == round(1200 * share) and not tok.exact and "1,200 rows" in tok.source
    with pytest.raises(ContractError, match="no such file"):
        count_tokens(load_config(PAPER), data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ContractError, match="no token stats"):
        count_tokens(load_config(PAPER), data="someone/OtherDataset")


def test_throughput_measured_vs_derived_cards():
    table = load_throughput()
    ref = table["reference"]
    ref_tps, ref_band, _ = card_throughput(table, ref, "qlora", 14.0)
    a100, band, how = card_throughput(table, "A100", "qlora", 14.0)
    spec_a, spec_r = table["cards"]["A100"], table["cards"][ref]
    assert a100 / ref_tps == pytest.approx(math.sqrt(spec_a["tflops"] / spec_r["tflops"] * spec_a["tbps"] / spec_r["tbps"]))
    assert band == table["band_derived"] and "derived" in how
    two, _, _ = card_throughput(table, ref, "qlora", 14.0, count=2)
    assert two == pytest.approx(2 * ref_tps * table["multi_gpu_efficiency_measured"][2]["efficiency"])
    eight, _, how8 = card_throughput(table, ref, "qlora", 14.0, count=8)  # past the measured 2 GPUs
    assert eight == pytest.approx(8 * ref_tps * table["multi_gpu_efficiency"]) and "measured only up to 2" in how8
    seven, _, _ = card_throughput(table, ref, "qlora", 7.0)
    assert seven == pytest.approx(2 * ref_tps)


def test_model_size_from_name_or_architecture():
    assert model_params_b(load_config(PAPER)) == 14.0
    smoke = load_config(REPO / "configs" / "smoke.yaml")
    assert 0.005 < model_params_b(smoke) < 0.02  # 2 layers of 64 + tied 151,936 x 64 embeddings


def test_fixed_terms_follow_the_model_and_infra():
    cfg = load_config(PAPER).with_overrides({"data.subset": 0.01})
    table = load_throughput()
    tok = count_tokens(cfg)
    cloud = {t.name: t for t in plan_card(cfg, table, "H100", 1, 14.0, tok, local=False).terms}
    assert cloud["model download"].expected_s == pytest.approx(28.0 * 1000 / CLOUD_MBPS[1])
    local = {t.name for t in plan_card(cfg, table, "H100", 1, 14.0, tok, local=True).terms}
    assert not local & {"provisioning", "teardown", "adapter download"}
    rnd = cfg.with_overrides({"model.init": "random"})
    assert "model download" not in {t.name for t in plan_card(rnd, table, "H100", 1, 14.0, tok, False).terms}
    no_eval = cfg.with_overrides({"eval.enabled": False})
    assert "evaluation" not in {t.name for t in plan_card(no_eval, table, "H100", 1, 14.0, tok, False).terms}


# --- caps -> deadline, and the actual cost ----------------------------------------------------

def _estimate_on(price: float) -> Estimate:
    cfg = load_config(PAPER).with_overrides({"data.subset": 0.01})
    tok = count_tokens(cfg)
    plan = plan_card(cfg, load_throughput(), "H100", 1, 14.0, tok, local=False)
    hours = plan.hours()
    offer = Offer("Lambda", "us-east-1", "gpu_1x_h100", "H100", 1, False, price, hours,
                       tuple(h * price for h in hours), cheapest=True)
    return Estimate("sky", "qlora", "m", 14.0, tok, (plan,), (offer,), False)


def test_deadline_from_caps():
    est = _estimate_on(2.0)
    assert deadline_for(est, None, None) is None
    around = DEADLINE_GRACE_S + sum(t.high_s for t in est.plan.terms
                                         if t.name in ("provisioning", "adapter download", "teardown"))  # setup: inside
    hi_dollars = est.cheapest.dollars[2]
    d = deadline_for(est, max_cost=hi_dollars * 2, max_hours=None)
    assert d == pytest.approx(hi_dollars * 2 / 2.0 * 3600 - around)
    d2 = deadline_for(est, max_cost=hi_dollars * 2, max_hours=est.hours[2] * 1.1)
    assert d2 == pytest.approx(min(d, est.hours[2] * 1.1 * 3600 - around))
    with pytest.raises(ContractError, match="--max-cost"):
        deadline_for(est, max_cost=hi_dollars * 0.99, max_hours=None)
    with pytest.raises(ContractError, match="--max-hours"):
        deadline_for(est, max_cost=None, max_hours=est.hours[2] * 0.99)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ContractError):
            deadline_for(est, max_cost=bad, max_hours=None)


def test_a_cloud_run_without_caps_still_gets_a_remote_safety_deadline():
    est = _estimate_on(2.0)
    high_s = est.hours[2] * 3600
    assert safety_deadline(est) == pytest.approx(max(2 * high_s, high_s + 3600))
    local = estimate_run(load_config(REPO / "configs" / "smoke.yaml"), gpu=None, infra="local")
    assert safety_deadline(local) is None  # nothing bills by the hour there


def test_local_estimate_without_card_turns_max_hours_into_the_deadline():
    est = estimate_run(load_config(REPO / "configs" / "smoke.yaml"), gpu=None, infra="local")
    assert est.offers == () and est.hours is None
    assert deadline_for(est, max_cost=None, max_hours=0.1) == pytest.approx(360.0)
    with pytest.raises(ContractError, match="cloud price"):  # no price: a dollar cap is refused, not ignored
        deadline_for(est, max_cost=1.0, max_hours=0.1)
    with pytest.raises(ContractError, match=r"--max-hours 0.01: leaves the job 36 s"):  # under a minute: no run
        deadline_for(est, max_cost=None, max_hours=0.01)


def test_actual_cost_is_price_times_billed_time():
    from launcher.registry import Run

    run = Run(id="r", dir=Path("/nonexistent"), price_per_hour=3.0, started_at=1000.0, ended_at=1000.0 + 5400)
    assert actual_cost(run) == 4.5
    assert actual_cost({"price_per_hour": 3.0, "started_at": time.time() - 3600}) == pytest.approx(3.0, abs=0.01)
    assert actual_cost({"price_per_hour": None, "started_at": 1.0}) is None
    assert actual_cost({"estimate": {"cheapest": {"price_per_h": 2.0}}, "started_at": 0, "ended_at": 1800}) == 1.0


def test_a_pcie_h100_offer_gets_the_slower_pcie_hours(sky_home):
    est = json.loads(cli(sky_home, "estimate", "--gpu", "H100:1", "--subset", "0.01", "--no-eval", "--json").stdout)
    (offer,) = est["offers"]
    assert offer["instance"] == "gpu_1x_h100_pcie" and offer["spec"] == "H100-PCIE" and offer["card"] == "H100"
    plans = {p["card"]: p for p in est["plans"]}
    table = load_throughput()
    pcie, sxm = table["cards"]["H100-PCIE"], table["cards"]["H100"]
    ratio = plans["H100"]["tokens_per_s"] / plans["H100-PCIE"]["tokens_per_s"]
    assert ratio == pytest.approx(math.sqrt(sxm["tflops"] / pcie["tflops"] * sxm["tbps"] / pcie["tbps"]))
    assert offer["hours"] == plans["H100-PCIE"]["hours"] and est["hours"] == offer["hours"]


def test_the_cost_model_imports_neither_torch_nor_sky():
    code = ("import sys; import launcher.cost.render, launcher.cost.caps, launcher.verbs.estimate; "
            "bad = [m for m in ('torch', 'sky', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stdout + p.stderr


# --- QLoRA and LoRA side by side (issue #27) ----------------------------------------------------

@pytest.mark.slow
def test_estimate_shows_qlora_and_lora_side_by_side_where_the_card_fits_both(sky_home):
    import yaml

    table = yaml.safe_load((REPO / "configs" / "throughput.yaml").read_text())
    est = json.loads(cli(sky_home, "estimate", "--gpu", "H100:1", "--subset", "0.1", "--json").stdout)
    assert est["method"] == "qlora"  # shown, never switched to
    rows = {r["method"]: r for r in est["methods"]}
    assert set(rows) == {"qlora", "lora"} and rows["qlora"]["chosen"] and not rows["lora"]["chosen"]
    # the same card (the seeded catalog's one H100 offer is PCIe), the same data: the rates differ by the table's ratio
    ratio = table["measured"]["lora"][14]["ratio"]
    assert rows["lora"]["tokens_per_s"] == pytest.approx(rows["qlora"]["tokens_per_s"] * ratio, abs=1)
    assert rows["qlora"]["tokens_per_s"] == round(est["plans"][-1]["tokens_per_s"])
    for r in rows.values():  # dollars = hours x the offer's $3.17/h
        assert r["dollars"] == pytest.approx([round(h * 3.17, 2) for h in r["hours"]], abs=0.011)
    assert (rows["qlora"]["need_gib"], rows["lora"]["need_gib"]) == (table["min_memory_gib"]["qlora"],
                                                                    table["min_memory_gib"]["lora"])
    assert rows["lora"]["hours"][1] < rows["qlora"]["hours"][1]
    text = cli(sky_home, "estimate", "--gpu", "H100:1", "--subset", "0.1").stdout
    assert "QLoRA and LoRA on H100" in text and "LoRA (bf16 base)" in text


def test_a_card_that_fits_only_qlora_shows_no_comparison(sky_home):
    est = json.loads(cli(sky_home, "estimate", "--gpu", "A100:1", "--subset", "0.01", "--json").stdout)
    assert est["methods"] == [] and est["method"] == "qlora"  # 40 GiB: LoRA's bf16 base needs 60


@pytest.mark.parametrize("method,card_gib", [("qlora", 22.5), ("qlora", 80.0), ("lora", 80.0), ("lora", 44.0)])
def test_memory_mode_auto_keeps_the_method_the_config_names(method, card_gib):
    from job.check import JobCannotRun, plan_memory

    cfg = load_config(PAPER).with_overrides({"train.method": method})
    try:
        run_cfg, mode = plan_memory(cfg, card_gib, 500.0, None, 1)
    except JobCannotRun as e:
        assert method in str(e)  # refused by name, not switched to another method
        return
    assert run_cfg.train.method == method and mode["mode"] in ("fast", "lean")
