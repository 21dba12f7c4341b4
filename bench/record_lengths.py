"""Record the token-length mix of SocSci210 rows (full 16-field profile) for bench/train_throughput.py.

Re-renders ../shared/fixtures/socsci210_real_sample.jsonl with every demographic field present
(the fixture kept only 3-7; the real dataset has 16), wraps it in Qwen's chat template with the
project's system prompt, tokenizes with Qwen2.5's real BPE ranks, and writes
bench/socsci210_lengths.json: one [prompt_tokens, answer_tokens] pair per row. The device run reads
that file, so it needs no ../shared and no tokenizer.

    python bench/record_lengths.py [--fixture PATH] [--out bench/socsci210_lengths.json]
"""
from __future__ import annotations

import argparse
import base64
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from contracts.config import DEFAULT_SYSTEM_PROMPT  # noqa: E402

FIELDS = ("age", "gender", "education", "employment", "ethnicity", "income", "party_id", "ideology",
          "location", "marital_status", "household_size", "housing_ownership", "housing_type",
          "metro_status", "internet_access", "phone_service")
# Fields the fixture lost: typical TESS/KnowledgePanel answers, so a profile has the real length.
FILLERS = {
    "ethnicity": ["White, Non-Hispanic", "Black, Non-Hispanic", "Hispanic", "Other, Non-Hispanic",
                  "2+ Races, Non-Hispanic"],
    "location": ["Northeast", "Midwest", "South", "West"],
    "marital_status": ["Married", "Never married", "Divorced", "Widowed", "Separated",
                       "Living with partner"],
    "household_size": [1, 2, 3, 4, 5],
    "housing_ownership": ["Owned or being bought by you or someone in your household",
                          "Rented for cash", "Occupied without payment of cash rent"],
    "housing_type": ["A one-family house detached from any other house",
                     "A one-family house attached to one or more houses", "A building with 2 or more apartments",
                     "A mobile home"],
    "metro_status": ["Metro area", "Non-metro area"],
    "internet_access": ["Yes", "No"],
    "phone_service": ["Cell phone only", "Landline and cell phone", "Landline only"],
}
PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
       r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def qwen_encoding():
    import tiktoken
    import dashscope
    path = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in
             (line.split() for line in path.read_text().splitlines() if line)}
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    return tiktoken.Encoding("qwen2.5", pat_str=PAT, mergeable_ranks=ranks, special_tokens=specials)


def render(row: dict, rng: random.Random, seen: dict[str, list]) -> str:
    demo = dict(row.get("demographic") or {})
    lines = ["You are a survey respondent with the following demographic profile:"]
    for f in FIELDS:
        value = demo.get(f)
        if value is None:
            value = rng.choice(seen.get(f) or FILLERS[f])
        lines.append(f"- {f.replace('_', ' ').title()}: {value}")
    return "\n".join(lines) + ("\n\nRead the question below and answer exactly as this person would. "
                               "Follow the response instructions precisely.\n\n") + row["stimuli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default=str(REPO / ".." / "shared" / "fixtures" / "socsci210_real_sample.jsonl"))
    ap.add_argument("--out", default=str(Path(__file__).with_name("socsci210_lengths.json")))
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.fixture).read_text(encoding="utf-8").splitlines() if line]
    seen: dict[str, list] = {}
    for r in rows:
        for f, v in (r.get("demographic") or {}).items():
            if v is not None:
                seen.setdefault(f, []).append(v)
    enc, rng = qwen_encoding(), random.Random(0)
    pairs = []
    for r in rows:
        prompt = (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                  f"{render(r, rng, seen)}<|im_end|>\n<|im_start|>assistant\n")
        answer = f"{r['response']}<|im_end|>"
        pairs.append([len(enc.encode(prompt, allowed_special="all")), len(enc.encode(answer, allowed_special="all"))])
    total = [p + a for p, a in pairs]
    meta = {"source": "shared/fixtures/socsci210_real_sample.jsonl re-rendered with 16 demographic fields",
            "tokenizer": "Qwen2.5 BPE (qwen.tiktoken) + chat template + system prompt",
            "rows": len(pairs), "mean_tokens": round(sum(total) / len(total), 1),
            "min_tokens": min(total), "max_tokens": max(total)}
    Path(args.out).write_text(json.dumps({"meta": meta, "prompt_answer": pairs}, separators=(",", ":")) + "\n")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
