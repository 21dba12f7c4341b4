"""`python -m job evaluate`: the paper's metrics on the test split, and a report.

Two modes (say in every output which one produced a number):
- `sample`: the paper's protocol. One sampled answer per test row from the row's own prompt
  (temperature/top_p/max_new_tokens from the config's eval section), first integer parsed;
  unparseable answers are counted and reported, never silently dropped.
- `distribution`: the model's exact probability for every answer of the row's scale, from one
  batched forward per group of rows (job/scoring.py: the answers as a prefix tree after the prompt).

The model is loaded (and, when it fits, merged dense) by job/load.py.

A model-free baseline (`--baseline uniform`: equal mass on every answer of each cell's scale) loads
no model and writes the same outputs in seconds, under "uniform/distribution".

Each row's answer scale is the one its stimulus states (contracts/scale.py): a cell whose rows state
none is skipped and counted. `--rows`/`eval.rows` keeps whole cells, rounding down to the last whole one.

Results accumulate in OUT/metrics.json under "<base|fine-tuned>/<mode>", so a base run and a
fine-tuned run into the same OUT sit side by side in OUT/report.html; OUT/cells.jsonl is rewritten
from them, one line per cell, so two runs compare cell by cell (both formats: contracts/results.py).
"""
from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from contracts import results
from contracts.config import EVAL_MODES, load_config
from contracts.errors import ContractError
from contracts.events import EventWriter
from job import data as D
from job import dist  # stdlib until torchrun is in use
from job import metrics as M
from job import report
from job.load import DEFAULT_TOKENS_PER_BATCH, EVAL_PRECISIONS, load_model
from job.prepare import check_out
from job.scoring import row_scales, sample_answers, score_distributions, stated_scale

BASELINES = ("uniform",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="run config (model, tokenizer, eval settings); "
                   "required unless --baseline")
    p.add_argument("--data", required=True, help="folder written by `python -m job prepare` (test.jsonl)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", default=None, help="LoRA adapter folder (the fine-tuned model)")
    which.add_argument("--base", action="store_true", help="evaluate the base model without an adapter")
    which.add_argument("--baseline", choices=BASELINES, default=None,
                       help="score a model-free baseline instead of a model (uniform: equal mass on every "
                       "answer of each cell's scale); loads no model, takes seconds")
    p.add_argument("--mode", choices=EVAL_MODES, default=None, help="sample (the paper's) | distribution "
                   "(exact answer probabilities); default: the config's eval.mode")
    p.add_argument("--as-configured", action="store_true",
                   help="as the run config says (what the machine's run block runs): skip when eval.enabled is false, "
                   "and skip --base unless eval.base is true")
    p.add_argument("--rows", type=int, default=None, help="cap on test rows: whole cells in a seeded order, rounded "
                   "down to the last whole cell (default: eval.rows)")
    p.add_argument("--out", required=True, help="folder for metrics.json, report.html and the plots")
    p.add_argument("--events", default=None, help="events file to append to (default: OUT/events.jsonl)")
    p.add_argument("--train-events", default=None, help="training events.jsonl for the loss curve "
                   "(default: the first of OUT/events.jsonl, OUT/../events.jsonl with step events)")
    p.add_argument("--compare", nargs="*", default=None, help="other evaluate OUT folders whose results the "
                   "report shows beside these (default: sibling folders of OUT holding a metrics.json)")
    p.add_argument("--tokens-per-batch", type=int, default=DEFAULT_TOKENS_PER_BATCH,
                   help="distribution mode: tokens per forward (prompt + answer tree, padded)")
    p.add_argument("--eval-precision", choices=EVAL_PRECISIONS, default="auto",
                   help="bf16: dequantize the 4-bit base once and merge the adapter into it (dense GEMMs; "
                   "fp32 on CPU); nf4: the model as train built it (4-bit base + separate adapter); "
                   "auto: bf16 when the GPU's free memory holds the dense model, else nf4 (always nf4 on CPU)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "baseline", None):
        return run_baseline(args)
    if not args.config:
        raise ContractError("evaluate: give --config FILE (the run config) to score a model, or --baseline uniform")
    cfg = load_config(args.config)
    if args.as_configured and (not cfg.eval.enabled or (args.base and not cfg.eval.base)):
        print(f"evaluate: skipped ({'eval.enabled' if not cfg.eval.enabled else 'eval.base'}: false in {args.config})")
        return 0
    mode = args.mode or cfg.eval.mode
    rows_cap = args.rows if args.rows is not None else cfg.eval.rows
    if rows_cap is not None and rows_cap < 1:
        raise ContractError(f"--rows: {rows_cap} is not accepted (a whole number >= 1)")
    if not args.base and not args.adapter:
        raise ContractError("evaluate: give --adapter DIR (the fine-tuned model), --base, or --baseline uniform")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ContractError(f"--adapter {args.adapter}: no adapter_config.json there (give the folder train wrote)")
    out = check_out(args.out)  # not "" (the current folder), not an existing file
    test = D.read_split(args.data, "test")
    rows = select_rows(test, rows_cap, cfg.data.seed)
    # Under torchrun every rank scores its share of the batches; rank 0 gathers, scores and writes.
    dist.init()
    shard = (dist.rank(), dist.world_size())
    events = EventWriter(Path(args.events) if args.events else out / "events.jsonl", echo=True) \
        if dist.is_main() else dist.QuietEvents()
    which = "fine-tuned" if args.adapter else "base"
    events.emit("start", verb="evaluate", mode=mode, model=which, rows=len(rows))
    _log_cap(events, rows, test, rows_cap)

    tok, model = load_model(cfg, args.adapter, args.eval_precision, args.tokens_per_batch)
    precision = "bf16" if getattr(model, "_eval_dense", False) else "nf4"
    events.emit("log", message=f"evaluate: weights {precision} ({'merged dense' if precision == 'bf16' else 'as trained'})")
    t0 = time.perf_counter()
    if mode == "sample":
        preds = dist.merge(sample_answers(model, tok, rows, cfg, shard=shard))
        if preds is None:  # not rank 0: its share went to rank 0
            dist.destroy()
            return 0
        records = [_record(r, sample=p.value) for r, p in zip(rows, preds)]
        prompt_tokens = sum(p.prompt_tokens for p in preds)
        extra: dict[str, Any] = {"examples": [{"answer": p.text, "human": r["response"]}
                                              for r, p in list(zip(rows, preds))[:20]]}
    else:
        scales = row_scales(rows)
        dists = dist.merge(score_distributions(model, tok, rows, scales, cfg.model.system_prompt, args.tokens_per_batch,
                                               shard=shard))
        if dists is None:
            dist.destroy()
            return 0
        records = [_record(r, values=d.values, probs=d.probs) for r, d in zip(rows, dists)]
        prompt_tokens = sum(d.prompt_tokens for d in dists)
        scored = [d for d in dists if d.values]
        extra = {"valid_mass": sum(d.valid_mass for d in scored) / len(scored) if scored else None,
                 "rows_unscored": len(dists) - len(scored)}
    seconds = time.perf_counter() - t0
    result = M.evaluate(records, mode)
    result.update(extra, model=which, adapter=args.adapter, base_model=cfg.model.id, seconds=seconds,
                  eval_precision=precision, **_provenance(args.data, test, rows_cap),
                  prompt_tokens=prompt_tokens, prompt_tokens_per_s=prompt_tokens / seconds if seconds else None)

    return _write_outputs(out, results.result_key(which, mode), result, events, args)


def run_baseline(args: argparse.Namespace) -> int:
    """A model-free baseline on the test split: metrics.json, cells.jsonl and the report, as a model run
    writes them, under the key "<baseline>/distribution" (the baseline is a distribution over each scale)."""
    if args.mode == "sample":
        raise ContractError(f"--mode sample with --baseline {args.baseline}: not accepted (a baseline is a "
                            "distribution over each scale; leave --mode out or give distribution)")
    cfg = load_config(args.config) if args.config else None
    rows_cap = args.rows if args.rows is not None else (cfg.eval.rows if cfg else None)
    if rows_cap is not None and rows_cap < 1:
        raise ContractError(f"--rows: {rows_cap} is not accepted (a whole number >= 1)")
    out = check_out(args.out)
    test = D.read_split(args.data, "test")
    rows = select_rows(test, rows_cap, cfg.data.seed if cfg else 42)
    events = EventWriter(Path(args.events) if args.events else out / "events.jsonl", echo=True)
    events.emit("start", verb="evaluate", mode="distribution", model=args.baseline, rows=len(rows))
    _log_cap(events, rows, test, rows_cap)
    t0 = time.perf_counter()
    records = baseline_records(rows, args.baseline)
    result = M.evaluate(records, "distribution")
    seconds = time.perf_counter() - t0
    scored = sum(1 for r in records if r.values)
    result.update(model=args.baseline, baseline=args.baseline, adapter=None,
                  base_model=None, seconds=seconds, eval_precision=None, prompt_tokens=0,
                  prompt_tokens_per_s=None, valid_mass=1.0 if scored else None,
                  rows_unscored=len(records) - scored, **_provenance(args.data, test, rows_cap))
    return _write_outputs(out, results.result_key(args.baseline, "distribution"), result, events, args)


def baseline_records(rows: Sequence[dict], baseline: str = "uniform") -> list[M.Record]:
    """Each row's prediction under a model-free baseline. uniform: equal probability on every answer
    of the row's stated scale, step grid included; none for a row that states no scale (not scored)."""
    if baseline not in BASELINES:
        raise ContractError(f"--baseline {baseline!r}: not accepted ({' | '.join(BASELINES)})")
    out = []
    for r, s in zip(rows, row_scales(rows)):
        values = s.values() if s is not None else None
        out.append(_record(r, values=values, probs=[1.0] * len(values) if values else None))
    return out


def _write_outputs(out: Path, key: str, result: dict, events: EventWriter, args: argparse.Namespace) -> int:
    all_metrics = results.write_metrics(out, key, result, paper_table2=M.PAPER_TABLE2,
                                        dpd_definition=M.DPD_DEFINITION)
    cells = results.write_cells(out, all_metrics["results"])
    shown = {"results": {**_compared(out, args.compare), **all_metrics["results"]},
             **{k: v for k, v in all_metrics.items() if k != "results"}}
    html = report.write_report(out, shown, report.find_train_events(out, args.train_events))
    summary = results.summary(result)
    events.emit("eval", metrics=summary, key=key, report=str(html))
    print(f"{key}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print(f"cells: {cells}")
    print(f"report: {html}")
    dist.destroy()
    return 0


# --- Rows ------------------------------------------------------------------------------------

def select_rows(rows: list[dict], cap: int | None, seed: int) -> list[dict]:
    """At most `cap` rows in whole cells (a cell's W needs all its rows): cells in a seeded order, each
    taken whole if it fits in what the cap has left, never cut (the cap rounds down to whole cells). A
    cap smaller than every cell is refused (one line), before any model is loaded."""
    if cap is None or cap >= len(rows):
        return rows
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_cell[(r["study_id"], r["condition_num"], r["task_num"])].append(r)
    cells = sorted(by_cell)
    random.Random(seed).shuffle(cells)
    kept: list[dict] = []
    for c in cells:
        if len(kept) + len(by_cell[c]) <= cap:
            kept.extend(by_cell[c])
    if not kept:
        raise ContractError(f"--rows/eval.rows {cap}: smaller than every cell of the test split (the smallest has "
                            f"{min(map(len, by_cell.values()))} rows; a cell is scored whole or not at all); "
                            "give a larger cap, or none")
    return kept


def _cells(rows: Sequence[dict]) -> int:
    return len({(r["study_id"], r["condition_num"], r["task_num"]) for r in rows})


def _log_cap(events: EventWriter, kept: Sequence[dict], test: Sequence[dict], cap: int | None) -> None:
    """One line saying what the row cap kept (nothing when there is none or it keeps everything)."""
    if cap is not None and len(kept) < len(test):
        events.emit("log", message=f"evaluate: --rows/eval.rows {cap} kept {len(kept)} of {len(test)} test rows "
                    f"({_cells(kept)} of {_cells(test)} cells, whole cells only)")


def _provenance(data: str, test: Sequence[dict], cap: int | None) -> dict[str, Any]:
    """What a result was scored on: the split (from prepare's stats.json) and the row cap's effect."""
    stats = D.read_stats(data)
    out: dict[str, Any] = {"split": stats.get("split"), "rows_test": len(test), "rows_cap": cap}
    if stats.get("split") == D.UNSEEN_PARTICIPANTS:
        out["participant_fraction"] = stats.get("participant_fraction")
    return out


def _record(r: dict, **pred: Any) -> M.Record:
    return M.Record(r["study_id"], r["condition_num"], r["task_num"], r["response"], stated_scale(r),
                    r.get("demographic") or {}, **pred)


# --- Outputs ---------------------------------------------------------------------------------

def _compared(out: Path, folders: list[str] | None) -> dict:
    """Results of other evaluations (e.g. out/eval-base beside out/eval), for the report only."""
    if folders is None:
        folders = [str(p.parent) for p in sorted(out.resolve().parent.glob(f"*/{results.METRICS_FILE}"))
                   if p.parent != out.resolve()]
    merged: dict = {}
    for f in folders:
        try:
            merged.update(results.read_metrics(Path(f) / results.METRICS_FILE).get("results", {}))
        except ContractError:  # none there, or damaged: shown nowhere, replaced on write
            pass
    return merged
