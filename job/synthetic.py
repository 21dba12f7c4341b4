"""SocSci210-like rows, generated: `data.source: synthetic:N` (tests, the demo, benchmarks).

Same columns as the real dataset (`participant` included: 3 rows each); several studies, each with
conditions and tasks whose answer scale and response distribution depend on the cell and on a
demographic, so a model can learn something. Deterministic for a given (N, seed).
"""
from __future__ import annotations

import random

from contracts.errors import ContractError

_GENDERS = ("Male", "Female")
_PARTIES = ("Strong Democrat", "Lean Democrat", "Independent", "Lean Republican", "Strong Republican")
_EDU = ("High school", "Some college", "Bachelor's degree", "Graduate degree")
_TOPICS = ("minimum wage", "school vouchers", "carbon taxes", "immigration quotas", "public transit",
           "remote work", "nuclear power", "term limits")
_SCALES = ((1, 5), (1, 7), (0, 1), (0, 10))


def parse_source(source: str) -> int | None:
    """N for `synthetic:N`, None for any other source."""
    if not source.startswith("synthetic:"):
        return None
    n = source.split(":", 1)[1]
    if not n.isdigit() or int(n) < 1:
        raise ContractError(f"data source {source!r}: N must be a whole number >= 1 (e.g. synthetic:240)")
    return int(n)


def generate(n: int, seed: int = 0, studies: int | None = None, stimulus_words: int = 40) -> list[dict]:
    """`n` rows over ~n/30 studies (at least 4), each with 2 conditions and 2 tasks."""
    rng = random.Random(seed)
    studies = studies or max(4, min(40, n // 30))
    study_ids = ["".join(rng.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(5)) for _ in range(studies)]
    cells = {}
    for s in study_ids:
        topic = rng.choice(_TOPICS)
        for t in (1, 2):
            for c in (1, 2):
                lo, hi = rng.choice(_SCALES)
                cells[(s, c, t)] = (topic, lo, hi, rng.random())
    rows = []
    per_study = {s: 0 for s in study_ids}
    for i in range(n):
        s = study_ids[i % studies]
        c, t = rng.choice((1, 2)), rng.choice((1, 2))
        topic, lo, hi, lean = cells[(s, c, t)]
        party = rng.randrange(len(_PARTIES))
        demo = {k: None for k in _DEMOGRAPHIC_KEYS}
        demo.update(age=rng.randint(18, 90), gender=rng.choice(_GENDERS), education=rng.choice(_EDU),
                    party_id=_PARTIES[party])
        # The answer leans with the cell and with party: learnable, not constant.
        p = min(1.0, max(0.0, 0.6 * lean + 0.4 * party / (len(_PARTIES) - 1) + rng.gauss(0, 0.1)))
        response = lo + round(p * (hi - lo))
        filler = " ".join(rng.choice(("the", "a", "policy", "people", "would", "change", "local", "new"))
                          for _ in range(stimulus_words))
        stimuli = (f"You read a short article about {topic} (version {c}): {filler}. Then you were asked "
                   f"question {t} about {topic}. Only return an integer from {lo} to {hi}, nothing else.")
        rows.append({
            # A participant answers 3 questions of its study (an index within the study, as SocSci210's).
            "sample_id": per_study[s], "participant": per_study[s] // 3, "demographic": demo, "stimuli": stimuli,
            "prompt": None, "reasoning": "", "response": int(response), "condition_num": c,
            "task_num": t, "study_id": s,
        })
        per_study[s] += 1
    return rows


_DEMOGRAPHIC_KEYS = (
    "age", "gender", "education", "employment", "ethnicity", "income", "party_id", "ideology",
    "location", "marital_status", "household_size", "housing_ownership", "housing_type",
    "metro_status", "internet_access", "phone_service",
)
