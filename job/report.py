"""The evaluation report: one HTML file with PNG plots beside it, readable offline (no scripts, no CDN).

Plots (matplotlib, Agg): the training loss curve from the train events, per-study W for every
evaluated model (base / fine-tuned, each with its mode) beside the uniform guess, and predicted
vs human answer histograms for the best and worst cells. Tables: every result with the mode that
produced it, invalid-answer rates, and the paper's Table 2 for reference.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from contracts.events import read_all
from contracts.results import REPORT_FILE


def find_train_events(out: Path, explicit: str | None = None) -> Path | None:
    """The events file holding training `step` events: the given one, else beside or above OUT."""
    candidates = [Path(explicit)] if explicit else [out / "events.jsonl", out.parent / "events.jsonl"]
    found = (c for c in candidates if c.is_file() and any(e["event"] == "step" for e in read_all(c)))
    return next(found, Path(explicit) if explicit else None)


def write_report(out: Path, metrics: dict, train_events: Path | None = None) -> Path:
    """Write OUT/report.html and its PNGs from metrics.json's content; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = metrics.get("results", {})
    sections = [f"<h1>SOCRATES evaluation</h1>{_summary_table(results)}"]

    steps = [e for e in read_all(train_events) if e["event"] == "step"] if train_events else []
    if steps:
        _loss_plot(steps, out / "loss.png")
        sections.append(f"<h2>Training loss</h2><p>From {html.escape(str(train_events))} "
                        f"({len(steps)} logged steps).</p><img src='loss.png' alt='training loss'>")
    else:
        sections.append("<h2>Training loss</h2><p>No training step events found (evaluated without "
                        "a training run in this folder).</p>")

    if results:
        _per_study_plot(results, out / "per_study.png")
        sections.append("<h2>W per study</h2><p>Lower is better. Each bar names the model and the mode "
                        "that produced it; the uniform guess is computed on the same cells.</p>"
                        "<img src='per_study.png' alt='W per study'>")
        key = _headline_key(results)
        if results[key].get("cells"):
            _cells_plot(results[key], key, out / "cells.png")
            sections.append(f"<h2>Best and worst cells ({html.escape(key)})</h2><p>Human answers vs the "
                            "model's, both rescaled to [0, 1] with the cell's human min and max.</p>"
                            "<img src='cells.png' alt='best and worst cells'>")
    sections.append(_paper_table(metrics.get("paper_table2", {})))
    sections.append(f"<h2>Demographic parity difference</h2><p>{html.escape(metrics.get('dpd_definition', ''))}</p>"
                    + _dpd_table(results))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>SOCRATES evaluation</title><style>"
            "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:.3em .6em;text-align:right}th{background:#eee}"
            "img{max-width:100%}</style></head><body>" + "\n".join(sections) + "</body></html>\n")
    path = out / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


def _headline_key(results: dict[str, dict]) -> str:
    """The result the cell histograms show: fine-tuned first, distribution before sample."""
    keys = ("fine-tuned/distribution", "fine-tuned/sample", "base/distribution", "base/sample")
    return next((key for key in keys if key in results), min(results))


def _f(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


def _summary_table(results: dict[str, dict]) -> str:
    if not results:
        return "<p>No evaluation results yet.</p>"
    head = ("<tr><th>model</th><th>mode</th><th>split</th><th>rows</th><th>W</th>"
            "<th>W without out-of-scale cells</th><th>W uniform guess</th>"
            "<th>individual accuracy</th><th>accuracy uniform</th><th>demographic parity diff.</th>"
            "<th>invalid answers</th><th>cells scored</th><th>cells flagged: answers outside the stated scale</th>"
            "<th>cells skipped (no stated scale / &lt;2 / constant)</th>"
            "<th>cells excluded (unbounded / scales disagree)</th><th>prompt tokens/s</th></tr>")
    body = []
    for key, r in sorted(results.items()):
        inv = f"{r.get('invalid_answers', 0)} ({100 * r.get('invalid_rate', 0):.1f}%)" if r["mode"] == "sample" \
            else "n/a (exact distribution)"
        cap = (f" of {r['rows_test']} (cap {r['rows_cap']}, whole cells)"
               if r.get("rows_cap") is not None and r.get("rows_test", 0) > r.get("rows", 0) else "")
        body.append(
            f"<tr><td>{_f(r.get('model'))}</td><td>{_f(r['mode'])}</td><td>{_f(_split(r))}</td>"
            f"<td>{r.get('rows')}{_f(cap)}</td>"
            f"<td>{_f(r.get('wasserstein'))}</td><td>{_f(r.get('wasserstein_in_scale'))}</td>"
            f"<td>{_f(r.get('wasserstein_uniform'))}</td>"
            f"<td>{_f(r.get('individual_accuracy'))}</td><td>{_f(r.get('individual_accuracy_uniform'))}</td>"
            f"<td>{_f((r.get('demographic_parity_difference') or {}).get('value'))}</td><td>{inv}</td>"
            f"<td>{r.get('cells_scored')}</td><td>{_f(r.get('cells_out_of_scale'))}</td>"
            f"<td>{_f(r.get('cells_no_scale'))} / {r.get('cells_too_few')} / {r.get('cells_constant')}</td>"
            f"<td>{r.get('cells_unbounded')} / {_f(r.get('cells_scale_conflict'))}</td>"
            f"<td>{_f(r.get('prompt_tokens_per_s'), 0)}</td></tr>")
    note = ("<p><b>sample</b>: one answer sampled per row (temperature 0.6, top_p 0.9), first integer parsed, "
            "as in the paper. <b>distribution</b>: the model's exact probability for every answer on the "
            "row's scale (no sampling noise); its W is not the paper's protocol, compare like with like. "
            "A cell's scale is the one its question states: cells that state none are skipped, never scored "
            "on a range read from their answers. Cells with human answers outside the stated scale are scored "
            "and flagged; W is shown with them and without them.</p>")
    return f"<table>{head}{''.join(body)}</table>{note}{_flagged_table(results)}"


def _split(r: dict) -> str | None:
    split = r.get("split")
    if split == "unseen-participants" and isinstance(r.get("participant_fraction"), (int, float)):
        return f"{split} ({r['participant_fraction']:g} of each study's participants trained)"
    return split


def _flagged_table(results: dict[str, dict]) -> str:
    """The cells whose human answers fall outside their stated scale (scored, flagged), once each."""
    flagged: dict[tuple, dict] = {}
    for r in results.values():
        for c in r.get("cells") or []:
            if c.get("out_of_scale"):
                flagged.setdefault(tuple(c["cell"]), c)
    if not flagged:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(k[0]))}</td><td>{k[1]}</td><td>{k[2]}</td>"
        f"<td>{html.escape(_describe(c.get('scale')))}</td><td>{c['out_of_scale']} of {c.get('n')}</td>"
        f"<td>{_f(c.get('lo'), 0)}..{_f(c.get('hi'), 0)}</td></tr>" for k, c in sorted(flagged.items()))
    return ("<h2>Cells flagged: human answers outside the stated scale</h2><p>Scored and counted in W; the "
            "column \"W without out-of-scale cells\" leaves them out.</p><table><tr><th>study</th><th>condition</th>"
            f"<th>task</th><th>stated scale</th><th>answers outside</th><th>human range</th></tr>{rows}</table>")


def _describe(scale: dict | None) -> str:
    if not isinstance(scale, dict):
        return "-"
    if scale.get("values"):
        return "{" + ", ".join(map(str, scale["values"][:12])) + ("...}" if len(scale["values"]) > 12 else "}")
    step = scale.get("step") or 1
    return f"{scale.get('lo')}..{scale.get('hi')}" + (f" step {step}" if step != 1 else "")


def _paper_table(table: dict[str, float]) -> str:
    rows = "".join(f"<tr><td style='text-align:left'>{html.escape(k)}</td><td>{v:.3f}</td></tr>"
                   for k, v in table.items())
    return ("<h2>The paper's Table 2 (unseen studies, W, lower is better), for reference</h2>"
            f"<table><tr><th>model</th><th>W</th></tr>{rows}</table>")


def _dpd_table(results: dict[str, dict]) -> str:
    rows = []
    for key, r in sorted(results.items()):
        for field, g in sorted(((r.get("demographic_parity_difference") or {}).get("fields") or {}).items()):
            rows.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(field)}</td><td>{g['gap']:.4f}</td>"
                        f"<td>{html.escape(g['worst'])}</td><td>{html.escape(g['best'])}</td><td>{g['groups']}</td></tr>")
    if not rows:
        return "<p>Too few rows per group for any field.</p>"
    return ("<table><tr><th>model/mode</th><th>field</th><th>gap</th><th>worst group</th><th>best group</th>"
            f"<th>groups</th></tr>{''.join(rows)}</table>")


def _loss_plot(steps: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], marker=".", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_study_plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    studies = sorted({s for r in results.values() for s in r.get("per_study", {})})
    series = [(f"{k}", r.get("per_study", {})) for k, r in sorted(results.items())]
    # The uniform guess: the first result's per-study value where several results have one.
    series.append(("uniform guess", {s: v for r in reversed(list(results.values()))
                                     for s, v in r.get("per_study_uniform", {}).items()}))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(studies) * len(series) / 2 + 3), 4))
    width = 0.8 / len(series)
    x = np.arange(len(studies))
    for j, (label, per) in enumerate(series):
        ax.bar(x + j * width, [per.get(s, np.nan) for s in studies], width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, studies, rotation=60, fontsize=8)
    ax.set_ylabel("W (per-study mean over cells)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cells_plot(result: dict, key: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    cells = sorted(result["cells"], key=lambda c: c["w"])
    picks = [("best", cells[0])] + ([("worst", cells[-1])] if len(cells) > 1 else [])
    fig, axes = plt.subplots(1, len(picks), figsize=(5 * len(picks), 3.5), squeeze=False)
    for ax, (label, c) in zip(axes[0], picks):
        bins = np.linspace(0, 1, min(c["levels"], 21) + 1)
        ax.hist(c["human"], bins=bins, density=True, alpha=0.6, label="human", color="tab:gray")
        ax.hist(c["predicted_values"], bins=bins, weights=c["predicted_weights"], density=True, alpha=0.6,
                label=f"model ({result['mode']})", color="tab:orange")
        study, cond, task = c["cell"]
        ax.set_title(f"{label}: {study} cond {cond} task {task}\nW={c['w']:.3f} (uniform {c['w_uniform']:.3f}), "
                     f"n={c['n']}", fontsize=9)
        ax.set_xlabel("answer, rescaled to [0, 1]")
        ax.legend(fontsize=8)
    fig.suptitle(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
