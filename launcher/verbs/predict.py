"""`socrates-launch predict`: how would a person like this answer this question?

Validates the demographics and the scenario here (exit 2, one line), then runs `python -m job predict`
as a subprocess (the launcher never imports torch) and renders its result line (contracts/results.py; a
malformed one is refused, never rendered): the predicted distribution as a text bar chart, and one
sampled answer. `--interactive` keeps one job process (the model loaded once) and asks in a loop;
`--example N` takes row N of a prepared test split and shows the human answer.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from contracts.config import SEED_MAX, load_config
from contracts.errors import ContractError
from contracts.results import parse_predict_line
from contracts.scale import parse_scale
from launcher import REPO_ROOT

FIELDS = ("age", "gender", "education", "employment", "ethnicity", "income", "party_id", "ideology",
          "location", "marital_status", "household_size", "housing_ownership", "housing_type",
          "metro_status", "internet_access", "phone_service")
INT_FIELDS = ("age", "household_size")
EXPECTED = ('"Field: value; Field: value", e.g. "Age: 25; Gender: Female; Education: Bachelor\'s" '
            f"(fields: {', '.join(f.replace('_', ' ').title() for f in FIELDS)})")
BAR_WIDTH = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="LoRA adapter folder (e.g. runs/<id>/adapter)")
    p.add_argument("--base-model", default=None, help="base model id or local path (default: the run's)")
    p.add_argument("--config", default=None, help="run config (default: the run's manifest beside the adapter)")
    p.add_argument("--demographics", default=None, help='e.g. "Age: 25; Gender: Female; Education: Bachelor\'s"')
    p.add_argument("--scenario", default=None, help='the question with its scale, e.g. "Do you support '
                   'increasing minimum wage? (1-7 scale)"')
    p.add_argument("--example", type=int, default=None, help="row N of --data's test split, human answer shown")
    p.add_argument("--data", default=None, help="a prepared data folder with test.jsonl (for --example)")
    p.add_argument("--interactive", action="store_true", help="ask for demographics and scenario in a loop")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled answer")
    p.add_argument("--python", default=sys.executable, help="python with the job's packages (default: this one)")


def run(args: argparse.Namespace) -> int:
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ContractError(f"--adapter {adapter}: no adapter_config.json there (give the adapter folder a run brought home)")
    if not 0 <= args.seed <= SEED_MAX:
        raise ContractError(f"--seed {args.seed}: not accepted (a whole number from 0 to {SEED_MAX})")
    if args.config:
        load_config(args.config)  # a bad config is one line here, not a job traceback
    python = shutil.which(args.python)
    if python is None:
        raise ContractError(f"--python {args.python}: no such executable (give a python that has the job's "
                            "packages: torch, transformers, peft)")
    cmd = [python, "-m", "job", "predict", "--adapter", str(adapter.resolve()), "--seed", str(args.seed)]
    for flag, value in (("--config", args.config), ("--base-model", args.base_model)):
        if value:
            cmd += [flag, str(Path(value).resolve()) if flag == "--config" else value]
    if args.data:
        if not (Path(args.data) / "test.jsonl").is_file():
            raise ContractError(f"--data {args.data}: no test.jsonl (a folder `python -m job prepare` wrote)")
        cmd += ["--data", str(Path(args.data).resolve())]
    if args.interactive:
        _say_loading(args, adapter)
        return _interactive(cmd + ["--stdin"], args.python)
    if args.example is not None:
        if not args.data:
            raise ContractError("--example N needs --data DIR (a prepared folder with test.jsonl)")
        cmd += ["--example", str(args.example)]
    else:
        if args.scenario is None:
            raise ContractError("predict: give --scenario (with --demographics), --example N, or --interactive")
        profile = parse_demographics(args.demographics or "")
        check_scenario(args.scenario)
        cmd += ["--profile", json.dumps(profile), "--scenario", args.scenario]
    try:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise ContractError(f"--python {args.python}: cannot be run ({e.strerror or e})") from None
    _say_loading(args, adapter)
    stdout, stderr = proc.communicate()
    found = [r for r in map(parse_predict_line, stdout.splitlines()) if r is not None]
    if proc.returncode != 0 or not found:
        return _job_failed(proc.returncode, stderr)
    print(render(found[0]))
    return 0


def _say_loading(args: argparse.Namespace, adapter: Path) -> None:
    """The model loads in the job process before any answer (seconds for the demo's, minutes for a 14B): say so
    to a person waiting at a terminal (in a pipe, bad input stays one line with nothing before it)."""
    if not sys.stderr.isatty():
        return
    base = f"the base model {args.base_model}" if args.base_model else "its base model (named in its config)"
    print(f"predict: loading the adapter {adapter} and {base} with {args.python} -m job predict "
          "(a 14B model takes minutes)...", file=sys.stderr, flush=True)


def parse_demographics(text: str) -> dict:
    """"Age: 25; Gender: Female" -> {"age": 25, "gender": "Female"}; ContractError when malformed."""
    profile: dict = {}
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise ContractError(f"--demographics {text!r}: expected {EXPECTED}")
    for part in parts:
        key, sep, value = part.partition(":")
        field = re.sub(r"[\s-]+", "_", key.strip().lower())
        if not sep or not value.strip() or field not in FIELDS:
            raise ContractError(f"--demographics: {part!r} is not accepted; expected {EXPECTED}")
        value = value.strip()
        if field in INT_FIELDS:
            if not value.isdigit() or not 0 < int(value) < 130:
                raise ContractError(f"--demographics: {key.strip()} {value!r} is not accepted (a whole number, e.g. 25)")
            value = int(value)
        profile[field] = value
    return profile


def check_scenario(text: str) -> None:
    if not text.strip() or parse_scale(text) is None:  # the job reads the scale with the same parser
        raise ContractError(f"--scenario {text[:60]!r}: states no answer scale; end it with e.g. '(1-7 scale)' "
                            "or 'Only return an integer from 1 to 7'")


def render(result: dict) -> str:
    """The distribution as a text bar chart (wide scales in 10 bins), the sampled and human answers."""
    if "error" in result:
        return f"error: {result['error']}"
    values, probs = result["values"], result["probs"]
    rows: list[tuple[str, float]]
    if len(values) > 21:
        lo, hi = values[0], values[-1]
        step = -(-(hi - lo + 1) // 10)
        rows = [(f"{a}-{min(a + step - 1, hi)}", sum(p for v, p in zip(values, probs) if a <= v < a + step))
                for a in range(lo, hi + 1, step)]
    else:
        rows = [(str(v), p) for v, p in zip(values, probs)]
    top = max(p for _, p in rows) or 1.0
    width = max(len(label) for label, _ in rows)
    lines = [f"predicted distribution over answers {values[0]}..{values[-1]}:"]
    for label, p in rows:
        lines.append(f"  {label:>{width}} {p:6.1%} {'█' * round(BAR_WIDTH * p / top)}")
    mean = sum(v * p for v, p in zip(values, probs))
    lines.append(f"expected answer: {mean:.2f}   (the scale's answers hold {result['valid_mass']:.1%} of the "
                 "model's probability; shown normalized)")
    sample = result.get("sample")
    lines.append(f"sampled answer: {sample if sample is not None else 'none (' + repr(result.get('sample_text')) + ')'}")
    if result.get("human") is not None:
        lines.append(f"human answer (test row {result.get('example')}): {result['human']}")
    return "\n".join(lines)


def _interactive(cmd: list[str], python: str) -> int:
    errlog = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty job can't block on it
    try:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=errlog, text=True, bufsize=1)
    except OSError as e:
        raise ContractError(f"--python {python}: cannot be run ({e.strerror or e})") from None
    print("predict: empty input or Ctrl-D ends. Demographics like \"Age: 25; Gender: Female\"; "
          "the scenario must state its scale, e.g. \"(1-7 scale)\".")
    try:
        while True:
            try:
                demo = input("demographics> ").strip()
                if not demo:
                    break
                scenario = input("scenario> ").strip()
            except EOFError:
                break
            if not scenario:
                break
            try:
                query = {"profile": parse_demographics(demo), "scenario": scenario}
                check_scenario(scenario)
            except ContractError as e:
                print(f"error: {e}")
                continue
            proc.stdin.write(json.dumps(query) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:
                result = parse_predict_line(line)
                if result is not None:
                    print(render(result))
                    break
            else:
                errlog.seek(0)
                return _job_failed(proc.wait(), errlog.read())
    finally:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # ours, by its handle
    return 0


def _job_failed(rc: int | None, stderr: str) -> int:
    lines = [line for line in (stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("job predict:")]
    if rc == 2 and errors:
        raise ContractError(errors[-1].split("error:", 1)[-1].strip())
    tail = "\n".join(lines[-8:])
    print(f"socrates-launch predict: the job failed (exit {rc}):\n{tail}", file=sys.stderr)
    return rc or 1
