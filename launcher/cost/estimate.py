"""What a run will cost before it starts: hours per card (launcher/cost/hours.py) x prices per offer from
SkyPilot's catalog (through launcher/sky_adapter.py, the only module that imports sky), the same run on
each card that fits, and a loud line when it runs long."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from contracts.config import RunConfig
from contracts.errors import ContractError
from launcher import sky_adapter
from launcher.cost.hours import LOCAL_INFRA_PREFIXES, CardPlan, full_need_gib, full_output_note, plan_card
from launcher.cost.rates import (asked_card, fitting_cards, lean_min_memory_gib, load_throughput, min_memory_gib,
                                 model_params_b, multi_gpu_efficiency, rate_levers)
from launcher.cost.tokens import Tokens, count_tokens

LONG_HOURS = 24.0  # above either, on the offer the run takes: LONG RUN, and what would bring it under
BIG_DOLLARS = 100.0
ADAPTER_METHODS = ("qlora", "lora")


@dataclass(frozen=True)
class Offer:
    cloud: str
    region: str
    instance: str
    card: str
    count: int
    spot: bool
    price_per_h: float
    hours: tuple[float, float, float]
    dollars: tuple[float, float, float]
    cheapest: bool = False
    spec: str = ""  # the throughput-table card behind the hours (H100-PCIE for a PCIe H100 instance)
    on_demand_per_h: float | None = None  # a spot offer's on-demand price (None: not in the catalog)


@dataclass(frozen=True)
class CardChoice:
    """One card's cheapest offer for this run: a row of the card table (`estimate`, `up` before asking)."""

    card: str  # SkyPilot's name, what --gpu takes
    count: int
    spec: str  # as Offer.spec
    memory_mode: str | None
    hours: tuple[float, float, float]
    price_per_h: float
    dollars: tuple[float, float, float]
    offer: str  # cloud region instance
    marks: tuple[str, ...] = ()  # asked | cheapest | fastest


@dataclass(frozen=True)
class Estimate:
    infra: str
    method: str
    model: str
    params_b: float
    tokens: Tokens
    plans: tuple[CardPlan, ...]
    offers: tuple[Offer, ...]
    spot: bool
    notes: tuple[str, ...] = ()
    cards: tuple[CardChoice, ...] = ()  # the same run on each card that fits, cheapest first
    warning: str | None = None  # LONG RUN: over LONG_HOURS or BIG_DOLLARS, and what would bring it under

    @property
    def unpriced(self) -> bool:
        """A cloud run with no priced offer (no catalog, offline): hours only, "price unknown"."""
        return not self.offers and not self.infra.startswith(LOCAL_INFRA_PREFIXES)

    @property
    def cheapest(self) -> Offer | None:
        return next((o for o in self.offers if o.cheapest), None)

    @property
    def plan(self) -> CardPlan | None:
        """The plan behind the cheapest offer (or the only plan, on your own machine)."""
        if (best := self.cheapest) is not None:
            return next(p for p in self.plans if p.card == (best.spec or best.card) and p.count == best.count)
        return self.plans[0] if self.plans else None

    @property
    def hours(self) -> tuple[float, float, float] | None:
        best = self.cheapest
        return best.hours if best else self.plan.hours(self.spot) if self.plan else None


def estimate_run(cfg: RunConfig, gpu: Any = None, cloud: str | None = None, spot: bool = False,
                 data: str | None = None, infra: str = "sky", allow_unpriced: bool = False,
                 nodes: int = 1) -> Estimate:
    """Hours and dollars of `cfg` on `gpu` ("A100:1", a GpuSpec, or None for every card that fits).

    SkyPilot's catalog is read offline when cached; a catalog that cannot be fetched falls back to
    the copy SkyPilot cached last (a note gives its date), and with none at all `allow_unpriced`
    returns the tokens and hours with "price unknown" (`estimate`) instead of refusing (`up`).
    `nodes`: that many machines of `gpu` each; the rate is per-GPU rate x all GPUs x the multi-GPU
    efficiency, and every node is priced."""
    run = _Run(cfg, load_throughput(), model_params_b(cfg), count_tokens(cfg, data), data, cloud, spot, nodes,
               infra.startswith(LOCAL_INFRA_PREFIXES))
    method, table, params_b = cfg.train.method, run.table, run.params_b
    notes = [] if run.tokens.exact else [f"tokens approximate: {run.tokens.source}"]
    if gpu is not None:
        card, count = asked_card(gpu, table)
        plans = [run.plan(card, count * nodes)]
    else:
        cards_that_fit = [] if run.local else fitting_cards(table, method, params_b, cfg.train.memory_mode)
        plans = [run.plan(c, 1) for c in cards_that_fit]
    for p in plans:
        notes += _memory_notes(run, p)
    est = {"infra": infra, "method": method, "model": cfg.model.id, "params_b": params_b, "tokens": run.tokens,
           "spot": spot}
    offers: list[Offer] = []
    cards, warning = (), None
    if run.local:
        notes.append(f"infra {infra}: your own machine, no cloud price")
    else:
        for p in list(plans):
            rows = run.offers(p, plans, offers)
            health = sky_adapter.catalog_health()
            if not rows and health.unfetched and not allow_unpriced:
                raise ContractError(_unfetched(health.unfetched))
            if not rows and gpu is not None and not (health.unfetched and allow_unpriced):
                why = f"; catalog unreadable for {', '.join(sorted(health.errors))}" if health.errors else ""
                raise ContractError(f"--gpu {p.card}:{p.count}: SkyPilot's catalog has no {'spot ' if spot else ''}"
                                    f"price for it{' on ' + cloud if cloud else ''} (try another card or cloud; "
                                    f"`sky show-gpus` lists them){why}")
        health = sky_adapter.catalog_health()
        notes += [f"SkyPilot's {name} catalog could not be fetched (offline?): prices from the copy it cached"
                  f"{' on ' + date if date else ''}" for name, date in sorted(health.stale.items())]
        if not offers and health.unfetched and allow_unpriced:
            notes.append(f"price unknown: {_unfetched(health.unfetched)}")
            return Estimate(**est, plans=tuple(plans), offers=(), notes=tuple(notes))
        if not offers:
            why = (f"; catalog unreadable for {', '.join(sorted(health.errors))} (offline? `sky show-gpus` fetches it)"
                   if health.errors else "")
            raise ContractError(f"no priced offer in SkyPilot's catalog for any card that fits"
                                f"{' on ' + cloud if cloud else ''} (pass --gpu NAME:COUNT, or another --cloud){why}")
        offers.sort(key=lambda o: (o.dollars[1], o.price_per_h, o.cloud, o.region))
        offers[0] = replace(offers[0], cheapest=True)
        if nodes == 1:  # the same run on every other card that fits, at the count asked for
            count = offers[0].count if gpu is not None else 1
            alt_plans = [run.plan(c, count) for c in fitting_cards(table, method, params_b, cfg.train.memory_mode)
                         if not any(p.card == c and p.count == count for p in plans)]
            alt_offers: list[Offer] = []
            for p in list(alt_plans):
                run.offers(p, alt_plans, alt_offers)
            cards = card_choices(offers + sorted(alt_offers, key=lambda o: o.dollars[1]), plans + alt_plans,
                                 asked=offers[0] if gpu is not None else None)
        warning = run.too_big(offers[0], cards)
        if spot:
            notes += _spot_note(plans, offers[0])
        notes += rate_levers(table, cfg, params_b)  # the measured rate and its levers are the cloud machine's
    if any(p.count > 1 for p in plans):
        eff, how = multi_gpu_efficiency(table, max(p.count for p in plans))
        notes.append(f"multi-GPU: rate = per-GPU rate x GPUs x {eff} scaling efficiency ({how}; bench/scale.py measures it)")
    if method == "full" and not run.local:
        notes.append(full_output_note(params_b))
    if nodes > 1:
        notes.append(f"{nodes} nodes: the price is {nodes} machines' and the rate that of all {nodes} x "
                     f"{(plans[0].count // nodes) if plans else '?'} GPUs")
    return Estimate(**est, plans=tuple(plans), offers=tuple(offers), notes=tuple(notes), cards=cards, warning=warning)


@dataclass(frozen=True)
class _Run:
    """What every card's plan and offers in one estimate share."""

    cfg: RunConfig
    table: dict
    params_b: float
    tokens: Tokens
    data: str | None
    cloud: str | None
    spot: bool
    nodes: int
    local: bool

    def plan(self, card: str, count: int) -> CardPlan:
        return plan_card(self.cfg, self.table, card, count, self.params_b, self.tokens, self.local)

    def offers(self, p: CardPlan, plans: list[CardPlan], offers: list[Offer]) -> list[dict]:
        """Append the catalog's offers of plan `p`'s card to `offers` (a PCIe variant's plan is added to
        `plans`); returns the catalog rows found."""
        per_node, nodes = p.count // self.nodes, self.nodes
        rows = sky_adapter.list_offers(p.card, per_node, self.cloud, self.spot)
        on_demand = {(r["cloud"], r["region"], r["instance"]): float(r["price_per_h"]) * nodes
                     for r in (sky_adapter.list_offers(p.card, per_node, self.cloud, False) if self.spot and rows else ())}
        for r in rows:
            plan, variant = p, f"{p.card}-PCIE"  # SkyPilot names PCIe and SXM alike; the instance says which
            if "pcie" in str(r["instance"]).lower() and variant in self.table["cards"]:
                plan = next((q for q in plans if q.card == variant and q.count == p.count), None) or \
                    self.plan(variant, p.count)
                if plan not in plans:
                    plans.append(plan)
            hours, price = plan.hours(self.spot), float(r["price_per_h"]) * nodes  # every node bills
            key = (str(r["cloud"]), str(r["region"]), str(r["instance"]))
            offers.append(Offer(*key, card=p.card, count=p.count, spot=self.spot, price_per_h=price, hours=hours,
                                dollars=tuple(round(h * price, 2) for h in hours), spec=plan.card,
                                on_demand_per_h=on_demand.get((key[0], r["region"], r["instance"]))))
        return rows

    def too_big(self, best: Offer, cards: tuple[CardChoice, ...]) -> str | None:
        """A loud line when the offer the run takes is expected above LONG_HOURS or BIG_DOLLARS, naming the
        cheapest card that stays under both, else the largest subset that does on the fastest card, and the
        largest subset that does on this card."""
        hours, dollars = best.hours[1], best.dollars[1]
        if hours <= LONG_HOURS and dollars <= BIG_DOLLARS:
            return None
        ways = []
        under = [c for c in cards if c.hours[1] <= LONG_HOURS and c.dollars[1] <= BIG_DOLLARS]
        fastest = next((c for c in cards if "fastest" in c.marks), None)
        if under:
            c = min(under, key=lambda c: (c.dollars[1], c.hours[1]))
            ways.append(f"--gpu {c.card}:{c.count} ({c.hours[1]:.1f} h, ${c.dollars[1]:,.0f} on {c.offer})")
        elif fastest is not None and (fastest.card, fastest.count) != (best.card, best.count):
            if found := self.subset_under(fastest.spec, fastest.count, fastest.price_per_h):
                ways.append(f"--gpu {fastest.card}:{fastest.count} --subset {found[0]:g} ({found[1]:.1f} h, "
                            f"${found[1] * fastest.price_per_h:,.0f})")
        if found := self.subset_under(best.spec or best.card, best.count, best.price_per_h):
            ways.append(f"--subset {found[0]:g} on {best.card}:{best.count} ({found[1]:.1f} h, "
                        f"${found[1] * best.price_per_h:,.0f})")
        return (f"LONG RUN: expected {hours:,.1f} h and ${dollars:,.0f} on {best.card}:{best.count} ({best.cloud} "
                f"{best.instance} at ${best.price_per_h:.2f}/h). "
                + (f"Under {LONG_HOURS:g} h and ${BIG_DOLLARS:g}: {', or '.join(ways)}" if ways else
                   f"No card or subset here brings it under {LONG_HOURS:g} h and ${BIG_DOLLARS:g}"))

    def subset_under(self, card: str, count: int, price_per_h: float) -> tuple[float, float] | None:
        """(subset, expected hours): the largest data.subset, two significant digits, below the config's,
        whose expected hours and dollars on `count` x `card` stay within LONG_HOURS and BIG_DOLLARS; None
        when even 0.001 doesn't."""
        def expected_h(subset: float) -> float:
            c = self.cfg.with_overrides({"data.subset": subset})
            tokens = count_tokens(c, self.data)
            return plan_card(c, self.table, card, count, self.params_b, tokens, False).hours(self.spot)[1]

        def fits(subset: float) -> bool:
            h = expected_h(subset)
            return h <= LONG_HOURS and h * price_per_h <= BIG_DOLLARS

        lo, hi = 0.001, float(self.cfg.data.subset)
        if hi <= lo or not fits(lo):
            return None
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        digits = 1 - math.floor(math.log10(lo))
        subset = math.floor(lo * 10 ** digits) / 10 ** digits
        return subset, expected_h(subset)


def _memory_notes(run: _Run, p: CardPlan) -> list[str]:
    """A card the job trains on in its lean memory mode, or refuses; fp8 asked for on a card without it."""
    cfg, table, params_b = run.cfg, run.table, run.params_b
    method, notes = cfg.train.method, []
    need = (full_need_gib(cfg, params_b, p.count, run.tokens) if method == "full"
            else min_memory_gib(table, method, params_b))
    have = table["cards"][p.card]["memory_gib"]
    if p.memory_mode == "lean":
        notes.append(f"{p.card}:{p.count} has {have} GiB per card: the job trains in its lean memory mode there "
                     f"(every layer recomputed, checkpoints offloaded to host memory; the fast mode needs about "
                     f"{need:.0f} GiB) at ~{p.tokens_per_s:,.0f} tok/s, derived from the lean mode's H200 rate")
    elif p.memory_mode is None:
        lean = lean_min_memory_gib(table, method, params_b)
        also = f", {lean:.0f} GiB in the lean memory mode" if lean and cfg.train.memory_mode != "fast" else ""
        notes.append(f"{p.card}:{p.count} has {have} GiB per card; {method} at {params_b:.1f}B needs "
                     f"about {need:.0f} GiB{also} (the job's `check` will refuse it)")
    if cfg.train.fp8 and p.card not in (table.get("fp8_cards") or ()):
        notes.append(f"train.fp8: {p.card} has no fp8 tensor cores; the job trains in bf16 there (the bf16 rate)")
    return notes


def _spot_note(plans: list[CardPlan], best: Offer) -> list[str]:
    plan = next((q for q in plans if q.card == best.spec), plans[0] if plans else None)
    if plan is None:
        return []
    a, od = plan.preemption_allowance(), best.on_demand_per_h
    return [f"spot (a managed job: a preemption relaunches it and it resumes from its newest checkpoint): preemption "
            f"allowance {a['preemptions']:.2f} expected preemptions ({a['rate_per_h']:g}/h, assumed) x "
            f"({a['restart_s'] / 60:.0f} min restart + {a['half_interval_s'] / 60:.1f} min, half a checkpoint "
            f"interval) = {a['expected_s'] / 3600:.2f} h on the expected hours, {a['high_s'] / 3600:.2f} h on the "
            f"high end (twice the rate); on demand the cheapest offer is "
            + (f"${od:.2f}/h" if od is not None else "not in the catalog")]


def _unfetched(clouds: dict) -> str:
    return (f"SkyPilot could not fetch its price catalog for {', '.join(sorted(clouds))} (offline?) and has "
            "none cached: check the network and run this again")


def card_choices(offers: list[Offer], plans: list[CardPlan], asked: Offer | None) -> tuple[CardChoice, ...]:
    """Each card's cheapest offer (`offers` sorted by expected dollars), marked: the one asked for (the offer
    the run takes), the cheapest, the fastest. Nothing to choose from with fewer than two cards."""
    best: dict[tuple[str, int], Offer] = {}
    for o in offers:
        best.setdefault((o.spec or o.card, o.count), o)
    if len(best) < 2:
        return ()
    modes = {(p.card, p.count): p.memory_mode for p in plans}
    fastest = min(best.values(), key=lambda o: (o.hours[1], o.dollars[1]))
    cheapest = min(best.values(), key=lambda o: (o.dollars[1], o.hours[1]))
    rows = [CardChoice(card=o.card, count=o.count, spec=spec, memory_mode=modes.get((spec, count)), hours=o.hours,
                       price_per_h=o.price_per_h, dollars=o.dollars, offer=f"{o.cloud} {o.region} {o.instance}",
                       marks=tuple(m for m, hit in (("asked", o is asked), ("cheapest", o is cheapest),
                                                    ("fastest", o is fastest)) if hit))
            for (spec, count), o in best.items()]
    return tuple(sorted(rows, key=lambda c: (c.dollars[1], c.hours[1])))


def methods_side_by_side(cfg: RunConfig, est: Estimate) -> list[dict]:
    """QLoRA and LoRA on the estimate's card (its cheapest offer's price), when the card fits both: for
    each, tok/s, hours and dollars (low / expected / high) and the GiB it needs. Only shown: the run
    trains with the method its config names (train.method); [] for full or a card that fits one."""
    plan, best = est.plan, est.cheapest
    if cfg.train.method not in ADAPTER_METHODS or plan is None or plan.count != 1:
        return []
    table = load_throughput()
    rows = []
    for method in ADAPTER_METHODS:
        other = cfg.with_overrides({"train.method": method}, source="methods side by side")
        p = plan if method == cfg.train.method else plan_card(other, table, plan.card, 1, est.params_b, est.tokens,
                                                                 local=est.infra.startswith(LOCAL_INFRA_PREFIXES))
        if p.memory_mode is None:
            return []
        need = (min_memory_gib if p.memory_mode == "fast" else lean_min_memory_gib)(table, method, est.params_b)
        hours = p.hours(est.spot)
        rows.append({"method": method, "card": plan.card, "card_gib": float(table["cards"][plan.card]["memory_gib"]),
                     "need_gib": round(need or 0, 1), "memory_mode": p.memory_mode,
                     "tokens_per_s": round(p.tokens_per_s), "hours": list(hours),
                     "dollars": [round(h * best.price_per_h, 2) for h in hours] if best else None,
                     "chosen": method == cfg.train.method})
    return rows
