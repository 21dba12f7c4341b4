"""The launcher's shape (issue #14): `estimate` and `up --dryrun` resolve the same flags the same way
on every infrastructure (`estimate --explain` and the dry run print the plan: config, data, caps),
verbs ask no backend what it is, and no verb imports another."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from launcher_helpers import REPO, cli, fakesky_env, launcher_env

VERBS = REPO / "launcher" / "verbs"
CONCRETE = ("launcher.backends.local", "launcher.backends.sky", "launcher.backends.ssh")
ROW = {"study_id": "s1", "response": 3, "condition_num": 1, "task_num": 2,
       "stimuli": "How much do you agree?", "demographic": {"age": 30}}


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from a import b` gives a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


# --- acceptance 1: thin verbs ------------------------------------------------------------------

@pytest.mark.parametrize("verb", sorted(p.stem for p in VERBS.glob("*.py") if p.stem != "__init__"))
def test_no_verb_imports_another_verb_or_a_concrete_backend(verb):
    imported = _imports(VERBS / f"{verb}.py")
    others = {m for m in imported if m.startswith("launcher.verbs.") and m != f"launcher.verbs.{verb}"}
    others |= {m for m in imported if m == "launcher.verbs"}
    assert not others, f"launcher/verbs/{verb}.py imports {sorted(others)}"
    concrete = {m for m in imported if m.startswith(CONCRETE) or m.endswith(("LocalBackend", "SkyBackend", "SshBackend"))}
    assert not concrete, f"launcher/verbs/{verb}.py names a concrete backend: {sorted(concrete)}"


# report.py reads the job's metrics.json shape (its isinstance checks are of that file, no backend's);
# issue #14's job half moves them into contracts/results.py.
_NOT_BACKEND_CHECKS: set[str] = set()  # every verb is held to it


@pytest.mark.parametrize("path", sorted(p for p in VERBS.glob("*.py") if p.name not in _NOT_BACKEND_CHECKS),
                         ids=lambda p: p.name)
def test_no_verb_asks_which_backend_it_has(path):
    pattern = re.compile(r"isinstance|backend\.name ==|getattr\(backend|hasattr\(backend|\.infra ==")
    hits = [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


def test_neither_the_registry_nor_the_lifecycle_names_a_concrete_backend():
    for rel in ("launcher/registry.py", "launcher/lifecycle.py", "launcher/plan.py"):
        text = (REPO / rel).read_text()
        concrete = {m for m in _imports(REPO / rel) if m.startswith(CONCRETE)}
        assert not concrete, (rel, concrete)
        # a backend's own handles are read only by that backend
        assert not re.search(r"SkyPilot cluster|backend_state\.get\(|backend_state\[", text), rel


# --- acceptance 2: estimate and up --dryrun print the same config, data and caps -----------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    rows = tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps(dict(ROW, study_id=f"s{i % 5}")) + "\n" for i in range(30)))
    # the dry run's SkyPilot part through the adapter fake (no API server); the estimate reads the seeded catalog
    e = fakesky_env(tmp)
    return e, rows, tmp


INFRAS = {"local": ["--infra", "local"], "ssh": ["--infra", "ssh://me@127.0.0.1:1"], "sky": ["--infra", "sky"]}
# name -> (flags, infras it applies to); "{rows}" is a local .jsonl written by the fixture
FLAG_SETS = {
    "defaults": ([], ("local", "ssh", "sky")),
    "subset": (["--subset", "0.25"], ("local", "ssh", "sky")),
    "synthetic+hours": (["--data", "synthetic:40", "--subset", "0.5", "--max-hours", "2.5"], ("local", "ssh", "sky")),
    "file+eval": (["--data", "{rows}", "--eval-rows", "5", "--model", "org/other-model"], ("local", "ssh", "sky")),
    "config+no-eval": (["--config", "configs/smoke.yaml", "--no-eval", "--max-hours", "1"], ("local", "ssh", "sky")),
    "paper-locally": (["--config", "configs/paper.yaml", "--subset", "0.01"], ("local",)),
    "cost-cap": (["--gpu", "A100:1", "--subset", "0.01", "--max-cost", "500", "--max-hours", "300"], ("sky",)),
}
CASES = [(infra, name) for name, (_, infras) in FLAG_SETS.items() for infra in infras]


def _plan_lines(stdout: str) -> dict[str, str]:
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"(config|data|caps):\s+(.*)$", line)
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2).strip()
    return found


def _expected(infra: str, flags: list[str]) -> dict[str, str]:
    """What the flags must resolve to, worked out here from the flags and the config files."""
    opt, rest = {}, list(flags)
    while rest:
        flag = rest.pop(0)
        opt[flag] = rest.pop(0) if rest and not rest[0].startswith("--") else True
    config = opt.get("--config") or ("configs/smoke.yaml" if infra == "local" else "configs/paper.yaml")
    doc = yaml.safe_load((REPO / config).read_text())
    if "--config" not in opt:  # the default: the packaged copy (launcher/resources links to configs/), wherever the cwd
        config = str(REPO / "launcher" / "resources" / config)
    data = opt.get("--data") or doc["data"]["source"]
    if data.startswith("/"):
        data = str(Path(data).resolve())
    subset = float(opt.get("--subset", doc["data"].get("subset", 1.0)))
    cost = f"${float(opt['--max-cost']):,.2f}" if "--max-cost" in opt else "none"
    hours = f"{float(opt['--max-hours']):g} h" if "--max-hours" in opt else "none"
    return {"config": config, "data": f"{data} (subset {subset:g})", "caps": f"max cost {cost}, max hours {hours}",
            "model": opt.get("--model") or doc["model"]["id"]}


@pytest.mark.slow
@pytest.mark.parametrize("infra,name", CASES, ids=[f"{i}-{n}" for i, n in CASES])
def test_estimate_and_up_dryrun_print_the_same_config_data_and_caps(env, infra, name):
    e, rows, tmp = env
    flags = [f.replace("{rows}", str(rows)) for f in FLAG_SETS[name][0]]
    argv = INFRAS[infra] + flags
    est = cli(["estimate", *argv, "--explain"], e, timeout=300)
    up = cli(["up", *argv, "--dryrun"], e, timeout=300)
    assert est.returncode == 0, est.stdout[-2000:] + est.stderr[-2000:]
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    a, b = _plan_lines(est.stdout), _plan_lines(up.stdout)
    assert set(a) == {"config", "data", "caps"}, est.stdout[-3000:]
    assert a == b, (a, b)
    want = _expected(infra, flags)
    assert a["config"].startswith(want["config"] + " ") and f"model {want['model']}," in a["config"], (a, want)
    assert a["data"] == want["data"] and a["caps"] == want["caps"], (a, want)
    # The dry run's task carries the very config the digest was taken of: the job would run what was estimated.
    assert not (tmp / "runs").exists() or not any((tmp / "runs").iterdir())  # neither verb created a run


def test_estimate_json_carries_the_same_plan(env):
    e, rows, _ = env
    argv = ["--infra", "local", "--data", str(rows), "--subset", "0.5", "--max-hours", "3"]
    est = cli(["estimate", *argv, "--json"], e, timeout=300)
    assert est.returncode == 0, est.stderr[-2000:]
    plan = json.loads(est.stdout)["plan"]
    text = _plan_lines(cli(["estimate", *argv, "--explain"], e, timeout=300).stdout)
    assert plan["config"]["file"] == str(REPO / "launcher" / "resources" / "configs" / "smoke.yaml") and plan["data"] == {"source": str(rows.resolve()), "subset": 0.5}
    assert plan["caps"] == {"max_cost": None, "max_hours": 3.0}
    assert f"resolved config sha256 {plan['config']['sha256']}" in text["config"]


def test_the_local_default_config_is_the_same_for_both_and_help_says_so():
    for verb in ("up", "estimate"):
        r = cli([verb, "--help"], launcher_env(Path("/nonexistent-runs")))
        assert r.returncode == 0, r.stderr
        assert re.search(r"configs/smoke\.yaml\s+with\s+--infra\s+local", r.stdout), (verb, r.stdout)


def test_status_shows_the_handles_that_find_the_machine_again(tmp_path, monkeypatch):
    """Backend.handles: what status prints to find the machine by hand (here a local run's folder and
    process group, written into its record as a launcher would have)."""
    from launcher import registry

    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    run = registry.new_run("handles", "local", config={})
    workdir = tmp_path / f"socrates-{run.id}-gone"
    run.transition("provisioning", machine="up", backend_state={"workdir": str(workdir), "pgid": 4194000,
                                                                 "other": "not a handle"})
    r = cli(["status", run.id], launcher_env(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    machine = next(line for line in r.stdout.splitlines() if line.startswith("machine:"))
    assert f"workdir {workdir}" in machine and "pgid 4194000" in machine and "not a handle" not in machine, machine
