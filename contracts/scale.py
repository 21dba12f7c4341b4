"""The answer scale a SocSci210 stimulus states, read from its text. Stdlib only: the job scores
with it (job/metrics.py, job/evaluate.py) and the launcher checks a `predict` scenario with it.

Wordings understood (SocSci210 stimuli, the dataset card, the `predict` shorthand):
- ranges: "Only return an integer from 1 to 7", "from 1 (Decreased a lot) to 5 (Increased a lot)",
  "from 1 ($0) to 9 ($45)", "between -10 and 10", "from 0 to 1,000", "from 1 through 7",
  "On a scale from 1 (Not at all) to 5 (Very)", "where 1 means X and 7 means Y" (no "from");
- step grids: "a multiple of 100 between 0 and 1000", "from 0 to 100 in steps of 5";
- enumerated options: "Only return 1 for 'Yes' or 2 for 'No'", "1 for 'a'; 2 for 'b'; 3 for 'c'",
  "Only return 0 or 1", "Only return 1 if ..., up to 4 if ...";
- the shorthand "(1-7 scale)", "(0 to 10)".

Where the text holds several candidates, the one in the answer instruction wins: the first scale
after the last "Only return" (the SocSci210 convention); without one there, the last scale that a
scale word ("scale", "return", "answer", "enter", "integer", "rate it", ...) introduces. A range in
a passage ("the rate rose from 8 to 9 percent") is not a scale. None: the text states no scale.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# One end of a scale: an integer, maybe signed (ASCII, Unicode minus, en dash), maybe with
# thousands separators ("1,000"); never a decimal ("8.4%" is no end).
_NUM = r"(?<![\d.])([-+\u2212\u2013]?\d{1,3}(?:,\d{3})+|[-+\u2212\u2013]?\d+)(?![\d.,]\d)"
# What may follow an end before the next word: a label or amount in parentheses or quotes.
_LABEL = r"(?:\s*(?:\([^()]{0,120}\)|'[^']{0,120}'|\"[^\"]{0,120}\"|\u201c[^\u201d]{0,120}\u201d))?"

_RANGE = re.compile(r"\b(?:from|between)\s+" + _NUM + _LABEL + r"\s*(?:to|and|through|thru|-|\u2013)\s+" + _NUM,
                    re.I)
_MULTIPLE = re.compile(r"\bmultiples?\s+of\s+" + _NUM, re.I)
_STEPS = re.compile(r"\b(?:in\s+)?(?:steps|increments)\s+of\s+" + _NUM, re.I)
_ENUM_HEAD = re.compile(r"\breturn\s+" + _NUM + r"(?:\s*,|\s+(?:for|if|or)\b)", re.I)
_ENUM_FOR = re.compile(r"(?:^|[\s;,(/])" + _NUM + r"\s+for\b", re.I)
_ENUM_OR = re.compile(r"\breturn\s+((?:-?\d+\s*,\s*)*-?\d+),?\s+or\s+(-?\d+)\b", re.I)
_UP_TO = re.compile(r"\breturn\s+" + _NUM + r"\s+if\b.{0,300}?\bup\s+to\s+" + _NUM + r"\s+if\b", re.I | re.S)
_MEANS = re.compile(_NUM + r"\s*(?:means|=)\s.{1,200}?\band\s+" + _NUM + r"\s*(?:means|=)\s", re.I | re.S)
_SHORTHAND = re.compile(r"\(\s*" + _NUM + r"\s*(?:-|\u2013|to)\s*" + _NUM + r"(?:\s*(?:point\s+)?scale)?\s*\)", re.I)
_INSTRUCTION = re.compile(r"\bonly\s+(?:return|answer|respond|enter|give|provide)\b", re.I)
_SCALE_WORD = re.compile(r"(?:\b(?:scale|return|answer|respond|enter|integer|choose|select|pick)\w*|"
                         r"\brate\s+(?:it|this|them|that|how|each|the\s+following|your))\b[^.?!]{0,80}$", re.I)
_SENTENCE_END = re.compile(r"[.?!](?:\s|$)|\n")


@dataclass(frozen=True)
class Scale:
    """The answers a stimulus accepts: lo..hi (as stated), every `step` or the listed `options`.

    A plain lo..hi scale also reads as the pair (lo, hi): `lo, hi = scale`, `scale == (1, 7)`."""

    lo: int
    hi: int
    step: int = 1
    options: tuple[int, ...] | None = None
    """Enumerated answers (or a "multiple of N" grid), ascending; None: every `step` from lo."""

    def values(self) -> list[int]:
        if self.options is not None:
            return list(self.options)
        return list(range(self.lo, self.hi + 1, self.step))

    def accepts(self, value: float) -> bool:
        """Whether `value` is one of the scale's answers (without listing them: a scale may be huge)."""
        if self.options is not None:
            return value in self.options
        return self.lo <= value <= self.hi and float(value - self.lo) % self.step == 0

    @property
    def levels(self) -> int:
        return len(self.options) if self.options is not None else (self.hi - self.lo) // self.step + 1

    @property
    def plain(self) -> bool:
        """Every integer from lo to hi."""
        return self.levels == self.hi - self.lo + 1

    def describe(self) -> str:
        if self.plain:
            return f"{self.lo}..{self.hi}"
        if self.options is not None and len(self.options) <= 12:
            return "{" + ", ".join(map(str, self.options)) + "}"
        return f"{self.lo}..{self.hi} step {self.step}"

    def to_json(self) -> dict:
        """{"lo", "hi", "step"}, and "values" when they are not every `step` from lo to hi."""
        out = {"lo": self.lo, "hi": self.hi, "step": self.step}
        if self.options is not None:
            out["values"] = list(self.options)
        return out

    # The pair view, for callers that take a scale as (lo, hi).
    def __iter__(self):
        return iter((self.lo, self.hi))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        return (self.lo, self.hi)[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, Scale):  # the same answers accepted (stated ends may differ on a grid)
            return self.values() == other.values()
        if isinstance(other, tuple):
            return self.plain and (self.lo, self.hi) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.lo, self.hi)) if self.plain else hash(tuple(self.values()))


def as_scale(value) -> Scale | None:
    """A Scale from a Scale, a (lo, hi) pair or a {"lo", "hi", "step"|"values"} mapping; None stays None."""
    if value is None or isinstance(value, Scale):
        return value
    if isinstance(value, dict):
        vals = value.get("values")
        if vals is not None:
            return _from_values(sorted(int(v) for v in vals), int(value["lo"]), int(value["hi"]))
        return Scale(int(value["lo"]), int(value["hi"]), int(value.get("step") or 1))
    lo, hi = value
    return Scale(int(lo), int(hi))


def _from_values(vals: list[int], lo: int | None = None, hi: int | None = None) -> Scale | None:
    vals = sorted(set(vals))
    if len(vals) < 2:
        return None
    lo = vals[0] if lo is None else lo
    hi = vals[-1] if hi is None else hi
    steps = {b - a for a, b in zip(vals, vals[1:])}
    if len(steps) == 1 and vals[0] == lo and vals[-1] == hi:
        return Scale(lo, hi, steps.pop())
    return Scale(lo, hi, 1, tuple(vals))


def _int(s: str) -> int:
    return int(s.replace(",", "").replace("\u2212", "-").replace("\u2013", "-").replace("+", ""))


@dataclass
class _Found:
    start: int
    scale: Scale
    keyed: bool  # an explicit form ("(1-7 scale)", "Only return 1 for ...") or a scale word before it


def _candidates(text: str) -> list[_Found]:
    found: list[_Found] = []
    for m in _RANGE.finditer(text):
        lo, hi = _int(m.group(1)), _int(m.group(2))
        if lo < hi:
            found.append(_Found(m.start(), _with_step(text, m, lo, hi), _keyed(text, m.start())))
    for m in _ENUM_HEAD.finditer(text):
        tail = text[m.start():_sentence_end(text, m.start(), 600)]
        vals = [_int(v) for v in _ENUM_FOR.findall(tail)]
        if len(vals) < 2:
            o = _ENUM_OR.match(tail)
            if o:
                vals = [int(v) for v in re.findall(r"-?\d+", o.group(1))] + [int(o.group(2))]
        if len(vals) >= 2:
            s = _from_values(vals)
            if s is not None:
                found.append(_Found(m.start(), s, True))
    for m in (*_UP_TO.finditer(text), *_SHORTHAND.finditer(text)):
        lo, hi = _int(m.group(1)), _int(m.group(2))
        if lo < hi:
            found.append(_Found(m.start(), Scale(lo, hi), True))
    for m in _MEANS.finditer(text):
        lo, hi = _int(m.group(1)), _int(m.group(2))
        if lo != hi:
            lo, hi = min(lo, hi), max(lo, hi)
            found.append(_Found(m.start(), Scale(lo, hi), _keyed(text, m.start())))
    # At one place the most specific reading wins: a range before a "means" pair that restates it.
    found.sort(key=lambda f: f.start)
    return found


def _sentence_end(text: str, start: int, limit: int) -> int:
    m = _SENTENCE_END.search(text, start, min(len(text), start + limit))
    return m.start() if m else min(len(text), start + limit)


def _keyed(text: str, start: int) -> bool:
    """A scale word shortly before, in the same sentence ("On a scale from", "Only return an integer from")."""
    return bool(_SCALE_WORD.search(text[max(0, start - 100):start]))


def _with_step(text: str, m: re.Match, lo: int, hi: int) -> Scale:
    """The range read from `m`, on the step grid its sentence states, if any."""
    a = text.rfind(".", 0, m.start())
    window = text[a + 1:_sentence_end(text, m.end(), 200)]
    g = _MULTIPLE.search(window)
    if g and _int(g.group(1)) > 1:
        n = _int(g.group(1))
        first = -(-lo // n) * n
        grid = tuple(range(first, hi + 1, n))
        if len(grid) >= 2:
            return Scale(lo, hi, n) if first == lo and grid[-1] == hi else Scale(lo, hi, n, grid)
    g = _STEPS.search(window)
    if g and _int(g.group(1)) > 1 and (hi - lo) // _int(g.group(1)) >= 1:
        n = _int(g.group(1))
        grid = tuple(range(lo, hi + 1, n))
        return Scale(lo, hi, n) if grid[-1] == hi else Scale(lo, hi, n, grid)
    return Scale(lo, hi)


@functools.lru_cache(maxsize=4096)  # a test split repeats each stimulus over its cell's rows
def parse_scale(text: str) -> Scale | None:
    """The answer scale a stimulus states, or None when it states none (see the module doc)."""
    if not text:
        return None
    found = _candidates(text)
    if not found:
        return None
    instructions = list(_INSTRUCTION.finditer(text))
    if instructions:
        at = instructions[-1].start()
        after = [f for f in found if f.start >= at]
        if after:
            return after[0].scale
    keyed = [f for f in found if f.keyed]
    return keyed[-1].scale if keyed else None


def has_instruction(text: str) -> bool:
    """Whether the text holds an answer instruction ("Only return ...")."""
    return bool(_INSTRUCTION.search(text or ""))


def instruction(scale: Scale) -> str:
    """The SocSci210-style sentence stating `scale`; parse_scale reads it back as `scale`."""
    if scale.plain:
        return f"Only return an integer from {scale.lo} to {scale.hi}, nothing else."
    if scale.options is None and scale.lo % scale.step == 0:
        return f"Only return a multiple of {scale.step} between {scale.lo} and {scale.hi}, nothing else."
    if scale.options is None:
        return f"Only return an integer from {scale.lo} to {scale.hi} in steps of {scale.step}, nothing else."
    *head, last = scale.values()
    return f"Only return {', '.join(map(str, head))} or {last}, nothing else."
