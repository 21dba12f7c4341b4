"""Derive configs/socsci210_stats.json: tokens per SocSci210 row, for cost estimates of hub runs.

    python bench/socsci210_stats.py [--sample ../shared/fixtures/socsci210_real_sample.jsonl]

The launcher can't see the hub dataset before a run, so it ships this file. It is computed once
over the real rows we have (2,780 rows of 20 studies), with each prompt re-rendered with a FULL
16-field demographic profile (the sample kept only 3-7 fields; the real dataset has all 16),
tokenized with Qwen2.5's real BPE inside its chat template (system + user + answer), and scaled to
the dataset's row counts in the SOCRATES paper (arXiv 2509.05830). Bands come from a bootstrap over
studies.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contracts.config import DEFAULT_SYSTEM_PROMPT  # noqa: E402

# Row counts from the SOCRATES paper, arXiv 2509.05830 (the dataset card and the participant mapping).
TOTAL_ROWS = 2_901_390
SPLIT_ROWS = {"unseen-studies": {"train": 2_418_748, "test": 482_642}}
HEADER = "You are a survey respondent with the following demographic profile:"
INSTRUCTION = ("Read the question below and answer exactly as this person would. "
               "Follow the response instructions precisely.")
# Stand-ins for the fields the sample lost, in the style of TESS/KnowledgePanel answers.
FILL = {
    "gender": ["Female", "Male"],
    "employment": ["Employed as paid employee", "Retired", "Self-employed", "Not working for other reasons"],
    "ethnicity": ["White, Non-Hispanic", "Hispanic", "Black, Non-Hispanic", "Other, Non-Hispanic",
                  "2+ Races, Non-Hispanic"],
    "party_id": ["Strong Democrat", "Moderate Democrat", "Don't Lean/Independent/None", "Strong Republican"],
    "ideology": ["Moderate", "Somewhat Conservative", "Somewhat Liberal", "Very Conservative"],
    "location": ["South", "West", "Midwest", "Northeast"],
    "marital_status": ["Married", "Never married", "Divorced", "Widowed", "Living with partner", "Separated"],
    "household_size": [1, 2, 2, 3, 4, 5],
    "housing_ownership": ["Owned or being bought by you or someone in your household", "Rented for cash",
                          "Occupied without payment of cash rent"],
    "housing_type": ["A one-family house detached from any other house", "A building with 2 or more apartments",
                     "A one-family house attached to one or more houses", "A mobile home"],
    "metro_status": ["Metro area", "Non-metro area"],
    "internet_access": ["Yes", "No"],
    "phone_service": ["Landline telephone and cell phone", "Cell phone only", "Landline telephone only"],
}
FIELDS = ("age", "gender", "education", "employment", "ethnicity", "income", "party_id", "ideology",
          "location", "marital_status", "household_size", "housing_ownership", "housing_type",
          "metro_status", "internet_access", "phone_service")
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def qwen_encoder():
    """Qwen2.5's BPE (the ranks dashscope ships) with its pre-tokenizer regex and chat specials."""
    import base64

    import tiktoken
    import dashscope

    ranks_file = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(tok): int(rank)
             for tok, rank in (line.split() for line in ranks_file.read_text().splitlines() if line)}
    return tiktoken.Encoding("qwen2.5", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=SPECIAL)


def full_profile(demo: dict, rng: random.Random) -> dict:
    return {k: demo.get(k) if demo.get(k) is not None else rng.choice(FILL.get(k, ["Unknown"])) for k in FIELDS}


def render(profile: dict, stimuli: str) -> str:
    """The SOCRATES paper's prompt format (checked byte for byte against the sample's own `prompt`)."""
    lines = [HEADER] + [f"- {k.replace('_', ' ').title()}: {v}" for k, v in profile.items() if v is not None]
    return "\n".join(lines) + "\n\n" + INSTRUCTION + "\n\n" + stimuli


def chat(prompt: str, response: int) -> str:
    """Qwen2.5's chat template around one training example, as the trainer sees it (job/data.py's
    encode: no newline after the answer's <|im_end|>; checked equal to it on the sample's own prompts)."""
    return (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            f"<|im_start|>assistant\n{response}<|im_end|>")


def main(sample: Path, out: Path, seed: int = 0) -> dict:
    rows = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    enc = qwen_encoder()
    rng = random.Random(seed)
    per_study: dict[str, list[int]] = {}
    as_given: list[int] = []
    for r in rows:
        assert r["prompt"] == render({k: r["demographic"].get(k) for k in FIELDS}, r["stimuli"]), "format drift"
        full = chat(render(full_profile(r["demographic"], rng), r["stimuli"]), r["response"])
        per_study.setdefault(r["study_id"], []).append(len(enc.encode(full, allowed_special="all")))
        as_given.append(len(enc.encode(chat(r["prompt"], r["response"]), allowed_special="all")))
    lengths = sorted(n for v in per_study.values() for n in v)
    mean = statistics.fmean(lengths)
    # Bootstrap over studies: the sample holds 20 of 210 studies, so that is where the doubt is.
    boot, studies = [], list(per_study)
    brng = random.Random(seed + 1)
    for _ in range(2000):
        pick = [brng.choice(studies) for _ in studies]
        boot.append(statistics.fmean(n for s in pick for n in per_study[s]))
    boot.sort()
    # Test rows generate from the prompt alone (no answer); the answer is a handful of tokens.
    stats = {
        "schema": 1,
        "dataset": "socratesft/SocSci210",
        "derived": (
            f"bench/socsci210_stats.py over {len(rows)} real rows of {len(per_study)} studies "
            "(../shared/fixtures/socsci210_real_sample.jsonl, a public 1% split); each prompt re-rendered "
            "in the SOCRATES paper's format (arXiv 2509.05830) with a FULL 16-field demographic profile "
            "(the sample kept 3-7 fields, the real rows have 16; missing fields filled with "
            "TESS/KnowledgePanel-style values, seeded), "
            "wrapped in Qwen2.5's chat template with the default system message and the answer, tokenized "
            "with Qwen2.5's real BPE (dashscope's qwen.tiktoken + the Qwen2 pre-tokenizer regex). "
            "Rows per split from the SOCRATES paper; splits other than unseen-studies have no published "
            "row counts and are estimated as the whole dataset's rows x their train share (marked approximate)."),
        "tokenizer": "Qwen2.5 BPE (qwen.tiktoken, 151,643 ranks + chat specials)",
        "total_rows": TOTAL_ROWS,
        "splits": SPLIT_ROWS,
        "approx_train_share": {"unseen-conditions": 0.8, "unseen-tasks": 0.8, "random": 0.8},
        "tokens_per_row": {
            "mean": round(mean, 2),
            "p50": lengths[len(lengths) // 2],
            "p90": lengths[int(len(lengths) * 0.9)],
            "max": lengths[-1],
            "low": round(boot[int(0.05 * len(boot))], 2),
            "high": round(boot[int(0.95 * len(boot))], 2),
            "band": "5th/95th percentile of the per-row mean over a 2000x bootstrap of the 20 studies",
            "mean_with_sample_profiles": round(statistics.fmean(as_given), 2),
        },
        "per_study": {s: {"rows": len(v), "mean_tokens": round(statistics.fmean(v), 2)}
                      for s, v in sorted(per_study.items())},
    }
    out.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=Path, default=REPO / ".." / "shared" / "fixtures" / "socsci210_real_sample.jsonl")
    ap.add_argument("--out", type=Path, default=REPO / "configs" / "socsci210_stats.json")
    a = ap.parse_args()
    s = main(a.sample, a.out)
    print(json.dumps(s["tokens_per_row"], indent=2))
