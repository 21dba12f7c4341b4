"""--max-cost and --max-hours turned into the job's remote deadline, the safety deadline of a run
without caps, and what a run has cost so far."""
from __future__ import annotations

import math
import time
from typing import Any

from contracts.errors import ContractError
from launcher.cost.estimate import Estimate
from launcher.cost.hours import LOCAL_INFRA_PREFIXES

# After the deadline the job gets this long to save, then the wrapper hard-kills it.
DEADLINE_GRACE_S = 300.0
MAX_CAP_HOURS = 8760.0      # a year of machine time: above it a cap is a typo, and overflows the remote arithmetic
MAX_CAP_DOLLARS = 1_000_000.0
MIN_DEADLINE_S = 60.0       # a cap that leaves the job less than this is no run at all
# Without a cap, a cloud run still gets a remote deadline: a job that hangs is not idle, so autodown
# alone would never end it. Generous: twice the high estimate, and at least an hour more than it.
SAFETY_FACTOR = 2.0
SAFETY_MIN_EXTRA_S = 3600.0


def deadline_for(est: Estimate, max_cost: float | None, max_hours: float | None) -> float | None:
    """Seconds after setup starts on the machine (sky/train.yaml's DEADLINE_S) at which the job must stop:
    the cap's machine time minus what the cloud bills outside that window at its worst (provisioning
    before it; grace, the download back and teardown after it). None without caps; refused (exit 2)
    when the high estimate exceeds a cap."""
    check_caps(max_cost, max_hours, est.infra)
    if max_cost is None and max_hours is None:
        return None
    best, hours, tail = est.cheapest, est.hours, 0.0
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
    return max(SAFETY_FACTOR * est.hours[2] * 3600, est.hours[2] * 3600 + SAFETY_MIN_EXTRA_S)


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
