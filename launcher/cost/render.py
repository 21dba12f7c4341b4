"""The estimate on the terminal (tables whose cells never break mid-word, at 80 columns or in a pipe) and
as JSON (`estimate --json`, the run record's copy)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from launcher import tables
from launcher.cost.estimate import Estimate, Offer

SHOWN_OFFERS = 12


def to_json(est: Estimate) -> dict:
    best, plan = est.cheapest, est.plan
    return {"infra": est.infra, "method": est.method, "model": est.model, "params_b": round(est.params_b, 3),
            "spot": est.spot, "tokens": asdict(est.tokens), "hours": list(est.hours) if est.hours else None,
            "dollars": list(best.dollars) if best else None, "cheapest": asdict(best) if best else None,
            "plans": [{**asdict(p), "hours": list(p.hours(est.spot))} for p in est.plans],
            "offers": [asdict(o) for o in est.offers], "terms": [asdict(t) for t in plan.terms] if plan else [],
            "notes": list(est.notes), "cards": [asdict(c) for c in est.cards], "warning": est.warning}


def render(est: Estimate, console: Any = None, explain: bool = False) -> None:
    """The offers table (cheapest marked), the card table, the notes, and with `explain` every term."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    whole = not console.is_terminal  # in a pipe a line stays one line (grep); a terminal wraps it at words
    tok = est.tokens
    console.print(f"[bold]{est.model}[/] {est.method}, {tok.train_rows:,} training rows (split {tok.split}) -> "
                  f"{tok.steps:,} steps, {tok.tokens / 1e6:,.1f}M tokens ({'exact' if tok.exact else 'estimated'})",
                  soft_wrap=whole)
    if est.offers:
        _render_offers(est, console)
        render_cards(est, console)
    elif est.hours:
        lo, exp, hi = est.hours
        console.print(f"hours on {est.plan.card}:{est.plan.count}: {lo:.2f} / {exp:.2f} / {hi:.2f} (low / expected / high)")
    unpriced = [n for n in est.notes if n.startswith("price unknown")] if est.infra == "sky" and not est.offers else []
    for n in unpriced or est.notes:  # no catalog at all: that one line says what is missing and what to do
        console.print(n if unpriced else f"  note: {n}", highlight=False, markup=False, soft_wrap=whole)
    if est.warning:
        console.print(f"[bold red]{escape(est.warning)}[/]", highlight=False, soft_wrap=whole)
    if explain and est.plan:
        p = est.plan
        t = tables.simple(f"How the hours add up on {p.card}:{p.count}")
        for col in ("term", "low", "expected", "high", "how"):  # numbers whole; a long word of `how` folds
            t.add_column(col, justify="left" if col in ("term", "how") else "right", no_wrap=col != "how",
                         overflow="fold")
        for term in p.terms:
            t.add_row(term.name, _hms(term.low_s), _hms(term.expected_s), _hms(term.high_s), term.how)
        lo, exp, hi = p.hours(est.spot)
        t.add_row("total", f"{lo:.2f} h", f"{exp:.2f} h", f"{hi:.2f} h", "sum of the terms" +
                  (" (+ spot preemption allowance)" if est.spot else ""), style="bold")
        console.print(t)
        console.print(f"  tokens: {tok.source}")
        console.print("  bands: low/high = token band x throughput band (measured +-10%, derived +-30%) "
                      "+ each fixed term's own range")


def _render_offers(est: Estimate, console: Any) -> None:
    shown = est.offers[:SHOWN_OFFERS]
    table = tables.simple("What this run will cost" + (" (spot)" if est.spot else ""))
    table.add_column("", no_wrap=True)
    table.add_column("offer", min_width=max(len(o.instance) for o in shown))  # wraps at its spaces only
    for name in ("card", "$/h") + (("on demand",) if est.spot else ()) + ("hours", "$"):
        table.add_column(name, justify="left" if name == "card" else "right", no_wrap=True)
    for o in shown:
        cells = ["*" if o.cheapest else "", f"{o.cloud} {o.region} {o.instance}", _card(o), f"{o.price_per_h:.2f}"]
        if est.spot:
            cells.append("-" if o.on_demand_per_h is None else f"{o.on_demand_per_h:.2f}")
        table.add_row(*cells, "-".join(f"{h:.1f}" for h in o.hours), "-".join(f"{d:,.0f}" for d in o.dollars),
                      style="bold green" if o.cheapest else None)
    dropped = tables.fit(console, table, ("on demand", "$/h", "card"))
    console.print(table)
    tables.say_dropped(console, dropped)
    console.print("  * cheapest expected cost; hours and $: low-expected-high"
                  + ("; $/h is the spot price" if est.spot else ""))
    if len(est.offers) > SHOWN_OFFERS:
        console.print(f"  (+{len(est.offers) - SHOWN_OFFERS} more offers; --json lists all)")


def render_cards(est: Estimate, console: Any) -> None:
    """The same run on every card the catalog offers that fits, at its cheapest offer, marked."""
    if not est.cards:
        return
    t = tables.simple("The same run on each card that fits (its cheapest offer)")
    for name in ("card", "memory", "hours", "$/h", "$", ""):
        t.add_column(name, justify="right" if name in ("hours", "$/h", "$") else "left", no_wrap=True)
    for c in est.cards:
        t.add_row(f"{c.card}:{c.count}" + (" PCIe" if c.spec.endswith("-PCIE") else ""), c.memory_mode or "-",
                  f"{c.hours[1]:,.1f}", f"{c.price_per_h:.2f}", f"{c.dollars[1]:,.0f}",
                  ", ".join(("<- " if m == "asked" else "") + m for m in c.marks),
                  style="bold" if "asked" in c.marks else None)
    console.print(t)
    console.print("  expected hours and dollars; `--gpu CARD:N` picks one", highlight=False)


def render_methods(rows: list[dict], console: Any) -> None:
    """estimate.methods_side_by_side's rows: QLoRA beside LoRA on the estimate's card."""
    if not rows:
        return
    t = tables.simple(f"QLoRA and LoRA on {rows[0]['card']}:1 ({rows[0]['card_gib']:.0f} GiB), same data")
    for col in ("method", "tok/s", "hours lo-exp-hi", "$ lo-exp-hi", "needs GiB"):  # whole cells at 80 columns
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=col != "method")
    for r in rows:
        name = {"qlora": "QLoRA (4-bit NF4 base)", "lora": "LoRA (bf16 base)"}[r["method"]]
        t.add_row(name + (" *" if r["chosen"] else ""), f"{r['tokens_per_s']:,}", "-".join(f"{h:.1f}" for h in r["hours"]),
                  "-".join(f"{d:,.0f}" for d in r["dollars"]) if r["dollars"] else "-",
                  f"{r['need_gib']:.0f}" + (" (lean)" if r["memory_mode"] == "lean" else ""))
    console.print(t)
    console.print("  * the method this run uses (train.method); the other is shown, never switched to")


def _card(o: Offer) -> str:
    return f"{o.card}:{o.count}" + (" PCIe" if (o.spec or "").endswith("-PCIE") else "")


def _hms(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"
