"""`socrates-launch report [RUN]`: a run's evaluation summary and where its HTML report is, from the
metrics.json files the run brought home (runs/<id>/eval*/, runs/<id>/out/eval*/), or RUN, a folder
holding one. Every number is printed with the mode that produced it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from contracts import results as results_lib
from contracts.remote import clean
from contracts.results import METRICS_FILE, REPORT_FILE, read_metrics, summary
from launcher import registry

# Table 2 rows of the SOCRATES paper (arXiv 2509.05830) most worth seeing beside a run.
PAPER_REFERENCE = (("uniform guess", 0.203), ("Qwen2.5-14B base", 0.205), ("SOCRATES-Qwen-14B", 0.151))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN",
                   help="run id (default: the latest run), or a folder holding metrics.json")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    folders, run_id = _eval_folders(args.run_id)
    label = run_id if Path(run_id).is_dir() else f"run {run_id}"
    tb = _tensorboard_dir(run_id)
    if tb is not None and not args.json:
        print(f"training curves (train.report_to: tensorboard): tensorboard --logdir {tb}")
    results: dict[str, dict] = {}
    reports: list[tuple[float, Path]] = []
    for folder in folders:
        results.update(read_metrics(folder / METRICS_FILE).get("results") or {})
        if (folder / REPORT_FILE).is_file():
            reports.append(((folder / REPORT_FILE).stat().st_mtime, folder / REPORT_FILE))
    if not results:
        print(f"{label}: no evaluation results yet (the run was started with --no-eval, has not finished, "
              "or its artifacts were not downloaded: `socrates-launch download`)")
        return 1
    # The newest report: evaluate draws sibling results in, so the last one written shows them all.
    report = max(reports, key=lambda r: r[0])[1] if reports else None
    if args.json:
        print(json.dumps({"run": run_id, "report": str(report) if report else None,
                          "tensorboard": str(tb) if tb else None,
                          "results": {k: summary(v) for k, v in results.items()}}, indent=2))
        return 0
    print("read: " + ", ".join(str(f / METRICS_FILE) for f in folders), flush=True)
    print(clean(render(label, results, report)))  # keys and values came from a machine: no escape reaches the terminal
    if _random_model(run_id):
        print("note: this run's model is a tiny random one (model.init: random, the demo's): its scores are not "
              "meaningful; the paper's rows above are what a real run is compared with")
    return 0


def _random_model(run_id: str) -> bool:
    """The run's model was built with random weights (configs/smoke.yaml): its scores say nothing."""
    if Path(run_id).is_dir():
        return False
    try:
        return registry.resolve(run_id).config["model"]["init"] == "random"
    except (KeyError, TypeError):  # a record without a config (or a hand-edited one): nothing to say
        return False


def _tensorboard_dir(run_id: str) -> Path | None:
    """The run's TensorBoard event files (downloaded with out/ and verified with the manifest), if any."""
    root = Path(run_id) if Path(run_id).is_dir() else registry.resolve(run_id).dir
    for d in (root / "tensorboard", root / "out" / "tensorboard", root.parent / "tensorboard"):
        if d.is_dir() and any(d.rglob("events.out.tfevents*")):
            return d
    return None


def _eval_folders(run_id: str | None) -> tuple[list[Path], str]:
    if run_id and Path(run_id).is_dir() and (Path(run_id) / METRICS_FILE).is_file():
        return [Path(run_id)], run_id
    rec = registry.resolve(run_id)
    return [p.parent for root in (rec.dir, rec.dir / "out") for p in sorted(root.glob(f"eval*/{METRICS_FILE}"))], rec.id


def render(label: str, results: dict[str, dict], report: Path | None) -> str:
    def f(v, spec=".4f"):
        """A number in `spec`; anything else as it is (a hand-edited file: '0.2' stays '0.2')."""
        if v is None:
            return "-"
        if results_lib.is_number(v):
            try:
                return format(v, spec)
            except ValueError:  # 12.5 rows
                return str(v)
        text = " ".join(str(v).split())
        return text if len(text) <= 12 else text[:11] + "~"

    head = f"{'model/mode':<26}{'rows':>7}{'W':>9}{'W uniform':>11}{'accuracy':>10}{'DPD':>9}{'invalid':>9}{'cells':>7}"
    lines = [f"{label}: evaluation (W: per-cell Wasserstein, mean over studies; lower is better)", head]
    for key, r in sorted(results.items()):
        if not results_lib.is_result(r):
            lines.append(f"{key:<26}{'?':>7}  (not a result: {f(r)})")
            continue
        s = summary(r)
        invalid = f(s["invalid_rate"], ".1%") if s["mode"] == "sample" else "n/a"
        lines.append(f"{key:<26}{f(s['rows'] or 0, 'd'):>7}{f(s['wasserstein']):>9}{f(s['wasserstein_uniform']):>11}"
                     f"{f(s['individual_accuracy']):>10}{f(s['demographic_parity_difference']):>9}{invalid:>9}"
                     f"{f(s['cells_scored'] or 0, 'd'):>7}")
        # What the W is of: the split, the cells skipped for stating no scale, and those flagged.
        notes = [f"split {' '.join(str(s['split']).split())[:40]}"] if s["split"] is not None else []
        if s["cells_no_scale"]:
            notes.append(f"{f(s['cells_no_scale'], 'd')} cells skipped (no stated scale)")
        if s["cells_out_of_scale"]:
            notes.append(f"{f(s['cells_out_of_scale'], 'd')} cells flagged (answers outside the stated scale): "
                         f"W without them {f(s['wasserstein_in_scale'])}")
        if notes:
            lines.append(f"{'':<26}" + "; ".join(notes))
    lines.append("modes: sample = one sampled answer per row (the paper's protocol); "
                 "distribution = the model's exact answer probabilities")
    lines.append("paper, Table 2 (unseen studies): " + ", ".join(f"{n} {w:.3f}" for n, w in PAPER_REFERENCE))
    lines.append(f"report: {report.resolve() if report else '(none written)'}")
    return "\n".join(lines)
