"""`socrates-launch predict` on CPU with the smoke model, in its three forms, and its input checks.

The launcher runs the real `python -m job predict` subprocess; these tests go through the CLI as a
user would (a process, stdin for --interactive)."""
import os
import subprocess
import sys

import pytest

from contracts.config import load_config
from conftest import REPO, one_line, random_adapter, run_cli

SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prepared test split and a random-weight LoRA adapter on the smoke base."""
    from job.prepare import prepare

    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(SMOKE)
    prepare("synthetic:120", root / "data", cfg=cfg)
    random_adapter(cfg, root / "adapter")
    return root


def cli(args, stdin=None, module="launcher"):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return run_cli(["predict", *args], env, module=module, input=stdin, timeout=300)


def _bars(out: str) -> dict[str, float]:
    """answer -> percent from the rendered bar chart."""
    bars = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[1].endswith("%"):
            bars[parts[0]] = float(parts[1].rstrip("%"))
    return bars


@pytest.mark.slow
def test_profile_and_scenario(setup):
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--demographics",
             "Age: 25; Gender: Female; Education: Bachelor's",
             "--scenario", "Do you support increasing minimum wage? (1-7 scale)"])
    assert r.returncode == 0, r.stderr
    bars = _bars(r.stdout)
    assert list(bars) == [str(v) for v in range(1, 8)]
    assert sum(bars.values()) == pytest.approx(100, abs=0.5)
    assert "sampled answer:" in r.stdout


@pytest.mark.slow
def test_example_shows_the_human_answer(setup):
    import json

    row = json.loads((setup / "data" / "test.jsonl").read_text().splitlines()[2])
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--example", "2", "--data", str(setup / "data")])
    assert r.returncode == 0, r.stderr
    assert f"human answer (test row 2): {row['response']}" in r.stdout
    assert len(_bars(r.stdout)) >= 2


@pytest.mark.slow
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
    (["--seed", "99999999999999999999999", "--demographics", "Age: 25", "--scenario", "Q? (1-7 scale)"],
     "--seed 99999999999999999999999: not accepted (a whole number from 0 to 4294967295)"),
    (["--seed", "-1", "--demographics", "Age: 25", "--scenario", "Q? (1-7 scale)"], "--seed -1: not accepted"),
    (["--python", "/nonexistent/python", "--demographics", "Age: 25", "--scenario", "Q? (1-7 scale)"],
     "--python /nonexistent/python: no such executable"),
    (["--python", "/nonexistent/python", "--interactive"], "--python /nonexistent/python: no such executable"),
])
def test_bad_input_exit_2_one_line_before_any_model(setup, args, needle):
    r = cli(["--adapter", str(setup / "adapter"), *args])
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name,content,needle", [
    ("bad.yaml", b"\xff\xfe model: {}\n", "not UTF-8 text (byte b'\\xff' at offset 0)"),
    ("bad.json", b'{"seed": "x", "learning_rate": 1e-4}', "train.seed: 'x' is not accepted"),
    ("bad.json", b'{"seed": 99999999999999999999999}', "is not accepted (a whole number in 0..4294967295)"),
    ("bad.json", b'{"seed": ', "not valid json"),
])
def test_bad_config_is_refused_by_the_launcher(setup, tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(tmp_path / name), "--python", "/bin/false",
             "--demographics", "Age: 25", "--scenario", "Q? (1-7 scale)"])  # /bin/false: the job never starts
    one_line(r, needle)


def test_python_that_cannot_be_run_is_exit_2(setup, tmp_path):
    (tmp_path / "python").write_bytes(b"\xff\xfe not a program")
    (tmp_path / "python").chmod(0o755)
    r = cli(["--adapter", str(setup / "adapter"), "--python", str(tmp_path / "python"),
             "--demographics", "Age: 25", "--scenario", "Q? (1-7 scale)"])
    one_line(r, f"--python {tmp_path / 'python'}: cannot be run")


@pytest.fixture()
def broken(setup, tmp_path):
    """Adapter folders that are not usable: missing, empty, a bad adapter_config.json, a bad manifest beside."""
    import shutil

    (tmp_path / "empty").mkdir()
    (tmp_path / "badac").mkdir()
    (tmp_path / "badac" / "adapter_config.json").write_text("{oops")
    (tmp_path / "listac").mkdir()
    (tmp_path / "listac" / "adapter_config.json").write_text("[1]")
    shutil.copytree(setup / "adapter", tmp_path / "run" / "adapter")
    (tmp_path / "run" / "manifest.json").write_text('{"config": ')
    shutil.copytree(setup / "adapter", tmp_path / "run2" / "adapter")
    (tmp_path / "run2" / "manifest.json").write_text('{"config": 5}')
    return tmp_path


@pytest.mark.parametrize("adapter,needle", [
    ("nonexistent", "nonexistent: no such folder (give an adapter folder"),
    ("empty", "empty: no adapter_config.json there"),
    ("badac", "badac/adapter_config.json: not valid JSON (Expecting property name"),
    ("listac", "listac/adapter_config.json: a JSON list is not accepted (expected a JSON object)"),
    ("run/adapter", "run/manifest.json: not valid JSON"),
    ("run2/adapter", "run2/manifest.json: 'config' is not accepted (a JSON object"),
])
@pytest.mark.parametrize("module", ["job", "launcher"])
def test_unusable_adapter_is_one_line_before_any_model(broken, adapter, needle, module):
    """Refused up front: no fetch of the default 14B base, no JSONDecodeError traceback."""
    if module == "launcher" and adapter in ("nonexistent", "empty"):
        needle = "no adapter_config.json there"  # the launcher's own check, already there
    args = ["--adapter", str(broken / adapter), "--scenario", "Q? (1-7 scale)"]
    args += ["--demographics", "Age: 25"] if module == "launcher" else []
    one_line(cli(args, module=module), needle)


def test_job_refuses_a_seed_out_of_range(setup):
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--seed", str(2**32), "--scenario",
             "Q? (1-7 scale)"], module="job")
    one_line(r, f"--seed {2**32}: not accepted (a whole number from 0 to 4294967295)")


@pytest.mark.slow
def test_job_stdin_answers_each_line_and_survives_bad_ones(setup):
    """Each bad --stdin line gets an error line; the loop goes on to the good one at the end."""
    import json

    bad = ['"str"', "[1]", '{"scenario": 5}', '{"example": true}', "not json", '{"profile": [1], "scenario": "Q (1-5)"}',
           '{"foo": 1}', '{"example": 1.5}', '{"example": -1}']
    stdin = "\n".join(bad + ['{"profile": {"age": 30}, "scenario": "Q? (1-5 scale)"}', '{"example": 0}']) + "\n"
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--data", str(setup / "data"), "--stdin"],
            stdin=stdin, module="job")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("@@socrates-predict ")]
    assert len(results) == len(bad) + 2
    errors = [res.get("error") for res in results[:len(bad)]]
    assert all(errors), errors
    assert "a JSON str is not accepted" in errors[0] and "a JSON list is not accepted" in errors[1]
    assert errors[2].startswith("scenario 5: not accepted (text")
    assert errors[3].startswith("--example true: not accepted (a row number")
    assert "not JSON" in errors[4] and errors[5].startswith("profile [1]: not accepted")
    assert errors[6].startswith("query key 'foo': not accepted (accepted: profile, scenario, example)")
    assert errors[7].startswith("--example 1.5: not accepted") and errors[8].startswith("--example -1: not accepted")
    assert results[-2]["scale"] == [1, 5] and results[-1]["example"] == 0


def test_missing_adapter_is_exit_2(tmp_path):
    r = cli(["--adapter", str(tmp_path), "--demographics", "Age: 25", "--scenario", "Q? (1-7 scale)"])
    assert r.returncode == 2 and "no adapter_config.json" in r.stderr


def test_example_out_of_range_comes_back_as_exit_2(setup):
    r = cli(["--adapter", str(setup / "adapter"), "--config", str(SMOKE), "--example", "100000", "--data", str(setup / "data")])
    assert r.returncode == 2 and "--example 100000: not accepted" in r.stderr


def test_launcher_predict_never_imports_torch():
    code = ("import sys, launcher.verbs.predict, launcher.verbs.report; "
            "sys.exit(1 if 'torch' in sys.modules or 'job' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
