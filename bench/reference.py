"""Naive references the job's fast paths are checked against: nothing in job/ runs these.

- `score_one_by_one`: one full forward per candidate answer with standard causal attention, the
  reference for job/scoring.py's tree scorer (tests/test_eval_e2e.py, bench/eval_throughput.py).
"""
from __future__ import annotations

import math
from typing import Sequence

from job import data as D
from job.load import device_of


def score_one_by_one(model, tok, prompt: list[int], lo: int, hi: int, values: Sequence[int] | None = None
                     ) -> list[float]:
    """The naive reference: one full forward per candidate answer, standard causal attention.
    Slow (the prompt is recomputed per answer); the tests and the bench compare against it."""
    import torch

    end = D.answer_end_id(tok)
    dev = device_of(model)
    scores = []
    for v in (range(lo, hi + 1) if values is None else values):
        ans = list(tok(str(v), add_special_tokens=False)["input_ids"]) + [end]
        ids = torch.tensor([prompt + ans[:-1]], device=dev)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ans)))
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]
