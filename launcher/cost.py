"""What a run will cost before it starts: hours and dollars per cloud offer, and the caps on both.

    est = estimate_run(cfg, gpu="A100:1", cloud=None, spot=False, data=None, infra="sky")
    render(est, console, explain=True)
    deadline_s = deadline_for(est, max_cost=20.0, max_hours=None)

Hours = fixed costs (provisioning, image, model download + 4-bit load, dataset, evaluation, adapter
download, teardown) + training = tokens / throughput(card, method, model size), where
  tokens      exact from a prepared folder's stats.json (`python -m job prepare`), or for the hub
              dataset from configs/socsci210_stats.json (shipped, derived once, see that file);
  throughput  configs/throughput.yaml (measured on H100/H200 by bench/cost_accuracy.py, other
              cards derived from datasheet ratios and marked so);
  steps       the schedule's own: rows x epochs / global batch, capped by max_steps.
Low/high bands: token band (exact: none; hub: a bootstrap over the sample's studies) times the
throughput band (measured +-10%, derived +-30%), plus each fixed term's own range. Spot offers
add a preemption allowance to the high end only. Prices come from SkyPilot's catalog through
launcher/sky_adapter.py (the only module that imports sky); nothing here imports torch or sky.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from contracts.config import RunConfig
from contracts.errors import ContractError
from launcher import resources

THROUGHPUT_FILE = resources.path("configs/throughput.yaml")  # shipped in the package (launcher/resources)
HUB_STATS_FILE = resources.path("configs/socsci210_stats.json")
HUB_DATASET = "socratesft/SocSci210"
LOCAL_INFRA_PREFIXES = ("local", "ssh://")
# Bandwidth assumptions (MB/s) for low / expected / high time: cloud VM <-> Hugging Face, and laptop <-> VM.
CLOUD_MBPS = (500.0, 200.0, 60.0)
LAPTOP_MBPS = (50.0, 20.0, 5.0)
# Spot as a managed job (#15): a preemption relaunches the job on new capacity, which resumes from its newest
# complete checkpoint in the bucket. Each preemption costs a restart (every fixed term before training again:
# provisioning, setup, model/data download, load, prepare, trainer startup) plus half a checkpoint interval of
# training repeated, on average. The rate is an assumption, not a measurement: SPOT_PREEMPTIONS_PER_H expected
# preemptions per hour of the run (about one in ten hours) on the expected hours, twice that on the high end.
SPOT_PREEMPTIONS_PER_H = 0.1
_NOT_RESTARTED = ("training", "checkpoints", "evaluation", "adapter download", "teardown")
# After the deadline the job gets this long to save, then the wrapper hard-kills it.
DEADLINE_GRACE_S = 300.0
MAX_CAP_HOURS = 8760.0      # a year of machine time: above it a cap is a typo, and overflows the remote arithmetic
MAX_CAP_DOLLARS = 1_000_000.0
MIN_DEADLINE_S = 60.0       # a cap that leaves the job less than this is no run at all
# Without a cap, a cloud run still gets a remote deadline: a job that hangs is not idle, so autodown
# alone would never end it. Generous: twice the high estimate, and at least an hour more than it.
SAFETY_FACTOR = 2.0
SAFETY_MIN_EXTRA_S = 3600.0
SHOWN_OFFERS = 12
# Above either, on the offer the run would take, the estimate warns and names a card or subset that stays under.
LONG_HOURS = 24.0
BIG_DOLLARS = 100.0
# train.method full writes the whole model (job/full.py: out/model/, safetensors in the training precision):
# ~2 bytes a parameter in bf16, pulled back to your machine by default like an adapter.
FULL_OUTPUT_BYTES_PER_PARAM = 2


# --- what an estimate is ---------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One line of the hours sum, in seconds, with how it was computed."""

    name: str
    low_s: float
    expected_s: float
    high_s: float
    how: str


@dataclass(frozen=True)
class Tokens:
    """The training tokens the schedule will really consume, and where the counts came from."""

    train_rows: int
    """Training rows after the subset (one epoch)."""
    trained_rows: int
    """Rows the schedule feeds: steps x global batch, bounded by rows x epochs."""
    steps: int
    tokens: float
    low: float
    high: float
    test_rows: int
    prompt_tokens_per_row: float
    exact: bool
    source: str
    kind: str = "hub"
    """hub | prepared | raw | synthetic: decides the dataset transfer and prepare terms."""
    data_bytes: int = 0
    split: str = ""
    """The split the rows are counted for (a prepared folder's own, else the config's data.split)."""


@dataclass(frozen=True)
class CardPlan:
    """The hours for one kind of card (every offer of that card shares them)."""

    card: str
    count: int
    tokens_per_s: float
    throughput_band: float
    throughput_how: str
    terms: tuple[Term, ...]
    memory_mode: str | None = "fast"
    """The job's memory mode on this card: fast | lean (a card too small for fast) | None (fits neither)."""
    checkpoint_interval_s: float = 0.0
    """Expected training seconds between checkpoints (the whole training when it saves only at the end)."""

    def hours(self, spot: bool = False) -> tuple[float, float, float]:
        low = sum(t.low_s for t in self.terms) / 3600
        exp = sum(t.expected_s for t in self.terms) / 3600
        high = sum(t.high_s for t in self.terms) / 3600
        if spot:
            allowance = self.preemption_allowance()
            exp += allowance["expected_s"] / 3600
            high += allowance["high_s"] / 3600
        return low, exp, high

    def preemption_allowance(self) -> dict:
        """Spot's expected cost of preemptions (SPOT_PREEMPTIONS_PER_H): preemptions x (restart + half a
        checkpoint interval), on the expected hours and, at twice the rate, on the high ones."""
        restart_exp = sum(t.expected_s for t in self.terms if t.name not in _NOT_RESTARTED)
        restart_high = sum(t.high_s for t in self.terms if t.name not in _NOT_RESTARTED)
        n_exp = SPOT_PREEMPTIONS_PER_H * sum(t.expected_s for t in self.terms) / 3600
        n_high = 2 * SPOT_PREEMPTIONS_PER_H * sum(t.high_s for t in self.terms) / 3600
        half = self.checkpoint_interval_s / 2
        return {"rate_per_h": SPOT_PREEMPTIONS_PER_H, "preemptions": n_exp, "preemptions_high": n_high,
                "restart_s": restart_exp, "half_interval_s": half,
                "expected_s": n_exp * (restart_exp + half), "high_s": n_high * (restart_high + half)}


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
    spec: str = ""
    """The throughput-table card behind the hours (e.g. H100-PCIE for a PCIe H100 instance)."""
    on_demand_per_h: float | None = None
    """For a spot offer: the same instance's on-demand price (None when the catalog has none)."""


@dataclass(frozen=True)
class CardChoice:
    """One card's cheapest offer for this run: a row of the card table (`estimate`, `up` before asking)."""

    card: str
    """SkyPilot's name, what --gpu takes."""
    count: int
    spec: str
    """The throughput-table card behind the hours (H100-PCIE for a PCIe H100 instance)."""
    memory_mode: str | None
    hours: tuple[float, float, float]
    price_per_h: float
    dollars: tuple[float, float, float]
    offer: str
    """cloud region instance of that cheapest offer."""
    marks: tuple[str, ...] = ()
    """asked | cheapest | fastest."""


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
    cards: tuple[CardChoice, ...] = ()
    """The same run on each card the catalog offers that fits (its cheapest offer), cheapest first."""
    warning: str | None = None
    """Said loudly: the run takes over LONG_HOURS or BIG_DOLLARS, and what would bring it under."""

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
        best = self.cheapest
        if best is not None:
            return next(p for p in self.plans if p.card == (best.spec or best.card) and p.count == best.count)
        return self.plans[0] if self.plans else None

    @property
    def hours(self) -> tuple[float, float, float] | None:
        best = self.cheapest
        if best is not None:
            return best.hours
        return self.plan.hours(self.spot) if self.plan else None


# --- the entry point -------------------------------------------------------------------------

def estimate_run(cfg: RunConfig, gpu: Any = None, cloud: str | None = None, spot: bool = False,
                 data: str | None = None, infra: str = "sky", allow_unpriced: bool = False,
                 nodes: int = 1) -> Estimate:
    """Hours and dollars of `cfg` on `gpu` ("A100:1", a GpuSpec, or None for every card that fits).

    SkyPilot's catalog is read offline when cached; a catalog that cannot be fetched falls back to
    the copy SkyPilot cached last (a note gives its date), and with none at all `allow_unpriced`
    returns the tokens and hours with "price unknown" (`estimate`) instead of refusing (`up`).
    `nodes`: that many machines of `gpu` each; the rate is per-GPU rate x all GPUs x the multi-GPU
    efficiency, and every node is priced."""
    table = load_throughput()
    params_b = model_params_b(cfg)
    local = infra.startswith(LOCAL_INFRA_PREFIXES)
    tokens = count_tokens(cfg, data)
    notes: list[str] = []
    if not tokens.exact:
        notes.append(f"tokens approximate: {tokens.source}")

    if gpu is not None:
        spec = _parse_gpu(gpu)
        candidates = [(_check_card(spec.name, table), spec.count * nodes)]
    elif local:
        candidates = []
    else:
        candidates = [(c, 1) for c in fitting_cards(table, cfg.train.method, params_b, cfg.train.memory_mode)]

    plans = [plan_card(cfg, table, card, count, params_b, tokens, local) for card, count in candidates]
    for p in plans:
        need = min_memory_gib(table, cfg.train.method, params_b)
        if cfg.train.method == "full":
            need = full_need_gib(params_b, p.count)
        have = table["cards"][p.card]["memory_gib"]
        if p.memory_mode == "lean":
            notes.append(f"{p.card}:{p.count} has {have} GiB per card: the job trains in its lean memory mode there "
                         f"(every layer recomputed, checkpoints offloaded to host memory; the fast mode needs about "
                         f"{need:.0f} GiB) at ~{p.tokens_per_s:,.0f} tok/s, derived from the lean mode's H200 rate")
        elif p.memory_mode is None:
            lean = lean_min_memory_gib(table, cfg.train.method, params_b)
            also = f", {lean:.0f} GiB in the lean memory mode" if lean and cfg.train.memory_mode != "fast" else ""
            notes.append(f"{p.card}:{p.count} has {have} GiB per card; {cfg.train.method} at {params_b:.1f}B needs "
                         f"about {need:.0f} GiB{also} (the job's `check` will refuse it)")
        if cfg.train.fp8 and p.card not in (table.get("fp8_cards") or ()):
            notes.append(f"train.fp8: {p.card} has no fp8 tensor cores; the job trains in bf16 there (the bf16 rate)")

    offers: list[Offer] = []
    cards: tuple[CardChoice, ...] = ()
    warning = None
    if not local:
        from launcher import sky_adapter

        for p in list(plans):
            rows = _offers_of(cfg, table, p, plans, params_b, tokens, cloud, spot, nodes, offers)
            unfetched = getattr(sky_adapter, "CATALOG_UNFETCHED", {})
            if not rows and unfetched and not allow_unpriced:
                raise ContractError(_unfetched(unfetched))
            if not rows and gpu is not None and not (unfetched and allow_unpriced):
                where = f" on {cloud}" if cloud else ""
                kind = "spot " if spot else ""
                failed = getattr(sky_adapter, "CATALOG_ERRORS", {})
                why = f"; catalog unreadable for {', '.join(sorted(failed))}" if failed else ""
                raise ContractError(f"--gpu {p.card}:{p.count}: SkyPilot's catalog has no {kind}price for it{where} "
                                    f"(try another card or cloud; `sky show-gpus` lists them){why}")
        for name, date in sorted(getattr(sky_adapter, "CATALOG_STALE", {}).items()):
            notes.append(f"SkyPilot's {name} catalog could not be fetched (offline?): prices from the copy it "
                         f"cached{' on ' + date if date else ''}")
        unfetched = getattr(sky_adapter, "CATALOG_UNFETCHED", {})
        if not offers and unfetched and allow_unpriced:
            notes.append(f"price unknown: {_unfetched(unfetched)}")
            return Estimate(infra=infra, method=cfg.train.method, model=cfg.model.id, params_b=params_b,
                            tokens=tokens, plans=tuple(plans), offers=(), spot=spot, notes=tuple(notes))
        if not offers:
            failed = getattr(sky_adapter, "CATALOG_ERRORS", {})
            why = f"; catalog unreadable for {', '.join(sorted(failed))} (offline? `sky show-gpus` fetches it)" if failed else ""
            raise ContractError(f"no priced offer in SkyPilot's catalog for any card that fits"
                                f"{' on ' + cloud if cloud else ''} (pass --gpu NAME:COUNT, or another --cloud){why}")
        offers.sort(key=lambda o: (o.dollars[1], o.price_per_h, o.cloud, o.region))
        offers[0] = replace(offers[0], cheapest=True)
        if nodes == 1:
            count = offers[0].count if gpu is not None else 1
            others = [c for c in fitting_cards(table, cfg.train.method, params_b, cfg.train.memory_mode)
                      if not any(p.card == c and p.count == count for p in plans)]
            alt_plans = [plan_card(cfg, table, c, count, params_b, tokens, local) for c in others]
            alt_offers: list[Offer] = []
            for p in list(alt_plans):
                _offers_of(cfg, table, p, alt_plans, params_b, tokens, cloud, spot, nodes, alt_offers)
            cards = card_choices(offers + sorted(alt_offers, key=lambda o: o.dollars[1]), plans + alt_plans,
                                 asked=offers[0] if gpu is not None else None)
        warning = too_big(cfg, table, offers[0], cards, params_b, data, spot)
        if spot:
            best = next((q for q in plans if q.card == offers[0].spec), plans[0] if plans else None)
            a = best.preemption_allowance() if best else None
            od = offers[0].on_demand_per_h
            if a:
                notes.append(f"spot (a managed job: a preemption relaunches it and it resumes from its newest "
                             f"checkpoint): preemption allowance {a['preemptions']:.2f} expected preemptions "
                             f"({a['rate_per_h']:g}/h, assumed) x ({a['restart_s'] / 60:.0f} min restart + "
                             f"{a['half_interval_s'] / 60:.1f} min, half a checkpoint interval) = "
                             f"{a['expected_s'] / 3600:.2f} h on the expected hours, {a['high_s'] / 3600:.2f} h on "
                             f"the high end (twice the rate); on demand the cheapest offer is "
                             + (f"${od:.2f}/h" if od is not None else "not in the catalog"))
    else:
        notes.append(f"infra {infra}: your own machine, no cloud price")
    if not local:  # the measured rate and its levers are the cloud machine's, not this one's
        notes.extend(rate_levers(table, cfg, params_b))

    if any(p.count > 1 for p in plans):
        eff, how = multi_gpu_efficiency(table, max(p.count for p in plans))
        notes.append(f"multi-GPU: rate = per-GPU rate x GPUs x {eff} scaling efficiency ({how}; bench/scale.py measures it)")
    if cfg.train.method == "full" and not local:
        notes.append(full_output_note(params_b))
    if nodes > 1:
        notes.append(f"{nodes} nodes: the price is {nodes} machines' and the rate that of all {nodes} x "
                     f"{(plans[0].count // nodes) if plans else '?'} GPUs")
    return Estimate(infra=infra, method=cfg.train.method, model=cfg.model.id, params_b=params_b, tokens=tokens,
                    plans=tuple(plans), offers=tuple(offers), spot=spot, notes=tuple(notes), cards=cards,
                    warning=warning)



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


def too_big(cfg: RunConfig, table: dict, best: Offer, cards: tuple[CardChoice, ...], params_b: float,
            data: str | None, spot: bool) -> str | None:
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
        found = subset_under(cfg, table, fastest.spec, fastest.count, fastest.price_per_h, params_b, data, spot)
        if found is not None:
            ways.append(f"--gpu {fastest.card}:{fastest.count} --subset {found[0]:g} ({found[1]:.1f} h, "
                        f"${found[1] * fastest.price_per_h:,.0f})")
    found = subset_under(cfg, table, best.spec or best.card, best.count, best.price_per_h, params_b, data, spot)
    if found is not None:
        ways.append(f"--subset {found[0]:g} on {best.card}:{best.count} ({found[1]:.1f} h, "
                    f"${found[1] * best.price_per_h:,.0f})")
    return (f"LONG RUN: expected {hours:,.1f} h and ${dollars:,.0f} on {best.card}:{best.count} ({best.cloud} "
            f"{best.instance} at ${best.price_per_h:.2f}/h). "
            + (f"Under {LONG_HOURS:g} h and ${BIG_DOLLARS:g}: {', or '.join(ways)}" if ways else
               f"No card or subset here brings it under {LONG_HOURS:g} h and ${BIG_DOLLARS:g}"))


def subset_under(cfg: RunConfig, table: dict, card: str, count: int, price_per_h: float, params_b: float,
                 data: str | None, spot: bool) -> tuple[float, float] | None:
    """(subset, expected hours): the largest data.subset, two significant digits, below the config's, whose
    expected hours and dollars on `count` x `card` at `price_per_h` stay within LONG_HOURS and BIG_DOLLARS;
    None when even 0.001 doesn't."""
    def expected_h(subset: float) -> float:
        c = cfg.with_overrides({"data.subset": subset})
        return plan_card(c, table, card, count, params_b, count_tokens(c, data), False).hours(spot)[1]

    def fits(subset: float) -> bool:
        h = expected_h(subset)
        return h <= LONG_HOURS and h * price_per_h <= BIG_DOLLARS

    lo, hi = 0.001, float(cfg.data.subset)
    if hi <= lo or not fits(lo):
        return None
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    digits = 1 - math.floor(math.log10(lo))
    subset = math.floor(lo * 10 ** digits) / 10 ** digits
    return subset, expected_h(subset)


def _offers_of(cfg: RunConfig, table: dict, p: CardPlan, plans: list[CardPlan], params_b: float, tokens: Tokens,
               cloud: str | None, spot: bool, nodes: int, offers: list[Offer]) -> list[dict]:
    """Append the catalog's offers of plan `p`'s card to `offers` (a PCIe variant's plan is added to
    `plans`); returns the catalog rows found."""
    from launcher import sky_adapter

    per_node = p.count // nodes
    rows = sky_adapter.list_offers(p.card, per_node, cloud, spot)
    on_demand = {(r["cloud"], r["region"], r["instance"]): float(r["price_per_h"]) * nodes
                 for r in (sky_adapter.list_offers(p.card, per_node, cloud, False) if spot and rows else ())}
    for r in rows:
        # SkyPilot names PCIe and SXM H100s alike; the instance says which, and PCIe is slower.
        plan = p
        variant = f"{p.card}-PCIE"
        if "pcie" in str(r["instance"]).lower() and variant in table["cards"]:
            plan = next((q for q in plans if q.card == variant and q.count == p.count), None) or \
                plan_card(cfg, table, variant, p.count, params_b, tokens, False)
            if plan not in plans:
                plans.append(plan)
        hours = plan.hours(spot)
        price = float(r["price_per_h"]) * nodes  # every node bills
        offers.append(Offer(cloud=str(r["cloud"]), region=str(r["region"]), instance=str(r["instance"]),
                            card=p.card, count=p.count, spot=spot, price_per_h=price, hours=hours,
                            dollars=tuple(round(h * price, 2) for h in hours), spec=plan.card,
                            on_demand_per_h=on_demand.get((str(r["cloud"]), r["region"], r["instance"]))))
    return rows


# --- term 1: tokens --------------------------------------------------------------------------

def count_tokens(cfg: RunConfig, data: str | None = None) -> Tokens:
    """Training tokens and steps for `cfg` on `data` (or cfg.data.source)."""
    source = data or cfg.data.source
    d = cfg.data
    path = Path(source)
    if path.is_dir() and (path / "stats.json").is_file():
        return _from_prepared(cfg, path / "stats.json")
    if path.exists():
        return _from_raw_local(cfg, path)
    if source.startswith("synthetic:"):
        n = source.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ContractError(f"--data {source!r}: synthetic:N needs a whole number of rows N >= 1")
        hub = load_hub_stats()
        train = synthetic_train_rows(int(n), d.split, d.subset)
        if train is None:
            train = round(int(n) * _train_share(hub, d) * d.subset)
        return _schedule(cfg, train, int(n) - train if d.subset >= 1 else
                         round(int(n) * (1 - _train_share(hub, d))), hub, exact=False, kind="synthetic",
                         how=f"{source}: generated rows, tokens per row from the shipped SocSci210 mean")
    if source.startswith((".", "/", "~")) or path.suffix in (".jsonl", ".json", ".parquet"):
        raise ContractError(f"--data {source!r}: no such file or folder (a prepared folder with stats.json, "
                            "a local .jsonl/.parquet file or folder, or the hub id socratesft/SocSci210)")
    if source.rstrip("/") != HUB_DATASET:
        raise ContractError(f"--data {source!r}: no token stats for this hub dataset (accepted: {HUB_DATASET}, "
                            "or prepare it with `python -m job prepare --out DIR` and pass --data DIR)")
    hub = load_hub_stats()
    rows = hub["splits"].get(d.split)
    if rows:
        train_all, test_all, where = rows["train"], rows["test"], "rows from the SOCRATES paper (arXiv 2509.05830)"
    else:
        share = _train_share(hub, d)
        train_all, test_all = round(hub["total_rows"] * share), round(hub["total_rows"] * (1 - share))
        where = f"rows approximate ({share:.0%} of {hub['total_rows']:,} for split {d.split})"
    # The subset is stratified by study and keeps >= 1 row per study: the rounding is negligible.
    test = test_all if d.eval_subset is None else round(test_all * d.eval_subset)
    return _schedule(cfg, round(train_all * d.subset), test, hub, exact=False,
                     how=f"{HUB_DATASET}: {where}, tokens per row from configs/socsci210_stats.json")


def _from_prepared(cfg: RunConfig, stats_file: Path) -> Tokens:
    try:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        train, test = stats["train"], stats["test"]
        rows, total = int(train["rows"]), float(train["tokens"]["total"])
        test_rows, test_mean = int(test["rows"]), float(test["tokens"]["mean"])
    except (ValueError, KeyError, TypeError) as e:
        raise ContractError(f"--data {stats_file.parent}: unreadable stats.json ({type(e).__name__}: {e}); "
                            "re-run `python -m job prepare`") from None
    how = f"{stats_file}: exact counts by `job prepare` with tokenizer {stats.get('tokenizer', '?')}"
    prepared_subset = float(stats.get("subset") or 1.0)
    scale = 1.0
    if abs(prepared_subset - cfg.data.subset) > 1e-9 and cfg.data.subset < prepared_subset:
        scale = cfg.data.subset / prepared_subset
        how += f", scaled x{scale:.4g} from its subset {prepared_subset:g} to {cfg.data.subset:g}"
    mean = total / rows if rows else 0.0
    # The answer is a few tokens; evaluation prompts are the training sequence minus it.
    size = sum(f.stat().st_size for f in stats_file.parent.rglob("*") if f.is_file())
    return _schedule(cfg, max(1, round(rows * scale)), test_rows, None, exact=scale == 1.0, how=how,
                     kind="prepared", data_bytes=size, mean=mean, total=total * scale if scale != 1.0 else total,
                     prompt_mean=max(1.0, test_mean - 4), split=_split_name(stats.get("split"), stats.get("participant_fraction")))


def _from_raw_local(cfg: RunConfig, path: Path) -> Tokens:
    n = count_rows(path)
    hub = load_hub_stats()
    share = _train_share(hub, cfg.data)
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    return _schedule(cfg, max(1, round(n * share * cfg.data.subset)), round(n * (1 - share)), hub, exact=False,
                     kind="raw", data_bytes=size,
                     how=f"{path}: {n:,} rows counted, tokens per row from the shipped SocSci210 mean "
                         "(run `python -m job prepare --out DIR` and pass --data DIR for exact counts)")


def _schedule(cfg: RunConfig, train_rows: int, test_rows: int, hub: dict | None, exact: bool, how: str,
              kind: str = "hub", data_bytes: int = 0, mean: float | None = None, total: float | None = None,
              prompt_mean: float | None = None, split: str | None = None) -> Tokens:
    """Steps the schedule takes, and the tokens those steps consume (packed: no padding)."""
    t = cfg.train
    train_rows = max(1, train_rows)
    steps = t.total_steps(train_rows)
    trained_rows = min(train_rows * t.epochs, steps * t.global_batch)
    if hub is not None:
        tpr = hub["tokens_per_row"]
        mean, lo, hi = tpr["mean"], tpr["low"], tpr["high"]
        prompt_mean = mean - 4
    else:
        lo = hi = mean
    tokens = total * trained_rows / train_rows if (total is not None and exact) else trained_rows * mean
    return Tokens(train_rows=train_rows, trained_rows=int(math.ceil(trained_rows)), steps=steps, tokens=tokens,
                  low=tokens * lo / mean if mean else tokens, high=tokens * hi / mean if mean else tokens,
                  test_rows=max(0, test_rows), prompt_tokens_per_row=prompt_mean or 0.0, exact=exact, source=how,
                  kind=kind, data_bytes=data_bytes,
                  split=split if split is not None else _split_name(cfg.data.split, cfg.data.participant_fraction))


def synthetic_train_rows(n: int, split: str, subset: float) -> int | None:
    """Training rows the job gets from `synthetic:n`, where that follows from n alone (else None).

    Mirrors job/synthetic.generate (n rows dealt round-robin over max(4, min(40, n // 30)) studies)
    and job/data.split_rows (20% of the studies, at least 1, held out; `random`: 20% of the rows), so
    the demo's header says the rows the job trains; tests/test_launcher_firsthour.py checks it against
    the job's own prepare. Per-study counts differ when n is not a multiple of the studies, and then
    which studies are held out decides: None."""
    if subset < 1:
        return None
    if split == "random":
        return n - max(1, round(n * 0.2))
    studies = max(4, min(40, n // 30))
    if split != "unseen-studies" or n % studies:
        return None
    held = min(studies - 1, max(1, round(studies * 0.2)))
    return n - held * (n // studies)


def count_rows(path: Path) -> int:
    """Rows in a local .jsonl/.parquet file or a folder of them (no tokenizer: the launcher has no torch).

    Also the look at the data before a machine is paid for: every row is checked against the job's
    schema (launcher/rows.py, contracts/rows.py)."""
    from launcher.rows import check_local

    return check_local(path)


def _train_share(hub: dict, d) -> float:
    """The share of rows that trains under data section `d`'s split (unseen-participants: about its
    participant_fraction, as rows per participant are alike within a study)."""
    rows = hub["splits"].get(d.split)
    if rows:
        return rows["train"] / (rows["train"] + rows["test"])
    if d.split == "unseen-participants":
        return d.participant_fraction
    return float(hub["approx_train_share"].get(d.split, 0.8))


def _split_name(split: Any, fraction: Any) -> str:
    """The split as the estimate names it: unseen-participants with its fraction of participants in training
    (a prepared folder's stats.json is read back: anything odd in it is shown as it is, never trusted)."""
    if split == "unseen-participants" and isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
        return f"{split}, {fraction:g} of each study's participants in training"
    return " ".join(str(split or "unknown").split())[:40]


# --- term 2: throughput ----------------------------------------------------------------------

def rate_levers(table: dict, cfg: RunConfig, params_b: float) -> list[str]:
    """What the throughput rate assumes: the speed levers and package versions it was measured with
    (configs/throughput.yaml), and a warning for each lever this config turns off."""
    size, entry = _nearest_size(table["measured"].get(cfg.train.method) or {}, params_b, cfg.train.method)
    if "derived_from" in entry:
        size, entry = _nearest_size(table["measured"][entry["derived_from"]], size, entry["derived_from"])
    levers, packages = entry.get("levers"), entry.get("packages")
    if not levers:
        return []
    on = [f"{k} {v}" if not isinstance(v, bool) else k for k, v in levers.items() if v]
    off = [k for k, v in levers.items() if v is False]
    line = f"rate assumes speed levers: {', '.join(on)}" + (f" (off: {', '.join(off)})" if off else "")
    if packages:
        line += "; with " + ", ".join(f"{k} {v}" for k, v in packages.items())
    notes = [line]
    t = cfg.train
    config_off = [name for name, is_off in (("liger", not t.liger), ("flex_attention", t.attn_implementation not in ("auto", "flex_attention")),
                                            ("fused_lora", not t.fused_lora), ("packing", not t.packing)) if is_off and levers.get(name)]
    if config_off:
        notes.append(f"this config turns off {', '.join(config_off)}: expect a slower run than this rate")
    return notes


def memory_mode(table: dict, card: str, method: str, params_b: float, wanted: str = "auto") -> str | None:
    """The memory mode the job will pick on one `card` (job/check.py plan_memory decides on the machine
    from its fit estimate; this mirrors it with the table's thresholds): 'fast' when the card has
    min_memory_gib, 'lean' when it has the lean mode's (and the table measured the lean mode for this
    method), None when neither fits. train.memory_mode fast never goes lean; lean always does."""
    have = float(table["cards"][card]["memory_gib"])
    lean_need = lean_min_memory_gib(table, method, params_b)
    lean_ok = lean_need is not None and have >= lean_need
    if wanted == "lean":
        return "lean" if lean_ok else None
    if have >= min_memory_gib(table, method, params_b):
        return "fast"
    return "lean" if lean_ok and wanted != "fast" else None


def lean_min_memory_gib(table: dict, method: str, params_b: float) -> float | None:
    need = (table.get("lean_min_memory_gib") or {}).get(method)
    if need is None or not (table.get("lean") or {}).get(method):
        return None
    return float(need) * params_b / 14.0


def fp8_rate(table: dict, cfg: RunConfig, card: str) -> bool:
    """Whether the fp8 row applies: train.fp8, a card with fp8 tensor cores, and a row for the method."""
    return bool(cfg.train.fp8 and card in (table.get("fp8_cards") or ()) and (table.get("fp8") or {}).get(cfg.train.method))


def card_throughput(table: dict, card: str, method: str, params_b: float, count: int = 1,
                    mode: str = "fast") -> tuple[float, float, str]:
    """(tokens/s for `count` cards, relative band, how) from configs/throughput.yaml; `mode` 'lean'
    reads the lean memory mode's measured row instead of the fast one, 'fp8' the fp8 fast mode's."""
    ref = table["reference"]
    rows = (table.get(mode) or {}) if mode in ("lean", "fp8") else table["measured"]  # fp8: a rate, not a memory mode
    size, entry = _nearest_size(rows.get(method) or {}, params_b, method)
    ratio_how = ""
    if "derived_from" in entry:
        base_size, base = _nearest_size(table["measured"][entry["derived_from"]], size, entry["derived_from"])
        tps = float(base["tokens_per_s"]) * float(entry["ratio"])
        # a ratio measured beside the base method (card, date) or assumed
        ratio_how = (f"{entry['derived_from']} x {entry['ratio']} (measured on {entry['card']}, {entry['date']}) "
                     if entry.get("date") else f"{entry['derived_from']} x {entry['ratio']} (derived) ")
        measured = base
    else:
        tps, measured = float(entry["tokens_per_s"]), entry
    measured_card = measured.get("card") or ref
    derived = ("derived_from" in entry and not entry.get("date")) or not measured.get("date")
    label = {"lean": "lean memory mode: ", "fp8": "fp8 fast mode: "}.get(mode, "")
    how = (f"{ratio_how}{label}{method} {size:g}B on {measured_card}: "
           f"{tps:,.0f} tok/s ({measured.get('command', 'prior')})")
    if card != measured_card:
        a, b = table["cards"][card], table["cards"][measured_card]
        r = math.sqrt(a["tflops"] / b["tflops"] * a["tbps"] / b["tbps"])
        tps *= r
        derived = True
        how += f"; {card} derived x{r:.2f} = sqrt(tflops {a['tflops']}/{b['tflops']} x TB/s {a['tbps']}/{b['tbps']})"
    if abs(params_b - size) / size > 0.05:
        tps *= size / params_b
        derived = True
        how += f"; scaled x{size / params_b:.3g} for {params_b:.2f}B parameters"
    if count > 1:
        eff, eff_how = multi_gpu_efficiency(table, count)
        tps *= count * eff
        how += f"; x{count} cards x {eff} efficiency ({eff_how})"
    band = float(table["band_derived"] if derived else table["band_measured"])
    return tps, band, how


def multi_gpu_efficiency(table: dict, count: int) -> tuple[float, str]:
    """(scaling efficiency for `count` GPUs, where it comes from). A measured row (bench/scale.py on a
    device) serves up to the GPU count it was measured at; past the largest measured count the
    configured `multi_gpu_efficiency` stands, and the note says how far the measurement goes."""
    measured = {int(n): row for n, row in (table.get("multi_gpu_efficiency_measured") or {}).items()}
    configured = float(table.get("multi_gpu_efficiency", 0.9))
    covering = [n for n in measured if n >= count]
    if covering:
        row = measured[min(covering)]
        return float(row["efficiency"]), f"measured at {min(covering)} GPUs on {row['card']}, {row['date']}"
    if measured:
        top = max(measured)
        return configured, f"configured; measured only up to {top} GPUs: {measured[top]['efficiency']}"
    return configured, "configured, not measured"


def _nearest_size(by_size: dict, params_b: float, method: str) -> tuple[float, dict]:
    if not by_size:
        raise ContractError(f"train.method {method!r}: configs/throughput.yaml has no throughput for it")
    size = min(by_size, key=lambda s: abs(math.log(float(s) / params_b)))
    return float(size), by_size[size]


def fitting_cards(table: dict, method: str, params_b: float, wanted: str = "auto") -> list[str]:
    # "-PCIE" rows are variants picked per offer (by instance name), not cards SkyPilot lists. Cards
    # that fit only the lean memory mode compete too (at the lean mode's rate).
    return [c for c in table["cards"] if memory_mode(table, c, method, params_b, wanted) and not c.endswith("-PCIE")]


def min_memory_gib(table: dict, method: str, params_b: float) -> float:
    return float(table["min_memory_gib"][method]) * params_b / 14.0


def model_params_b(cfg: RunConfig) -> float:
    """Parameters in billions: from the architecture for random init, else from the model's name."""
    m = cfg.model
    arch = dict(m.arch or {})
    if m.init == "random" and str(arch.get("preset", "")).lower() != "qwen2.5-14b" and "hidden_size" in arch:
        h, n_layers = int(arch["hidden_size"]), int(arch.get("num_hidden_layers", 1))
        heads = int(arch.get("num_attention_heads", 1))
        kv, inter = int(arch.get("num_key_value_heads", heads)), int(arch.get("intermediate_size", 4 * h))
        vocab, hd = int(arch.get("vocab_size", 151936)), h // heads
        per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter
        embed = vocab * h * (1 if arch.get("tie_word_embeddings") else 2)
        return (n_layers * per_layer + embed) / 1e9
    found = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", m.id)
    return float(found.group(1)) if found else 14.0


def lora_bytes(cfg: RunConfig, params_b: float) -> float:
    """Adapter size: LoRA rank x (in + out) per target per layer, fp32, at Qwen2.5-14B's shapes scaled."""
    h, inter, kv, layers = 5120, 13824, 1024, 48
    dims = {"q_proj": 2 * h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": 2 * h,
            "gate_proj": h + inter, "up_proj": h + inter, "down_proj": h + inter}
    per_layer = sum(dims.get(t, 2 * h) for t in cfg.lora.target_modules) * cfg.lora.r
    return per_layer * layers * 4 * (params_b / 14.77) ** (2 / 3)


# --- terms 3 and 4: fixed costs and the plan per card ----------------------------------------

def plan_card(cfg: RunConfig, table: dict, card: str, count: int, params_b: float, tokens: Tokens,
              local: bool) -> CardPlan:
    mode = memory_mode(table, card, cfg.train.method, params_b, cfg.train.memory_mode)
    if cfg.train.method == "full":  # sharded over every GPU of the run (job/check.py refuses what does not fit)
        mode = "fast" if float(table["cards"][card]["memory_gib"]) >= full_need_gib(params_b, count) else None
    rate = "fp8" if mode == "fast" and fp8_rate(table, cfg, card) else (mode or "fast")
    tps, band, how = card_throughput(table, card, cfg.train.method, params_b, count, mode=rate)
    scale = params_b / 14.0
    terms: list[Term] = []
    if not local:
        terms.append(Term("provisioning", 120, 300, 900, "SkyPilot VM from launch to SSH (typical range, not measured)"))
        terms.append(Term("image / setup", 120, 300, 600, "pull the job image (~10 GB) or install the pinned lock"))
    if cfg.model.init == "pretrained":
        gb = params_b * 2
        terms.append(_transfer("model download", gb, CLOUD_MBPS, f"{gb:.1f} GB bf16 safetensors from the hub"))
    load = (60 * scale, 120 * scale, 300 * scale)
    terms.append(Term("model load + 4-bit" if cfg.train.method == "qlora" else "model load", *load,
                      f"read and quantize {params_b:.1f}B parameters"))
    if tokens.kind == "hub":
        terms.append(_transfer("dataset download", 1.4, CLOUD_MBPS, "SocSci210: 17 parquet shards, ~1.4 GB"))
    elif tokens.kind in ("raw", "prepared") and not local:
        gb = tokens.data_bytes / 1e9
        terms.append(_transfer("dataset upload", gb, LAPTOP_MBPS, f"{gb * 1000:,.0f} MB synced from your machine"))
    if tokens.kind != "prepared":
        src_rows = tokens.train_rows / max(cfg.data.subset, 1e-9) + tokens.test_rows
        terms.append(Term("prepare", src_rows / 10000, src_rows / 5000, src_rows / 2000,
                          f"split + tokenize ~{src_rows:,.0f} rows at 2k-10k rows/s"))
    t_exp = tokens.tokens / tps
    terms.append(Term("training", tokens.low / (tps * (1 + band)), t_exp, tokens.high / (tps * (1 - band)),
                      f"{tokens.tokens:,.0f} tokens ({tokens.steps:,} steps x {cfg.train.global_batch} rows) / "
                      f"{tps:,.0f} tok/s; band: tokens {tokens.low / tokens.tokens:.2f}-"
                      f"{tokens.high / tokens.tokens:.2f}, throughput +-{band:.0%}. {how}"
                      if tokens.tokens else "no tokens"))
    start = float(table.get("train_startup_s", 0.0))
    terms.append(Term("trainer startup", start * (1 - band), start, start * (1 + band),
                      "first step (warm-up), optimizer init, adapter save (bench/cost_accuracy.py)"))
    ckpts = tokens.steps // cfg.train.checkpoint_every if cfg.train.checkpoint_every else 0
    interval_s = (t_exp * min(1.0, cfg.train.checkpoint_every / tokens.steps)
                  if cfg.train.checkpoint_every and tokens.steps else t_exp)
    ck_s = 3 * lora_bytes(cfg, params_b) / 300e6 + 2
    terms.append(Term("checkpoints", ckpts * ck_s * 0.5, ckpts * ck_s, ckpts * ck_s * 3,
                      f"{ckpts} saves of adapter + optimizer state"))
    if cfg.eval.enabled and tokens.test_rows:
        rows = tokens.test_rows if cfg.eval.rows is None else min(cfg.eval.rows, tokens.test_rows)
        prefill = rows * tokens.prompt_tokens_per_row / (tps * float(table["eval_prefill_ratio"]))
        step = table["decode_step_s"].get(card, table["decode_step_s"]["default"]) * scale
        decode = math.ceil(rows / cfg.eval.batch_size) * cfg.eval.max_new_tokens * step
        models = 2 if cfg.eval.base else 1  # eval.base: the base model is evaluated on the same rows too
        e = (prefill + decode) * models
        b = float(table["band_derived"])
        terms.append(Term("evaluation", e * (1 - b), e, e * (1 + b),
                          f"{rows:,} test rows: prefill {prefill / 60:,.0f} min + decode {cfg.eval.max_new_tokens} "
                          f"tokens x {math.ceil(rows / cfg.eval.batch_size):,} batches at {step:.3f} s (derived)"
                          + (", twice (the adapter and the base model)" if models == 2 else "")))
    if not local and cfg.train.method == "full":
        gb = full_output_gb(params_b)
        terms.append(_transfer("model download (back)", gb, LAPTOP_MBPS, f"{gb:.1f} GB of full weights (out/model) to your machine"))
        terms.append(Term("teardown", 30, 90, 300, "billed until the cloud confirms the VM is gone"))
    elif not local:
        mb = lora_bytes(cfg, params_b) / 1e6 + 5
        terms.append(Term("adapter download", 10 + mb / LAPTOP_MBPS[0], 10 + mb / LAPTOP_MBPS[1],
                          10 + mb / LAPTOP_MBPS[2], f"~{mb:,.0f} MB adapter + report to your machine"))
        terms.append(Term("teardown", 30, 90, 300, "billed until the cloud confirms the VM is gone"))
    return CardPlan(card=card, count=count, tokens_per_s=tps, throughput_band=band, throughput_how=how,
                    terms=tuple(terms), memory_mode=mode, checkpoint_interval_s=interval_s)


def full_need_gib(params_b: float, gpus: int) -> float:
    """GiB per card of a full fine-tune sharded over `gpus` (job/check.py full_fit_estimate, rounded up):
    16 bytes a parameter (fp32 weights, gradients, AdamW moments) divided over the GPUs, plus ~16 GiB at
    14B for the gathered layers, the activations and the CUDA context."""
    return 16 * params_b * 1e9 / 2**30 / max(gpus, 1) + 16 * params_b / 14.0


def full_output_gb(params_b: float) -> float:
    return params_b * FULL_OUTPUT_BYTES_PER_PARAM


def full_output_note(params_b: float) -> str:
    """What a full fine-tune brings back: its size and the download time at the assumed laptop bandwidth."""
    gb = full_output_gb(params_b)
    lo, exp, hi = (gb * 1000 / r for r in LAPTOP_MBPS)
    return (f"output: the full fine-tune's weights, ~{gb:.1f} GB ({FULL_OUTPUT_BYTES_PER_PARAM} bytes x "
            f"{params_b:.1f}B params, bf16 safetensors in out/model), pulled back to this machine by default: "
            f"~{exp / 60:,.0f} min at {LAPTOP_MBPS[1]:g} MB/s ({lo / 60:,.0f}-{hi / 60:,.0f} min at "
            f"{LAPTOP_MBPS[0]:g}-{LAPTOP_MBPS[2]:g} MB/s, assumed); the machine is billed until it is done")


def _transfer(name: str, gb: float, mbps: tuple[float, float, float], what: str) -> Term:
    lo, exp, hi = (gb * 1000 / r for r in mbps)
    return Term(name, lo, exp, hi, f"{what} at {mbps[2]:g}-{mbps[0]:g} MB/s (assumed)")


# --- caps and the actual cost ----------------------------------------------------------------

def deadline_for(est: Estimate, max_cost: float | None, max_hours: float | None) -> float | None:
    """Seconds after setup starts on the machine (sky/train.yaml's DEADLINE_S) at which the job must stop.

    Refuses (ContractError -> exit 2) when the HIGH estimate exceeds a cap. Otherwise the deadline
    is the cap's machine time minus what the cloud bills outside that window at its worst
    (provisioning before it; grace, adapter download and teardown after it), so billed time stays
    within the cap. Setup runs inside the window (and is cut off by it). None without caps.
    """
    check_caps(max_cost, max_hours, est.infra)
    if max_cost is None and max_hours is None:
        return None
    best, hours = est.cheapest, est.hours
    tail = 0.0
    if best is not None and est.plan is not None:
        around = ("provisioning", "adapter download", "model download (back)", "teardown")
        tail = DEADLINE_GRACE_S + sum(t.high_s for t in est.plan.terms if t.name in around)
    limits = []  # (seconds, the cap that sets them)
    if max_cost is not None:
        if best is None:  # no priced offer to turn dollars into machine time: never ignore the cap silently
            raise ContractError(_no_price(max_cost))
        lo, exp, hi = best.dollars
        if hi > max_cost:
            raise ContractError(
                f"--max-cost {max_cost:g}: the high estimate is ${hi:,.2f} (low ${lo:,.2f}, expected ${exp:,.2f}) "
                f"on {best.cloud} {best.region} {best.instance} at ${best.price_per_h:.2f}/h; nothing launched "
                "(raise the cap, lower --subset, or pick a cheaper --gpu)")
        limits.append((max_cost / best.price_per_h * 3600 - tail, f"--max-cost {max_cost:g}"))
    if max_hours is not None:
        if hours is not None and hours[2] > max_hours:
            lo, exp, hi = hours
            raise ContractError(
                f"--max-hours {max_hours:g}: the high estimate is {hi:,.2f} h (low {lo:,.2f}, expected {exp:,.2f}); "
                "nothing launched (raise the cap or lower --subset)")
        limits.append((max_hours * 3600 - tail, f"--max-hours {max_hours:g}"))
    seconds, cap = min(limits)
    if seconds < MIN_DEADLINE_S:
        raise ContractError(f"{cap}: leaves the job {max(seconds, 0):.0f} s of machine time after provisioning, grace, "
                            f"download and teardown ({tail:.0f} s); nothing launched (accepted: a cap that leaves at "
                            f"least {MIN_DEADLINE_S:.0f} s)")
    return seconds


def safety_deadline(est: Estimate) -> float | None:
    """The remote deadline of a cloud run given no --max-cost/--max-hours (seconds after setup starts),
    or None where nothing bills by the hour (local, ssh) or there is no estimate to scale."""
    if est.infra != "sky" or not est.hours:
        return None
    high_s = est.hours[2] * 3600
    return max(SAFETY_FACTOR * high_s, high_s + SAFETY_MIN_EXTRA_S)


def safety_line(deadline_s: float) -> str:
    return (f"safety stop: with no --max-cost/--max-hours the job still stops itself {deadline_s / 3600:.1f} h after "
            f"setup starts ({SAFETY_FACTOR:g}x the high estimate; a hung job is never idle, so autodown alone would "
            "not end it); --max-hours sets your own")


def check_caps(max_cost: float | None, max_hours: float | None, infra: str | None = None) -> None:
    """Caps are numbers > 0, and a dollar cap needs a cloud price: not on `infra` local or ssh://
    (checked before anything is estimated or created)."""
    for flag, value, top in (("--max-cost", max_cost, MAX_CAP_DOLLARS), ("--max-hours", max_hours, MAX_CAP_HOURS)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0 < value <= top):
            raise ContractError(f"{flag} {value!r}: not accepted (a number > 0 and at most {top:,.0f})")
    if max_cost is not None and infra is not None and infra.startswith(LOCAL_INFRA_PREFIXES):
        raise ContractError(_no_price(max_cost))


def _unfetched(clouds: dict) -> str:
    return (f"SkyPilot could not fetch its price catalog for {', '.join(sorted(clouds))} (offline?) and has "
            "none cached: check the network and run this again")


def _no_price(max_cost: float) -> str:
    return (f"--max-cost {max_cost:g}: a dollar cap needs a cloud price (--infra sky); "
            "on local or ssh machines use --max-hours")


def actual_cost(run: Any) -> float | None:
    """Dollars so far: the run's price per hour x its billed time (started_at to ended_at, or now)."""
    get = run.get if isinstance(run, dict) else (lambda k, d=None: getattr(run, k, d))
    price, start = get("price_per_hour"), get("started_at")
    if price is None:
        estimate = get("estimate")
        cheapest = estimate.get("cheapest") if isinstance(estimate, dict) else None
        price = cheapest.get("price_per_h") if isinstance(cheapest, dict) else None
    end = get("ended_at") or time.time()
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (price, start, end)):
        return None  # not priced or not started (or a hand-edited record: no number to give)
    return round(float(price) * max(0.0, float(end) - float(start)) / 3600, 2)


# --- output ----------------------------------------------------------------------------------

def to_json(est: Estimate) -> dict:
    best = est.cheapest
    plan = est.plan
    return {
        "infra": est.infra, "method": est.method, "model": est.model, "params_b": round(est.params_b, 3),
        "spot": est.spot,
        "tokens": asdict(est.tokens),
        "hours": _r(est.hours), "dollars": list(best.dollars) if best else None,
        "cheapest": asdict(best) if best else None,
        "plans": [{**asdict(p), "hours": _r(p.hours(est.spot))} for p in est.plans],
        "offers": [asdict(o) for o in est.offers],
        "terms": [asdict(t) for t in plan.terms] if plan else [],
        "notes": list(est.notes),
        "cards": [asdict(c) for c in est.cards],
        "warning": est.warning,
    }


def render(est: Estimate, console: Any = None, explain: bool = False) -> None:
    """The offers table (cheapest marked), a summary line, and with `explain` every term."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from launcher import tables

    console = console or Console()
    whole = not console.is_terminal  # in a pipe a line stays one line (grep); a terminal wraps it at words
    tok = est.tokens
    console.print(f"[bold]{est.model}[/] {est.method}, {tok.train_rows:,} training rows (split {tok.split}) -> "
                  f"{tok.steps:,} steps, {tok.tokens / 1e6:,.1f}M tokens ({'exact' if tok.exact else 'estimated'})",
                  soft_wrap=whole)
    if est.offers:
        # At 80 columns or in a pipe: numbers and names never break mid-word; the offer wraps at its spaces.
        table = Table(title="What this run will cost" + (" (spot)" if est.spot else ""), title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("", no_wrap=True)
        table.add_column("offer", min_width=max(len(o.instance) for o in est.offers[:SHOWN_OFFERS]))
        table.add_column("card", no_wrap=True)
        table.add_column("$/h", justify="right", no_wrap=True)
        if est.spot:
            table.add_column("on demand", justify="right", no_wrap=True)
        table.add_column("hours", justify="right", no_wrap=True)
        table.add_column("$", justify="right", no_wrap=True)
        for o in est.offers[:SHOWN_OFFERS]:
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
        t = Table(title=f"How the hours add up on {p.card}:{p.count}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
        for col in ("term", "low", "expected", "high", "how"):  # numbers whole; a long word of `how` folds
            t.add_column(col, justify="right" if col in ("low", "expected", "high") else "left",
                         no_wrap=col != "how", overflow="fold")
        for term in p.terms:
            t.add_row(term.name, _hms(term.low_s), _hms(term.expected_s), _hms(term.high_s), term.how)
        lo, exp, hi = p.hours(est.spot)
        t.add_row("total", f"{lo:.2f} h", f"{exp:.2f} h", f"{hi:.2f} h", "sum of the terms" +
                  (" (+ spot preemption allowance)" if est.spot else ""), style="bold")
        console.print(t)
        console.print(f"  tokens: {tok.source}")
        console.print("  bands: low/high = token band x throughput band (measured +-10%, derived +-30%) "
                      "+ each fixed term's own range")


def render_cards(est: Estimate, console: Any) -> None:
    """The same run on every card the catalog offers that fits, at its cheapest offer, marked."""
    if not est.cards:
        return
    from rich import box
    from rich.table import Table

    t = Table(title="The same run on each card that fits (its cheapest offer)", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for name, right in (("card", False), ("memory", False), ("hours", True), ("$/h", True), ("$", True), ("", False)):
        t.add_column(name, justify="right" if right else "left", no_wrap=True)
    for c in est.cards:
        t.add_row(f"{c.card}:{c.count}" + (" PCIe" if c.spec.endswith("-PCIE") else ""), c.memory_mode or "-",
                  f"{c.hours[1]:,.1f}", f"{c.price_per_h:.2f}", f"{c.dollars[1]:,.0f}",
                  ", ".join(("<- " if m == "asked" else "") + m for m in c.marks),
                  style="bold" if "asked" in c.marks else None)
    console.print(t)
    console.print("  expected hours and dollars; `--gpu CARD:N` picks one", highlight=False)


def _card(o: Offer) -> str:
    return f"{o.card}:{o.count}" + (" PCIe" if (o.spec or "").endswith("-PCIE") else "")


# --- QLoRA beside LoRA --------------------------------------------------------------------------

ADAPTER_METHODS = ("qlora", "lora")


def methods_side_by_side(cfg: RunConfig, est: Estimate) -> list[dict]:
    """QLoRA and LoRA on the estimate's card (its cheapest offer's price), when the card fits both: for
    each, tok/s, hours and dollars (low / expected / high) and the GiB it needs. Only shown: the run
    trains with the method its config names (train.method); [] for full or a card that fits one."""
    plan = est.plan
    if cfg.train.method not in ADAPTER_METHODS or plan is None or plan.count != 1:
        return []
    table = load_throughput()
    have = float(table["cards"][plan.card]["memory_gib"])
    best = est.cheapest
    rows = []
    for method in ADAPTER_METHODS:
        other = cfg.with_overrides({"train.method": method}, source="methods side by side")
        p = plan if method == cfg.train.method else plan_card(other, table, plan.card, 1, est.params_b, est.tokens,
                                                                 local=est.infra.startswith(LOCAL_INFRA_PREFIXES))
        if p.memory_mode is None:
            return []
        need = min_memory_gib(table, method, est.params_b) if p.memory_mode == "fast" else \
            lean_min_memory_gib(table, method, est.params_b)
        hours = p.hours(est.spot)
        rows.append({"method": method, "card": plan.card, "card_gib": have, "need_gib": round(need or 0, 1),
                     "memory_mode": p.memory_mode, "tokens_per_s": round(p.tokens_per_s),
                     "hours": list(hours), "dollars": [round(h * best.price_per_h, 2) for h in hours] if best else None,
                     "chosen": method == cfg.train.method})
    return rows


def render_methods(rows: list[dict], console: Any) -> None:
    from rich import box
    from rich.table import Table

    if not rows:
        return
    t = Table(title=f"QLoRA and LoRA on {rows[0]['card']}:1 ({rows[0]['card_gib']:.0f} GiB), same data",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("method", "tok/s", "hours lo-exp-hi", "$ lo-exp-hi", "needs GiB"):  # whole cells at 80 columns
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=col != "method")
    for r in rows:
        name = {"qlora": "QLoRA (4-bit NF4 base)", "lora": "LoRA (bf16 base)"}[r["method"]]
        t.add_row(name + (" *" if r["chosen"] else ""), f"{r['tokens_per_s']:,}", "-".join(f"{h:.1f}" for h in r["hours"]),
                  "-".join(f"{d:,.0f}" for d in r["dollars"]) if r["dollars"] else "-",
                  f"{r['need_gib']:.0f}" + (" (lean)" if r["memory_mode"] == "lean" else ""))
    console.print(t)
    console.print("  * the method this run uses (train.method); the other is shown, never switched to")


def _hms(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def _r(t: tuple | None) -> list | None:
    return list(t) if t else None


# --- files -----------------------------------------------------------------------------------

def load_throughput(path: Path = THROUGHPUT_FILE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_hub_stats(path: Path = HUB_STATS_FILE) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _parse_gpu(gpu: Any):
    if hasattr(gpu, "name") and hasattr(gpu, "count"):
        return gpu
    from launcher.gpu import parse_gpu

    return parse_gpu(str(gpu))


def _check_card(name: str, table: dict) -> str:
    unsupported = table.get("unsupported", {})
    if name in unsupported:
        raise ContractError(f"--gpu {name}: cannot run the job ({unsupported[name]}; accepted: "
                            f"{', '.join(table['cards'])})")
    if name not in table["cards"]:
        raise ContractError(f"--gpu {name}: unknown card for the cost model (accepted: {', '.join(table['cards'])})")
    return name
