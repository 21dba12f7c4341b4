"""`socrates-launch predict` on CPU with the smoke model, in its three forms, and its input checks.

The launcher runs the real `python -m job predict` subprocess; these tests go through the CLI as a
user would (a process, stdin for --interactive)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prepared test split and a random-weight LoRA adapter on the smoke base."""
    import torch

    from job import model as JM
    from job.prepare import prepare
    from job.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(SMOKE)
    prepare("synthetic:120", root / "data", cfg=cfg)
    model = JM.build(cfg, load_tokenizer(cfg.model.tokenizer, cfg.model.id), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(root / "adapter")
    return root


def cli(args, stdin=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "launcher", "predict", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


def _bars(out: str) -> dict[str, float]:
    """answer -> percent from the rendered bar chart."""
    bars = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[1].endswith("%"):
            bars[parts[0]] = float(parts[1].rstrip("%"))
    return bars


def test_profile_and_scenario(setup):
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--demographics",
             "Age: 25; Gender: Female; Education: Bachelor's",
             "--scenario", "Do you support increasing minimum wage? (1-7 scale)"])
    assert r.returncode == 0, r.stderr
    bars = _bars(r.stdout)
    assert list(bars) == [str(v) for v in range(1, 8)]
    assert sum(bars.values()) == pytest.approx(100, abs=0.5)
    assert "sampled answer:" in r.stdout


def test_example_shows_the_human_answer(setup):
    import json

    row = json.loads((setup / "data" / "test.jsonl").read_text().splitlines()[2])
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--example", "2", "--data", str(setup / "data")])
    assert r.returncode == 0, r.stderr
    assert f"human answer (test row 2): {row['response']}" in r.stdout
    assert len(_bars(r.stdout)) >= 2


def test_interactive_loop_answers_each_query_and_survives_a_bad_one(setup):
    stdin = ("Age: 40; Party Id: Lean Democrat\nHow much do you trust the news? Only return an integer from 0 to 100, nothing else.\n"
             "Age forty\nanything (1-5)\n"
             "Gender: Male\nShould taxes rise? (1-5 scale)\n\n")
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--interactive"], stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("predicted distribution over answers") == 2
    assert "answers 0..100" in r.stdout and "answers 1..5" in r.stdout
    assert "error: --demographics: 'Age forty' is not accepted" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--demographics", "Age 25", "--scenario", "Q? (1-7 scale)"], "'Age 25' is not accepted; expected \"Field: value"),
    (["--demographics", "Age: 25; Shoe size: 9", "--scenario", "Q? (1-7 scale)"], "'Shoe size: 9' is not accepted"),
    (["--demographics", "Age: old", "--scenario", "Q? (1-7 scale)"], "Age 'old' is not accepted (a whole number"),
    (["--demographics", "Age: 25", "--scenario", "Do you support it?"], "states no answer scale"),
    (["--example", "1"], "--example N needs --data DIR"),
])
def test_bad_input_exit_2_one_line_before_any_model(setup, args, needle):
    r = cli(["--adapter", str(setup / "adapter"), *args])
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_adapter_is_exit_2(tmp_path):
    r = cli(["--adapter", str(tmp_path), "--demographics", "Age: 25", "--scenario", "Q? (1-7 scale)"])
    assert r.returncode == 2 and "no adapter_config.json" in r.stderr


def test_example_out_of_range_comes_back_as_exit_2(setup):
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--example", "100000", "--data", str(setup / "data")])
    assert r.returncode == 2 and "--example 100000: not accepted" in r.stderr


def test_launcher_predict_never_imports_torch():
    code = ("import sys, launcher.verbs.predict, launcher.verbs.report; "
            "sys.exit(1 if 'torch' in sys.modules or 'job' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
