"""The launcher's front door: bad input is one line + exit 2 with nothing created, `--help` is fast
and imports neither torch nor sky, the registry's state machine, GPU parsing, secret redaction."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contracts.errors import ContractError
from launcher import registry
from launcher.gpu import GpuSpec, parse_gpu
from launcher.secrets import redact
from launcher_helpers import CANARY, REPO, cli, cli_here, launcher_env


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  global_batch: eight\n")
    return path


BAD_INPUTS = [
    (["up", "--infra", "local", "--gpu", "A100:0"], "A100:0"),
    (["up", "--gpu", "X100:1"], "X100"),
    (["up", "--infra", "local", "--subset", "0"], "0"),
    (["up", "--infra", "local", "--subset", "1.5"], "1.5"),
    (["up", "--infra", "local", "--config", "configs/nope.yaml"], "nope.yaml"),
    (["up", "--infra", "local", "--config", "BAD"], "global_batch"),
    (["up", "--infra", "moon"], "moon"),
    (["up", "--infra", "local", "--data", "./missing.jsonl"], "missing.jsonl"),
    (["up", "--infra", "local", "--max-cost", "-1"], "-1"),
    (["up", "--infra", "local", "--spot"], "--spot"),
    (["up", "--infra", "local", "--eval-rows", "0"], "--eval-rows"),
    (["up", "--infra", "local", "--name", "no spaces"], "no spaces"),
    (["status", "no-such-run"], "no-such-run"),
    (["logs", "no-such-run"], "no-such-run"),
    (["down", "no-such-run"], "no-such-run"),
    (["download", "no-such-run"], "no-such-run"),
    (["down", "../escape"], "../escape"),
    (["down", ""], "empty run id"),  # never "the latest run": down "$UNSET" must not end one
    (["up", "--infra", "local", "--gpu", "A100:"], "A100:"),
    (["up", "--gpu", ""], "--gpu ''"),
    (["up", "--infra", "local", "--max-hours", "1e16"], "--max-hours 1e+16"),  # overflowed the remote arithmetic
    (["up", "--infra", "local", "--max-hours", "1e308"], "--max-hours 1e+308"),
    (["up", "--infra", "local", "--no-eval", "--eval-rows", "5"], "--no-eval"),
    (["up", "--infra", "local", "--no-eval", "--eval-base"], "--no-eval"),
    (["estimate", "--infra", "bogus"], "bogus"),
    (["estimate", "--infra", "local", "--spot"], "--spot"),
    (["estimate", "--no-eval", "--eval-rows", "5"], "--no-eval"),
]


@pytest.mark.parametrize("argv,named", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(argv, named, tmp_path, bad_config, capsys, monkeypatch):
    """In this process (cli_here); the entry point as a process: test_bad_input_launches_no_local_machine."""
    argv = [str(bad_config) if a == "BAD" else a for a in argv]
    runs = tmp_path / "runs"
    r = cli_here(argv, runs, capsys, monkeypatch, cwd=tmp_path if "--config" not in argv else REPO, HF_TOKEN=CANARY)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert named in lines[0] and "Traceback" not in lines[0]
    assert not runs.exists()


def test_bad_input_launches_no_local_machine(tmp_path):
    machines = tmp_path / "tmp"  # the local backend's 'machines' are temp dirs (TMPDIR)
    machines.mkdir()
    for argv in (["--subset", "1.5"], ["--gpu", "A100:0"], ["--max-hours", "0"]):
        r = cli(["up", "--infra", "local", "--yes", *argv], launcher_env(tmp_path / "runs", TMPDIR=str(machines)))
        assert r.returncode == 2
    assert list(machines.iterdir()) == [] and not (tmp_path / "runs").exists()


def test_help_is_fast_and_imports_neither_torch_nor_sky():
    code = ("import sys, time; t = time.perf_counter(); from launcher.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(round(time.perf_counter() - t, 3), 'torch' in sys.modules, 'sky' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed, torch_loaded, sky_loaded = r.stdout.split()[-3:]
    assert torch_loaded == "False" and sky_loaded == "False"
    assert float(elapsed) < 0.3, elapsed
    # The whole process too, interpreter start included, as a user types it.
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "launcher", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "up" in r.stdout
    assert time.perf_counter() - t < 1.0


def test_up_help_imports_neither_torch_nor_sky():
    code = ("import sys\nfrom launcher.cli import main\ntry:\n    main(['up', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'sky' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.stdout.split()[-2:] == ["False", "False"], r.stdout[-500:]
    assert "--max-cost" in r.stdout


@pytest.mark.parametrize("text,expected", [("A100:1", GpuSpec("A100", 1)), ("a100-80gb:2", GpuSpec("A100-80GB", 2)),
                                           ("H100", GpuSpec("H100", 1))])
def test_parse_gpu_accepts(text, expected):
    assert parse_gpu(text) == expected


@pytest.mark.parametrize("text", ["A100:0", "X100:1", "A100:nine", "A100:9", ""])
def test_parse_gpu_refuses(text):
    with pytest.raises(ContractError, match="accepted"):
        parse_gpu(text)


def test_registry_transitions_are_checked_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    run = registry.new_run("demo", "local")
    assert registry.load(run.id).state == "created"
    with pytest.raises(ValueError, match="created -> done"):
        run.transition("done")
    run.transition("provisioning").transition("running").transition("downloading").transition("done")
    on_disk = json.loads(run.path.read_text())
    assert on_disk["state"] == "done"
    assert [h["state"] for h in on_disk["history"]] == ["created", "provisioning", "running", "downloading", "done"]
    assert not list(run.dir.glob(".run.json.*"))  # no temp file left behind
    with pytest.raises(ValueError):
        run.transition("running")
    assert registry.resolve(None).id == run.id


def test_registry_refuses_bad_and_missing_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCRATES_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(ContractError, match="no such run"):
        registry.load("nope")
    with pytest.raises(ContractError, match="not a run id"):
        registry.load("../x")
    with pytest.raises(ContractError, match="no runs"):
        registry.resolve(None)
    assert not (tmp_path / "runs").exists()


def test_redact_removes_secret_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    assert CANARY not in redact(f"token={CANARY} and again {CANARY}")
    assert redact("nothing secret") == "nothing secret"


def _step(step: int, total: int = 10) -> dict:
    from contracts.events import make

    return make("step", step=step, total_steps=total, epoch=step / total, loss=1.5 / step, lr=1e-4,
                tokens_per_s=2345.0, gpu_mem_gib=9.5, eta_s=(total - step) * 60.0)


def test_progress_bar_on_a_terminal_shows_step_loss_speed_eta_and_dollars():
    import io

    from rich.console import Console

    from contracts.events import make
    from launcher.progress import Progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160)
    progress = Progress(console, price_per_hour=3.6, started_at=time.time() - 1000)  # 1000 s at $3.60/h = $1.00
    progress.on_event(make("phase", phase="provisioning"))
    for step in (1, 2, 3):
        progress.on_event(_step(step))
    progress.close()
    out = buf.getvalue()
    assert progress.plain is False
    assert "provisioning" in out and "3/10" in out and "loss 0.5" in out and "2345 tok/s" in out
    assert "ETA 7m00s" in out and "$1.00 so far" in out


def test_progress_plain_lines_when_not_a_terminal():
    import io

    from rich.console import Console

    from launcher.progress import Progress

    buf = io.StringIO()
    progress = Progress(Console(file=buf, width=160))
    progress.on_event(_step(4))
    assert progress.plain is True
    assert buf.getvalue().strip() == "step 4/10  loss 0.375  2345 tok/s  ETA 6m00s"


def test_rendered_task_mounts_local_data_and_runs_the_same_block_everywhere(tmp_path, monkeypatch):
    import yaml

    from contracts.config import load_config
    from launcher import task as tasklib

    monkeypatch.setenv("HF_TOKEN", CANARY)
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    cfg = load_config(REPO / "configs" / "paper.yaml").with_overrides(
        {"data.source": str(data), "data.subset": 0.1, "eval.enabled": False, "eval.base": True})
    run = registry.Run(id="r", dir=tmp_path, config=cfg.to_dict(), options={})
    conf = tasklib.render(run, gpu="H100:2", cloud="runpod", spot=True, data_path=data, secret_names=("HF_TOKEN",))
    text = tasklib.to_yaml(conf)
    assert CANARY not in text and yaml.safe_load(text) == conf
    assert conf["file_mounts"] == {"/tmp/socrates-data/rows.jsonl": str(data)}
    assert conf["envs"]["DATA"] == "/tmp/socrates-data/rows.jsonl"
    assert conf["resources"]["accelerators"] == "H100:2" and conf["resources"]["use_spot"] is True
    assert conf["resources"]["infra"] == "runpod" and conf["secrets"] == {"HF_TOKEN": None}
    assert yaml.safe_load(conf["envs"]["CONFIG_YAML"]) == cfg.to_dict()
    # Non-sky backends run exactly the template's run block, its envs exported in front.
    script = tasklib.run_script(conf, JOB_PYTHON="/usr/bin/python3")
    assert script.endswith(tasklib.load_template()["run"])
    assert "export JOB_PYTHON=/usr/bin/python3" in script and CANARY not in script


def test_sky_log_chunks_become_whole_lines_and_events():
    from contracts.events import LINE_PREFIX, dumps, make, parse_line
    from launcher.sky_adapter import join_lines

    ev = LINE_PREFIX + dumps(make("log", message="hello"))
    chunks = ["(task, pid=7) first\n(task, pid=7) " + ev[:10], ev[10:] + "\nlast", None]
    lines = list(join_lines(iter(chunks)))
    assert lines[0] == "(task, pid=7) first" and lines[2] == "last"
    assert parse_line(lines[1])["message"] == "hello"
    # A stream that drops mid-line yields no partial line (the reconnect re-reads it whole).
    assert list(join_lines(iter(["a\nb"]))) == ["a"]


def test_a_cap_that_leaves_the_job_no_time_is_refused_not_dropped(tmp_path):
    """--max-hours 0.0001 used to round to DEADLINE_S 0, which means no deadline at all."""
    runs = tmp_path / "runs"
    r = cli(["up", "--infra", "local", "--max-hours", "0.0001", "--yes"], launcher_env(runs))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert "--max-hours 0.0001: leaves the job 0 s of machine time" in r.stderr and not runs.exists()


@pytest.mark.parametrize("name,content,named", [
    ("empty.jsonl", b"", "no rows"),
    ("blank.jsonl", b"\n  \n", "no rows"),
    ("latin1.jsonl", b'{"a": "\xe9"}\n', "line 1 is not UTF-8"),
    ("list.jsonl", b'{"study_id": "s", "response": 1, "condition_num": 0, "task_num": 0, "prompt": "q"}\n[1]\n',
     "line 2 is a list"),
    ("broken.jsonl", b'{"a": 1\n', "line 1 is not JSON"),
    ("damaged.parquet", b"PAR1 not really", "not a readable parquet file"),
])
def test_local_data_of_the_wrong_shape_is_refused_before_a_machine_is_paid_for(tmp_path, name, content, named):
    data = tmp_path / name
    data.write_bytes(content)
    runs = tmp_path / "runs"
    for argv in (["up", "--infra", "local", "--yes"], ["up", "--gpu", "A100:1", "--dryrun"], ["estimate"]):
        r = cli([*argv, "--data", str(data)], launcher_env(runs))
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and named in lines[0] and str(data) in lines[0], (argv, lines)
    assert not runs.exists()
