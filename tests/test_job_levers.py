"""`job check` says which speed levers are really on, refuses (exit 3, one line naming the package)
a lever the config turns on that the machine can't provide unless train.require_levers: false,
and the train `start` event carries the same report (issue #12)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contracts import events
from contracts.config import load_config
from contracts.errors import ContractError
from job import levers
from conftest import REPO

SMOKE = REPO / "configs" / "smoke.yaml"
PAPER = REPO / "configs" / "paper.yaml"


def _config(tmp_path: Path, **train) -> Path:
    doc = yaml.safe_load(SMOKE.read_text())
    doc["train"].update(train)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _check(*args):
    return subprocess.run([sys.executable, "-m", "job", "check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_check_on_cpu_prints_the_levers_really_on(tmp_path):
    r = _check("--config", str(SMOKE), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("speed levers: "))
    # smoke.yaml: packing on, fused LoRA on, no checkpointing, 2 layers; Liger and flex are CUDA only.
    assert "liger off (CUDA only)" in line and "flex_attention off (auto: sdpa off CUDA)" in line, line
    assert "fused_lora on" in line and "packing on" in line and "checkpointed_layers 0/2" in line, line
    assert "offload off" in line
    report = json.loads((tmp_path / "check.json").read_text())["levers"]
    assert list(report) == list(events.LEVERS)
    check_event = [e for e in events.read_all(tmp_path / "events.jsonl") if e["event"] == "check"][0]
    assert check_event["levers"] == report


@pytest.mark.slow
def test_a_lever_the_machine_cant_provide_is_exit_3_naming_the_package(tmp_path):
    # flex_attention asked for explicitly on a CPU machine: it has no CPU backward here, so the
    # real probe (compile + backward) fails.
    cfg = _config(tmp_path, attn_implementation="flex_attention")
    r = _check("--config", str(cfg))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 3 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert "flex_attention" in lines[0] and "triton" in lines[0] and "train.require_levers: false" in lines[0], lines
    # Opted out: the same machine runs, slower, and says the lever is off.
    cfg = _config(tmp_path, attn_implementation="flex_attention", require_levers=False)
    r = _check("--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "flex_attention off (flex_attention does not compile here" in r.stdout


def test_liger_missing_on_a_gpu_machine_is_refused_and_opting_out_is_not(monkeypatch):
    cfg = load_config(PAPER)
    real_find_spec = importlib.util.find_spec
    # Fault injected around the real check: this machine has no liger_kernel importable.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    lv = levers.report(cfg, on_gpu=True, layers=48, probe_flex=False)
    assert lv["liger"]["on"] is False and lv["liger"]["missing"] == "liger-kernel"
    line = levers.refusal(lv)
    assert line and "liger-kernel" in line and "train.liger" in line and "\n" not in line
    assert levers.missing(lv) == [("liger", "liger-kernel", "train.liger")]
    # The paper config on a GPU: flex on, every layer but the configured ones checkpointed.
    assert lv["flex_attention"]["on"] is True and lv["packing"]["on"] is True and lv["fused_lora"]["on"] is True
    expected_ckpt = cfg.train.checkpoint_layers if cfg.train.checkpoint_layers is not None else 48
    assert lv["checkpointed_layers"]["layers"] == expected_ckpt and lv["checkpointed_layers"]["of"] == 48
    off = load_config(PAPER).with_overrides({"train.liger": False})
    assert levers.refusal(levers.report(off, on_gpu=True, layers=48, probe_flex=False)) is None


def test_the_start_event_schema_checks_the_levers():
    good = levers.report(load_config(SMOKE), on_gpu=False, layers=2, probe_flex=False)
    assert events.make("start", verb="train", levers=good)["levers"] == good
    with pytest.raises(ContractError, match="levers"):
        events.make("start", verb="train", levers={"liger": {"on": True}})
    with pytest.raises(ContractError, match="levers.packing"):
        events.make("start", verb="train", levers={**good, "packing": {"on": "yes"}})
    events.make("start", verb="prepare")  # other verbs carry none


def test_require_levers_must_be_a_boolean(tmp_path):
    with pytest.raises(ContractError, match="require_levers"):
        load_config(_config(tmp_path, require_levers="sometimes"))


@pytest.mark.slow
def test_the_train_start_event_carries_the_levers(tmp_path):
    doc = yaml.safe_load(SMOKE.read_text())
    doc["train"].update(max_steps=1, checkpoint_layers=1, gradient_checkpointing=True)
    doc["data"]["source"] = "synthetic:40"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "job", "train", "--config", str(cfg), "--out", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    start = [e for e in events.read_all(tmp_path / "out" / "events.jsonl") if e["event"] == "start"][0]
    assert start["verb"] == "train" and list(start["levers"]) == list(events.LEVERS)
    assert start["levers"]["checkpointed_layers"] == {"on": True, "layers": 1, "of": 2,
                                                      "why": "train.checkpoint_layers: 1"}
    assert start["levers"]["liger"] == {"on": False, "why": "CUDA only"}
    assert start["levers"]["packing"]["on"] is True


@pytest.mark.slow
def test_the_estimate_says_which_levers_its_rate_assumes(tmp_path):
    """A cloud estimate (the seeded offline catalog) names the levers and versions its measured rate assumes;
    on your own machine (--infra local) that note is not shown: the rate is the cloud card's, not yours."""
    pytest.importorskip("sky", reason="skypilot is not installed (the estimate reads its catalog)")
    from launcher_helpers import cli, fakesky_env, launcher_env

    env = fakesky_env(tmp_path)
    r = cli(["estimate", "--gpu", "A100:1", "--config", str(PAPER)], env, timeout=300)
    out = " ".join(r.stdout.split())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rate assumes speed levers: liger, flex_attention, fused_lora, packing, checkpointed_layers 48, offload (off: fp8)" in out, out
    assert "liger-kernel 0.8.5" in out and "turns off" not in out
    doc = yaml.safe_load(PAPER.read_text())
    doc.setdefault("train", {})["liger"] = False
    cfg = tmp_path / "noliger.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    r = cli(["estimate", "--gpu", "A100:1", "--config", str(cfg)], env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "this config turns off liger: expect a slower run" in " ".join(r.stdout.split())
    r = cli(["estimate", "--infra", "local", "--config", str(cfg)], launcher_env(tmp_path / "runs"))
    assert r.returncode == 0 and "speed levers" not in r.stdout and "turns off" not in r.stdout, r.stdout


def test_the_launcher_shows_the_levers_when_training_starts():
    import io

    from rich.console import Console

    from launcher.progress import Progress

    buf = io.StringIO()
    progress = Progress(Console(file=buf, force_terminal=False, width=200), price_per_hour=None, started_at=None)
    lv = levers.report(load_config(PAPER), on_gpu=True, layers=48, probe_flex=False)
    lv["liger"] = {"on": False, "why": "liger-kernel is not installed", "missing": "liger-kernel"}
    progress.on_event(events.make("start", verb="train", levers=lv))
    progress.on_event(events.make("start", verb="prepare"))
    progress.close()
    out = buf.getvalue()
    assert "job train started (speed levers: liger off, flex_attention on, fused_lora on, packing on" in out, out
    assert "job prepare started\n" in out
