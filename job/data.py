"""SocSci210 rows: loading (hub id, local parquet/jsonl file or folder, `synthetic:N`), validation,
splits (the SOCRATES paper, arXiv 2509.05830), the stratified subset, prompt rendering and the (input_ids, labels) pair.

Every data problem is a `ContractError` naming the file and what is wrong (the CLI: exit 2).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from contracts.config import PARTICIPANT_FRACTION, SPLITS
from contracts.errors import ContractError
from job import synthetic

# The row schema lives in contracts/ (stdlib only): the launcher checks local rows with it before launching.
from contracts.rows import no_participants, participant_id, short, validate_rows

MAPPING_FILES = {
    "unseen-studies": "participant_mapping.json",
    "unseen-conditions": "condition_mapping.json",
    "unseen-tasks": "task_mapping.json",
}
PROFILE_HEADER = "You are a survey respondent with the following demographic profile:"
INSTRUCTION = ("Read the question below and answer exactly as this person would. "
               "Follow the response instructions precisely.")
ALL_TEST = "all-test"
UNSEEN_PARTICIPANTS = "unseen-participants"
PREPARE_SPLITS = (*SPLITS, ALL_TEST)  # all-test is for `prepare` only: a run config trains on a split
TEST_FRACTION = 0.2  # without the authors' mappings: ~40/210 studies held out, as in the paper


@dataclass
class Source:
    """Rows and the metadata mappings found beside them (empty when the source has none)."""

    rows: list[dict]
    name: str
    mappings: dict[str, Any] = field(default_factory=dict)


# --- Loading ---------------------------------------------------------------------------------

def load_source(src: str, seed: int = 42) -> Source:
    """`synthetic:N`, a local .jsonl/.json/.parquet file or folder, or a Hugging Face dataset id."""
    n = synthetic.parse_source(src)
    if n is not None:
        return Source(synthetic.generate(n, seed=seed), src)
    path = Path(src)
    if path.exists():
        return _load_local(path)
    if src.count("/") == 1 and not src.startswith((".", "/")) and not path.suffix:
        return _load_hub(src)
    raise ContractError(f"data source {src!r}: no such file or folder (give a .jsonl/.parquet file or "
                        "folder, a Hugging Face dataset id like socratesft/SocSci210, or synthetic:N)")


def _load_local(path: Path) -> Source:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet")
                       and "metadata" not in p.parts and not p.name.startswith("."))
        if not files:
            raise ContractError(f"{path}: no .jsonl or .parquet files in this folder")
        meta_dirs = [path / "metadata"]
    else:
        files = [path]
        meta_dirs = [path.parent / "metadata"]
    rows: list[dict] = []
    for f in files:
        rows.extend(_read_file(f))
    mappings = {}
    for d in meta_dirs:
        for split, fname in MAPPING_FILES.items():
            if (d / fname).is_file():
                mappings[split] = _read_mapping(split, d / fname)
    validate_rows(rows, str(path))
    return Source(rows, str(path), mappings)


def _read_file(f: Path) -> list[dict]:
    try:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(f).to_pylist()
        rows = []
        with open(f, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ContractError(f"{f}: line {i} is not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ContractError(f"{f}: line {i} is not a JSON object")
                rows.append(obj)
        return rows
    except ContractError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ContractError(f"{f}: unreadable ({first})") from None
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a damaged parquet file
        raise ContractError(f"{f}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _read_mapping(split: str, f: Path) -> Any:
    """The authors' metadata, checked: participant_mapping.json {"seen": [study_id, ...], "unseen": [...]};
    condition_/task_mapping.json {study_id: {"train": [int, ...], "eval": [int, ...]}, ...}."""
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ContractError(f"{f}: unreadable mapping ({e})") from None
    what = "condition_num" if split == "unseen-conditions" else "task_num"
    expected = ('an object {"seen": [study_id, ...], "unseen": [study_id, ...]}' if split == "unseen-studies"
                else f'an object {{study_id: {{"train": [{what}, ...], "eval": [{what}, ...]}}, ...}}')
    if not isinstance(obj, dict):
        raise ContractError(f"{f}: is a {_json_type(obj)}, expected {expected}")
    if split == "unseen-studies":
        for key in ("seen", "unseen"):
            v = obj.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise ContractError(f"{f}: {key!r} is {short(v)}, expected {expected}")
        return obj
    for study, v in obj.items():
        if not isinstance(v, dict):
            raise ContractError(f"{f}: study {study!r} maps to {short(v)}, expected {expected}")
        for key in ("train", "eval"):
            xs = v.get(key)
            if xs is not None and not (isinstance(xs, list) and
                                       all(isinstance(x, int) and not isinstance(x, bool) for x in xs)):
                raise ContractError(f"{f}: study {study!r} {key!r} is {short(xs)}, expected {expected}")
    return obj


def _json_type(obj: Any) -> str:
    return {dict: "JSON object", list: "JSON list", str: "JSON string", bool: "JSON boolean",
            type(None): "JSON null"}.get(type(obj), "JSON number")


def _load_hub(repo_id: str) -> Source:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, repo_type="dataset",
                                   allow_patterns=["*.parquet", "metadata/*.json", "*.jsonl"])
    except Exception as e:  # offline, gated, unknown id: one line, exit 2
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ContractError(f"data source {repo_id!r}: could not download from the Hugging Face hub "
                            f"({type(e).__name__}: {first[:160]}); give a local file or folder instead") from None
    src = _load_local(Path(folder))
    src.name = repo_id
    return src


# --- Prompt ----------------------------------------------------------------------------------

def render_prompt(row: dict) -> str:
    """The row's own `prompt` verbatim; else the SOCRATES paper's format from demographic + stimuli."""
    if row.get("prompt"):
        return row["prompt"]
    demo = row.get("demographic") or {}
    lines = [PROFILE_HEADER]
    for key, value in demo.items():
        if value is None:
            continue
        label = " ".join(w.capitalize() for w in key.split("_"))
        lines.append(f"- {label}: {value}")
    return "\n".join(lines) + "\n\n" + INSTRUCTION + "\n\n" + row["stimuli"]


def messages(row: dict, system_prompt: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": render_prompt(row)}]


def answer_end_id(tok) -> int:
    """The id that closes an answer: <|im_end|> for ChatML tokenizers, else EOS."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id and im_end is not None:
        return im_end
    return tok.eos_token_id


def encode(tok, rows: list[dict], system_prompt: str) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: chat-templated prompt, then the integer answer + <|im_end|>;
    labels are -100 everywhere except the answer tokens."""
    prompts = [tok.apply_chat_template(messages(r, system_prompt), tokenize=False, add_generation_prompt=True)
               for r in rows]
    answers = [str(int(r["response"])) for r in rows]
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    a_ids = tok(answers, add_special_tokens=False)["input_ids"]
    end = answer_end_id(tok)
    out = []
    for p, a in zip(p_ids, a_ids):
        target = list(a) + [end]
        out.append((list(p) + target, [-100] * len(p) + target))
    return out


# --- Splits and subset -----------------------------------------------------------------------

def split_rows(src: Source, split: str, seed: int, participant_fraction: float = PARTICIPANT_FRACTION
               ) -> tuple[list[dict], list[dict]]:
    """(train, test) per the SOCRATES paper: the authors' mapping when the source has it, else deterministic.
    `unseen-participants`: `participant_fraction` of each study's participants train, the others are test.
    `all-test`: every row in the test split (nothing to train on), for scoring a whole file."""
    if split not in PREPARE_SPLITS:
        raise ContractError(f"--split: {split!r} is not accepted ({' | '.join(PREPARE_SPLITS)})")
    rows, mapping = src.rows, src.mappings.get(split)
    if split == ALL_TEST:
        return [], list(rows)
    if split == UNSEEN_PARTICIPANTS:
        trained = _training_participants(src, participant_fraction, seed)
        test_idx = {i for i, r in enumerate(rows) if (r["study_id"], r["participant"]) not in trained}
    elif split == "random":
        idx = list(range(len(rows)))
        random.Random(seed).shuffle(idx)
        test_idx = set(idx[:max(1, round(len(rows) * TEST_FRACTION))])
    elif split == "unseen-studies":
        if mapping is not None:
            unseen = set(mapping.get("unseen") or [])
        else:
            unseen = set(_held_out(sorted({r["study_id"] for r in rows}), seed, "studies"))
        test_idx = {i for i, r in enumerate(rows) if r["study_id"] in unseen}
    else:
        col = "condition_num" if split == "unseen-conditions" else "task_num"
        held: dict[str, set] = {}
        if mapping is not None:
            held = {s: set(v.get("eval") or []) for s, v in mapping.items()}
        else:
            values: dict[str, set] = {}
            for r in rows:
                values.setdefault(r["study_id"], set()).add(r[col])
            for s, vals in values.items():
                if len(vals) >= 2:
                    held[s] = set(_held_out(sorted(vals), seed, f"{s}/{col}"))
        # Studies without held-out values train whole: only the mapped cells are unseen.
        test_idx = {i for i, r in enumerate(rows) if r[col] in held.get(r["study_id"], ())}
    train = [r for i, r in enumerate(rows) if i not in test_idx]
    test = [r for i, r in enumerate(rows) if i in test_idx]
    for name, part in (("train", train), ("test", test)):
        if not part:
            raise ContractError(f"{src.name}: the {split} split leaves the {name} side empty "
                                f"({len(rows)} rows, {len({r['study_id'] for r in rows})} studies); "
                                "give more studies or another --split")
    return train, test


def _training_participants(src: Source, fraction: float, seed: int) -> set[tuple[str, Any]]:
    """(study_id, participant) pairs that train: per study, round(fraction x its participants), at least 1
    and never all (a study of one participant is all test), chosen by a seeded hash; so the split is
    stratified by study, deterministic, and no participant has rows on both sides."""
    missing = [i for i, r in enumerate(src.rows) if participant_id(r) is None]
    if missing:
        r = src.rows[missing[0]]
        raise no_participants(src.name, len(missing), len(src.rows),
                              f"row {missing[0]}, study {r['study_id']}: participant {short(r.get('participant'))}")
    per_study: dict[str, set] = {}
    for r in src.rows:
        per_study.setdefault(r["study_id"], set()).add(r["participant"])
    trained: set[tuple[str, Any]] = set()
    for study, people in per_study.items():
        ranked = sorted(people, key=lambda p: hashlib.sha256(f"{seed}:{study}:participant:{p}".encode()).hexdigest())
        k = min(len(ranked) - 1, max(1, round(len(ranked) * fraction)))
        trained.update((study, p) for p in ranked[:k])
    return trained


def _held_out(values: list, seed: int, salt: str) -> list:
    """A deterministic ~20% of `values` (at least 1, never all), by a seeded hash."""
    ranked = sorted(values, key=lambda v: hashlib.sha256(f"{seed}:{salt}:{v}".encode()).hexdigest())
    k = min(len(values) - 1, max(1, round(len(values) * TEST_FRACTION)))
    return ranked[:k]


def stratified_subset(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """Keep `fraction` of each study's rows (at least one per study), original order kept."""
    if fraction >= 1:
        return list(rows)
    by_study: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_study.setdefault(r["study_id"], []).append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for s in sorted(by_study):
        idx = by_study[s]
        k = max(1, round(len(idx) * fraction))
        keep.update(rng.sample(idx, k))
    return [r for i, r in enumerate(rows) if i in keep]


# --- Files -----------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, every mapping in its source order: a row rendered from its
    `demographic` (no `prompt`) lists the fields as the source does, so nothing here is sorted."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_stats(data_dir: str | Path) -> dict:
    """The stats.json `prepare` wrote beside the splits, or {} when there is none or it is unreadable
    (it only names the split in results; the rows themselves are checked by read_split)."""
    try:
        stats = json.loads((Path(data_dir) / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stats if isinstance(stats, dict) else {}


def split_file(data_dir: str | Path, name: str = "train") -> Path:
    """`data_dir`/NAME.jsonl, or a ContractError saying to run `prepare` first: checked before anything heavy."""
    f = Path(data_dir) / f"{name}.jsonl"
    if not f.is_file():
        raise ContractError(f"--data {data_dir}: no {name}.jsonl (run `python -m job prepare --out {data_dir}` first)")
    return f


def read_split(data_dir: str | Path, name: str = "train") -> list[dict]:
    f = split_file(data_dir, name)
    rows = _read_file(f)
    validate_rows(rows, str(f))
    return rows


def content_hash(data_dir: str | Path) -> str:
    """sha256 over the split files, in a fixed order: what the manifest calls the data hash."""
    h = hashlib.sha256()
    for name in ("train.jsonl", "test.jsonl"):
        f = Path(data_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()
