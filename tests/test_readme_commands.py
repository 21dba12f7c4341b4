"""Every command the README shows, run in order after the demo (issue #18).

The README's indented command blocks are read from README.md itself, so a command added there and
not handled here fails this test. Each runs as written, with these substitutions, said per command
in HOW below:
- the demo (`make demo` = `up --infra local --config configs/smoke.yaml --yes`) runs the smoke
  config shortened to 2 optimizer steps on 60 synthetic rows (as tests/test_launcher_local.py does);
  every later `configs/smoke.yaml` is that shortened copy, so the split and the adapter match; the
  commands the demo prints under `next:` run right after it, as printed, each in a fresh shell;
- `RUN`, `runs/<id>` become the demo's run id and folder (SOCRATES_RUNS_DIR is a temp folder);
- commands that need a cloud run in their dry/offline form: `up` on SkyPilot with `--dryrun`,
  `estimate` against a seeded offline catalog (tests/skyfix.py), both with a HOME that has no cloud
  credentials; `sky` calls go through tests/fakesky.py for the dry run's optimizer;
- `python -m job ...` placeholders (run_config.yaml, SRC, F, S, N) become the shortened config,
  synthetic:60, 1.0, unseen-studies, 42, in a temp folder;
- `image build`: where no docker daemon answers (CI) it must be refused in one line, exit 2; where one
  does, it is not run (a real build downloads the base image and every wheel: minutes and a
  registry). `image tag [--push REPO]` runs as written (without the optional part), and its tag
  stands in for `lock-<hash>@sha256:...` in the `up --image` example, which runs as a dry run;
- not run: `make test` and `make test-fast` (this suite itself) and the SSH host example (needs a host: tests/test_ssh_e2e.py
  runs that flow against a real sshd).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contracts import manifest
from contracts.events import read_all
from launcher_helpers import CANARY, REPO, assert_machine_gone, fakesky_env, no_secret_anywhere, only_run

PREFIXES = ("socrates-launch ", "make ", "python -m job ")
SKIP = {"make test": "the suite itself", "up --infra ssh://": "needs an SSH host (tests/test_ssh_e2e.py runs it)"}


def readme_commands() -> list[str]:
    """The README's commands in order: indented block lines with one of PREFIXES, continuations
    joined, trailing comments dropped."""
    cmds, cur = [], None
    for line in (REPO / "README.md").read_text().splitlines():
        if cur is not None:
            cur += " " + line.strip()
        elif line.startswith("    ") and line.strip().startswith(PREFIXES):
            cur = line.strip()
        else:
            continue
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        cmds.append(re.sub(r"\s+#.*$", "", cur).strip())
        cur = None
    return cmds


def next_steps(demo_out: str) -> tuple[list[str], list[str]]:
    """(commands, other lines) the demo printed under `next:`, as printed."""
    lines = demo_out.split("\nnext:\n", 1)[1].splitlines()
    steps = [ln.strip() for ln in lines if ln.startswith("  ") and not ln.strip().startswith("#")]
    return steps, [ln.strip() for ln in lines if ln.strip() and ln.strip() not in steps]


def _run_the_next_steps_the_demo_printed(out: str, run_dir: Path, work: Path, env: dict) -> None:
    """Each command the demo's `next:` block printed, as printed, in a fresh shell. From a scratch folder
    (the prepare step writes prepared/ where it runs): with the venv on PATH the demo prints no path
    relative to the repository, so the folder changes nothing else."""
    assert "not meaningful" in out and "0.151" in out, out[-3000:]  # the tiny model's scores, the paper's
    steps, other = next_steps(out)
    assert f"# the report, to open in a browser: {run_dir / 'eval' / 'report.html'}" in other
    assert (run_dir / "eval" / "report.html").is_file()
    kinds = [next((k for k in ("report", "prepare", "predict", "runs") if f" {k} " in f" {s} "), s) for s in steps]
    assert kinds == ["report", "prepare", "predict", "runs"], steps
    for step in steps:
        r = subprocess.run(["bash", "-c", step], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        got = r.stdout + r.stderr
        assert r.returncode == 0 and "Traceback" not in got, f"the demo printed {step!r}; it failed:\n{got[-3000:]}"
        if " predict " in step:
            assert "human answer (test row 3)" in got, got[-2000:]
        if " report " in step:
            assert f"run {run_dir.name}" in got and str(run_dir / "eval" / "report.html") in got, got


def _the_demo_ran_the_real_job(rec: dict, runs: Path) -> None:
    """`make demo`'s path with the real job (the smoke config: synthetic data, tiny Qwen2, real NF4 on CPU,
    shortened to 2 steps): verified, its steps and evaluation in the events, the local machine gone, the
    secret (HF_TOKEN) in no file of the run."""
    run_dir = Path(rec["dir"])
    assert rec["state"] == "done" and rec["verified"] and rec["exit_code"] == 0
    assert manifest.verify(run_dir) == []
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    events = read_all(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    assert any(e["event"] == "eval" for e in events)
    assert_machine_gone(rec)
    no_secret_anywhere(runs)


@pytest.mark.slow
def test_the_readme_commands_run_in_order_after_the_demo(tmp_path):
    pytest.importorskip("sky", reason="skypilot is not installed (estimate reads its catalog)")
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["train"]["max_steps"] = 2
    cfg["data"]["source"] = "synthetic:60"
    cfg["eval"]["rows"] = 4
    smoke = tmp_path / "smoke-short.yaml"
    smoke.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    runs = tmp_path / "runs"
    env = fakesky_env(tmp_path, HF_TOKEN=CANARY)  # a price catalog, no cloud credentials, nothing fetched
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # socrates-launch

    demo = "socrates-launch up --infra local --config configs/smoke.yaml --yes"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t\$\(VENV\)/bin/" + re.escape(demo) + "$", makefile, re.M), \
        "make demo no longer runs the README's demo command"
    commands = readme_commands()
    assert demo in commands and commands.index(demo) > commands.index("make demo")
    ran: list[str] = []
    passed_over: list[str] = []  # said in the docstring: the demo shown twice, SKIP, image build with a daemon
    run_dir = run_id = None
    image_tag = None  # what `image tag` printed: lock-<12 hex>
    daemon = subprocess.run(["docker", "info"], capture_output=True).returncode == 0 if shutil.which("docker") else False
    for cmd in commands:
        if cmd == "make demo" or cmd == demo:
            if run_id is not None:
                passed_over.append(cmd)
                continue  # the same command, shown twice: the demo ran once
            cmd = demo
        if any(key in cmd for key in SKIP):
            passed_over.append(cmd)
            continue
        if run_id is None and cmd != demo and ("[RUN]" in cmd or "<id>" in cmd or cmd.startswith(
                ("socrates-launch runs", "socrates-launch logs", "socrates-launch report", "socrates-launch predict"))):
            pytest.fail(f"README shows {cmd!r} before the demo made a run")
        expect = (0,)
        if cmd.startswith("socrates-launch image build"):
            if daemon:
                continue  # not built in the suite (see the docstring)
            expect = (2,)
        line = cmd.replace("configs/smoke.yaml", str(smoke)).replace(" [--push REPO]", "")
        if "lock-<hash>@sha256:..." in line:
            assert image_tag, "README shows `up --image ...lock-<hash>` before `image tag`"
            line = line.replace("lock-<hash>@sha256:...", image_tag)
        if run_id is not None:
            line = line.replace("runs/<id>", str(run_dir)).replace("[RUN]", run_id)
        if cmd.startswith("socrates-launch up") and "--infra local" not in cmd and "--dryrun" not in cmd:
            line += " --dryrun"  # a cloud launch, in its dry form
        if cmd.startswith("python -m job"):
            line = (line.replace("run_config.yaml", str(smoke)).replace("SRC", "synthetic:60")
                    .replace("--subset F", "--subset 1.0").replace("--split S", "--split unseen-studies")
                    .replace("--seed N", "--seed 42"))
        line = line.replace("[--explain] [--json]", "--explain")
        argv = shlex.split(line)
        if argv[0] == "python":
            argv[0] = sys.executable
        stdin = "" if "--interactive" in argv else None  # the prompt loop ends at end of input
        r = subprocess.run(argv, cwd=work if argv[0] == sys.executable or "prepared" in line else REPO, env=env,
                           capture_output=True, text=True, timeout=900, input=stdin)
        out = r.stdout + r.stderr
        assert r.returncode in expect, f"README command failed ({r.returncode}): {cmd}\nran: {line}\n{out[-3000:]}"
        assert "Traceback" not in out and "<sky-payload>" not in out, f"{cmd}\n{out[-3000:]}"
        if expect == (2,):
            assert len(out.strip().splitlines()) == 1 and "docker" in out, out[-2000:]
        if cmd.startswith("socrates-launch image tag"):
            image_tag = r.stdout.strip().rsplit(":", 1)[-1]
        if cmd == demo:
            rec = only_run(runs)
            run_dir, run_id = Path(rec["dir"]), rec["id"]
            latest_id = run_id
            _the_demo_ran_the_real_job(rec, runs)
            _run_the_next_steps_the_demo_printed(r.stdout, run_dir, work, env)
        if cmd.startswith("socrates-launch up --infra local") and cmd != demo:  # another local run (--ranks 2)
            recs = [json.loads(p.read_text()) for p in runs.glob("*/run.json")]
            newest = max(recs, key=lambda rec: rec["created_at"])
            assert newest["id"] != run_id and newest["state"] == "done" and newest["verified"], newest
            latest_id = newest["id"]
        if "report --json" in cmd:  # RUN left out: the latest run, named by its id
            assert json.loads(r.stdout)["run"] == latest_id
        if "--example" in cmd:
            assert "human" in out.lower(), out[-2000:]
        ran.append(cmd)
    assert len(ran) + len(passed_over) == len(commands), (ran, passed_over)
    kinds = {"demo": [c for c in passed_over if c in ("make demo", demo)],
             "skip": [c for c in passed_over if any(key in c for key in SKIP)],
             "image build": [c for c in passed_over if c.startswith("socrates-launch image build")]}
    assert sum(map(len, kinds.values())) == len(passed_over) and len(kinds["demo"]) <= 1 \
        and len(kinds["image build"]) <= 1, kinds
