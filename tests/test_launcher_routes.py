"""One route per knob (issue #28): a setting is written once, in the run config, and travels one way,
CLI flag -> config -> job. The estimate prices the config the job reads, and the rendered task passes
no knob a second time under another name."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from launcher_helpers import REPO

EVAL_FLAGS = ("--rows", "--subset", "--eval-subset", "--split", "--seed", "--mode", "--base-model")


_PROBE = """
import json, sys
from launcher import plan as planlib, registry, task as tasklib
from launcher.cli import build_parser
from launcher_helpers import REPO
parser, _ = build_parser("estimate")
plan = planlib.resolve(parser.parse_args(["estimate", "--gpu", "A100:1", *sys.argv[1:]]), default_gpu=True)
est = planlib.estimate(plan, allow_unpriced=True)
run = registry.Run(id="t", dir=REPO / "nonexistent", name="t", config=plan.cfg.to_dict(), options=plan.options)
task = tasklib.render(run, gpu=str(plan.gpu), workdir=REPO)
print(json.dumps({"evaluation_s": sum(t.expected_s for t in est.plan.terms if t.name == "evaluation"), "task": task}))
"""


def _probe(tmp_path, *argv: str) -> tuple[float, dict]:
    """The estimate's evaluation seconds and the rendered task for `estimate --gpu A100:1 ARGV`, in a process
    whose HOME holds the seeded price catalog (tests/skyfix.py): SkyPilot fixes its paths when imported."""
    from skyfix import seed_catalog

    home = tmp_path / "home"
    if not home.exists():
        seed_catalog(home)
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    r = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return got["evaluation_s"], got["task"]


def _config_with(tmp_path, **eval_section) -> str:
    cfg = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    cfg.setdefault("eval", {}).update(eval_section)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_eval_enabled_false_in_a_config_is_priced_and_rendered_alike(tmp_path):
    on, on_task = _probe(tmp_path, "--subset", "0.1")
    off, off_task = _probe(tmp_path, "--subset", "0.1", "--config", _config_with(tmp_path, enabled=False))
    flag, flag_task = _probe(tmp_path, "--subset", "0.1", "--no-eval")
    assert on > 0 and off == 0 == flag
    for task in (off_task, flag_task):  # what the job reads says the same as what was priced
        assert yaml.safe_load(task["envs"]["CONFIG_YAML"])["eval"]["enabled"] is False
    assert yaml.safe_load(on_task["envs"]["CONFIG_YAML"])["eval"]["enabled"] is True


@pytest.mark.slow
def test_eval_base_is_priced_as_a_second_evaluation(tmp_path):
    one, _ = _probe(tmp_path, "--subset", "0.1")
    two, task = _probe(tmp_path, "--subset", "0.1", "--eval-base")
    assert abs(two - 2 * one) < 1e-6 * one
    assert yaml.safe_load(task["envs"]["CONFIG_YAML"])["eval"]["base"] is True


def test_the_rendered_task_passes_no_config_knob_a_second_time(tmp_path):
    _, task = _probe(tmp_path, "--subset", "0.1", "--eval-rows", "100", "--eval-base")
    envs = task["envs"]
    config = yaml.safe_load(envs["CONFIG_YAML"])
    leaves = {f"{section}.{key}" for section, body in config.items() if isinstance(body, dict) for key in body}
    # No env is a config leaf under another name (SUBSET, EVAL_ROWS, EVAL_BASE were): names compared loosely.
    names = {k.replace("_", "").upper() for k in envs}
    for leaf in leaves:
        section, key = leaf.split(".")
        for alias in (key, f"{section}{key}", f"{section}_{key}"):
            assert alias.replace("_", "").upper() not in names, f"env {alias.upper()} repeats config {leaf}"
    assert envs["DATA"] == ""  # the config's data.source (hub id here); DATA is set only for shipped local data
    # The run block passes none of the config's knobs as flags: the job reads them from run_config.yaml.
    for flag in EVAL_FLAGS:
        assert flag not in task["run"], f"the run block passes {flag} (the config's field is the one route)"
    assert "--as-configured" in task["run"]


def test_the_job_skips_evaluation_the_config_turns_off(tmp_path):
    """The run block's evaluate calls run as-is; the job itself honours eval.enabled / eval.base."""
    off = _config_with(tmp_path, enabled=False)
    args = ["evaluate", "--config", off, "--data", str(tmp_path / "none"), "--out", str(tmp_path / "e"),
            "--as-configured"]
    r = subprocess.run([sys.executable, "-m", "job", *args, "--adapter", str(tmp_path / "a")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "evaluate: skipped (eval.enabled: false" in r.stdout, r.stderr[-2000:]
    assert not (tmp_path / "e").exists()
    on = _config_with(tmp_path, enabled=True, base=False)
    r = subprocess.run([sys.executable, "-m", "job", "evaluate", "--config", on, "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "b"), "--as-configured", "--base"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "evaluate: skipped (eval.base: false" in r.stdout, r.stderr[-2000:]
    # Without --as-configured the same config is an error to evaluate nothing: the flag is what skips.
    r = subprocess.run([sys.executable, "-m", "job", *args[:-1], "--adapter", str(tmp_path / "a")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "adapter_config.json" in r.stderr
