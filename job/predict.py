"""`python -m job predict`: how would this person answer this question? The model's exact
distribution over the scale's answers (job/scoring.py's tree scorer) plus one sampled answer.

Called by `socrates-launch predict`, which validates the input and renders the JSON this prints:
one JSON object per query on stdout, on a result line (contracts/results.py: prefix and fields).
With --stdin, queries come one JSON object a line ({"profile": {...}, "scenario": "..."} or {"example": N}) and the
model is loaded once (the launcher's --interactive loop).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from contracts import results
from contracts.config import SEED_MAX, RunConfig, from_dict, load_config
from contracts.errors import ContractError
from contracts.scale import Scale, has_instruction, instruction, parse_scale
from job import data as D
from job import metrics as M
from job.load import load_model
from job.scoring import sample_answers, score_distributions, stated_scale

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (omit with --base)")
    p.add_argument("--base", action="store_true", help="the base model alone, no adapter")
    p.add_argument("--config", default=None, help="run config (default: the adapter's run manifest, "
                   "else the paper config with the adapter's base model)")
    p.add_argument("--base-model", default=None, help="override model.id (a local path or hub id)")
    p.add_argument("--profile", default=None, help='demographics as JSON, e.g. {"age": 25, "gender": "Female"}')
    p.add_argument("--scenario", default=None, help="the question, stating its answer scale")
    p.add_argument("--example", type=int, default=None, help="row N of --data's test.jsonl (shows the human answer)")
    p.add_argument("--data", default=None, help="prepared data folder (for --example)")
    p.add_argument("--stdin", action="store_true", help="read queries as JSON lines from stdin")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled answer")


def run(args: argparse.Namespace) -> int:
    if not args.base and not args.adapter:
        raise ContractError("predict: give --adapter DIR or --base")
    if args.adapter:
        check_adapter(args.adapter)  # before anything is fetched for a base model that would go unused
    if not 0 <= args.seed <= SEED_MAX:
        raise ContractError(f"--seed {args.seed}: not accepted (a whole number from 0 to {SEED_MAX})")
    cfg = resolve_config(args.config, args.adapter, args.base_model)
    query = None if args.stdin else _query_from_args(args)
    test_rows = D.read_split(args.data, "test") if args.data else None
    row = None if args.stdin else to_row(query, test_rows)  # bad input fails before the model loads
    tok, model = load_model(cfg, None if args.base else args.adapter)
    if row is not None:
        _emit(predict(model, tok, cfg, row, args.seed))
        return 0
    for line in sys.stdin:
        if not line.strip():
            continue
        try:  # one bad query must not end the loop: it gets an error line, the next one is read
            row = to_row(parse_query(line), test_rows)
            _emit(predict(model, tok, cfg, row, args.seed))
        except (ContractError, ValueError) as e:
            _emit({"error": (str(e).splitlines() or [type(e).__name__])[0]})
    return 0


def resolve_config(config: str | None, adapter: str | None, base_model: str | None) -> RunConfig:
    """--config; else the run's own config from the manifest beside the adapter; else the defaults."""
    manifest = Path(adapter).parent / "manifest.json" if adapter else None
    run_config = read_json_object(manifest).get("config") if not config and manifest and manifest.is_file() else None
    if config:
        cfg = load_config(config)
    elif run_config is not None:
        if not isinstance(run_config, dict):
            raise ContractError(f"{manifest}: 'config' is not accepted (a JSON object: the run's config)")
        cfg = from_dict(run_config, source=str(manifest))
    else:
        cfg = RunConfig()
        ac = Path(adapter) / "adapter_config.json" if adapter else None
        base = read_json_object(ac).get("base_model_name_or_path") if ac is not None and ac.is_file() else None
        if base:
            cfg = cfg.with_overrides({"model.id": base}, source=str(ac))
    if base_model:
        cfg = cfg.with_overrides({"model.id": base_model}, source="--base-model")
    return cfg


def check_adapter(adapter: str) -> None:
    """A LoRA adapter folder: adapter_config.json there, a JSON object."""
    path = Path(adapter)
    if not path.is_dir():
        raise ContractError(f"--adapter {adapter}: no such folder (give an adapter folder, e.g. runs/<id>/adapter, "
                            "or --base)")
    if not (path / "adapter_config.json").is_file():
        raise ContractError(f"--adapter {adapter}: no adapter_config.json there (give the adapter folder a run "
                            "brought home, e.g. runs/<id>/adapter)")
    read_json_object(path / "adapter_config.json")


def read_json_object(path: Path) -> dict:
    """A JSON object from a file; ContractError (one line naming the file) when it is not one."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ContractError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                            "expected a JSON object") from None
    except ValueError as e:
        raise ContractError(f"{path}: not valid JSON ({str(e).splitlines()[0]}); expected a JSON object") from None
    except OSError as e:
        raise ContractError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(obj, dict):
        raise ContractError(f"{path}: a JSON {type(obj).__name__} is not accepted (expected a JSON object)")
    return obj


QUERY_KEYS = ("profile", "scenario", "example")


def parse_query(line: str) -> dict:
    """One --stdin line: {"profile": {...}, "scenario": "..."} or {"example": N}; ContractError otherwise."""
    shown, shape = line.strip()[:60], '{"profile": {...}, "scenario": "..."} or {"example": N}'
    try:
        query = json.loads(line)
    except ValueError as e:
        raise ContractError(f"query {shown!r}: not JSON ({str(e).splitlines()[0]}); expected {shape}") from None
    if not isinstance(query, dict):
        raise ContractError(f"query {shown!r}: a JSON {type(query).__name__} is not accepted; expected {shape}")
    unknown = [k for k in query if k not in QUERY_KEYS]
    if unknown:
        raise ContractError(f"query key {unknown[0]!r}: not accepted (accepted: {', '.join(QUERY_KEYS)})")
    return query


def _query_from_args(args: argparse.Namespace) -> dict:
    if args.example is not None:
        return {"example": args.example}
    if args.scenario is None:
        raise ContractError("predict: give --scenario TEXT (with --profile JSON), --example N, or --stdin")
    try:
        profile = json.loads(args.profile) if args.profile else {}
    except ValueError:
        raise ContractError(f"--profile {args.profile!r}: not JSON (e.g. '{{\"age\": 25}}')") from None
    return {"profile": profile, "scenario": args.scenario}


def to_row(query: dict, test_rows: list[dict] | None) -> dict:
    """A SocSci210-shaped row for a query: a test row (--example) or a profile + scenario."""
    if "example" in query:
        n = query["example"]
        if test_rows is None:
            raise ContractError("--example needs --data DIR (a prepared folder with test.jsonl)")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(test_rows):
            raise ContractError(f"--example {json.dumps(n)}: not accepted (a row number from 0 to {len(test_rows) - 1})")
        return dict(test_rows[n], _example=n)
    profile, scenario = query.get("profile") or {}, query.get("scenario") or ""
    if not isinstance(profile, dict):
        raise ContractError(f"profile {json.dumps(profile)[:60]}: not accepted (a JSON object of demographic fields)")
    if not isinstance(scenario, str):
        raise ContractError(f"scenario {json.dumps(scenario)[:60]}: not accepted (text: the question, stating its "
                            "answer scale)")
    scale = parse_scale(scenario)
    if scale is None:
        raise ContractError(f"scenario {scenario[:60]!r}: states no answer scale (add e.g. '(1-7 scale)' or "
                            "'Only return an integer from 1 to 7')")
    stimuli = scenario
    if not has_instruction(scenario):  # the training prompts end with this sentence: keep the format
        stimuli = f"{scenario.rstrip()} {instruction(scale)}"
    return {"demographic": profile, "stimuli": stimuli, "study_id": "query", "condition_num": 0, "task_num": 0,
            "response": None}


def predict(model, tok, cfg: RunConfig, row: dict, seed: int = 0) -> dict[str, Any]:
    scale = stated_scale(row)
    if scale is None and row.get("response") is not None:
        scale = Scale(min(int(row["response"]), 0), max(int(row["response"]), 1))
    if scale is None or scale.levels > M.MAX_LEVELS:
        raise ContractError(f"row's answer scale {scale}: not a bounded scale of at most {M.MAX_LEVELS} levels")
    dist = score_distributions(model, tok, [row], [scale], cfg.model.system_prompt)[0]
    sampled = sample_answers(model, tok, [row], cfg, seed=seed)[0]
    return {"scale": [scale.lo, scale.hi], "values": dist.values, "probs": dist.probs, "valid_mass": dist.valid_mass,
            "sample": sampled.value, "sample_text": sampled.text, "human": row.get("response"),
            "example": row.get("_example"), "prompt": D.render_prompt(row), "prompt_tokens": dist.prompt_tokens}


def _emit(obj: dict) -> None:
    print(results.predict_line(obj), flush=True)
