"""job/ data side: tokenizer ids, prompt rendering, label masking, splits, subset, bad data (exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from contracts.errors import ContractError
from job import data as D
from job import synthetic
from job.prepare import prepare
from job.tokenizer import qwen25_offline
from conftest import REAL_SAMPLE, REPO, needs_real_sample
SYSTEM = "You are simulating a survey respondent. Answer exactly as instructed, following the specified response format without additional commentary."


@pytest.fixture(scope="module")
def tok():
    return qwen25_offline()


def test_offline_tokenizer_gives_qwen_ids(tok):
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    # Qwen2 splits digits one by one; ChatML specials sit at Qwen2.5's ids
    assert tok("2024", add_special_tokens=False)["input_ids"] == [17, 15, 17, 19]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == \
        [151643, 151644, 151645, 151664]
    assert len(tok) == 151665
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [151644, 8948, 198] and ids[-3:] == [151644, 77091, 198]  # "system", "\n", "assistant"


_BUILD_THEN_LOAD = """
import json, pathlib, sys
from job.tokenizer import qwen25_offline
built = qwen25_offline()  # from the BPE ranks; writes the cache
(folder,) = pathlib.Path(sys.argv[1]).glob("qwen2.5-tokenizer-*")
loaded = qwen25_offline()  # from the cached tokenizer.json
texts = ["Hello world", "2024 <|im_end|>\\n<tool_call>x</tool_call>", " \u00dcn\u00efc\u00f6d\u00e9  \\t spaces", "<|file_sep|><|fim_pad|>"]
chat = [{"role": "user", "content": "Q"}]
def view(t):
    return {"ids": [t(x, add_special_tokens=False)["input_ids"] for x in texts], "n": len(t),
            "chat": t.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
            **{a: getattr(t, a) for a in ("eos_token_id", "pad_token_id", "bos_token", "unk_token", "padding_side",
                                          "model_max_length", "all_special_ids", "clean_up_tokenization_spaces")}}
loaded.save_pretrained(pathlib.Path(sys.argv[1]) / "saved")  # what an adapter carries
print(json.dumps({"built": view(built), "loaded": view(loaded), "vocab_equal": built.get_vocab() == loaded.get_vocab(),
                  "saved_equal": (folder / "tokenizer.json").read_bytes()
                  == (pathlib.Path(sys.argv[1]) / "saved" / "tokenizer.json").read_bytes()}))
"""


@pytest.mark.slow  # builds the tokenizer from the BPE ranks in a fresh process: ~14 s on 2 cores
def test_the_cached_tokenizer_loads_as_the_one_built_from_the_ranks(tmp_path):
    # In a process of its own with HF_HUB_OFFLINE=1, as the job runs in the tests and on offline machines
    # (transformers reads it once, at import): a fresh cache, built, then loaded from it.
    env = {**os.environ, "SOCRATES_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _BUILD_THEN_LOAD, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["built"] == got["loaded"] and got["vocab_equal"] and got["saved_equal"]
    assert got["loaded"]["n"] == 151665 and got["loaded"]["ids"][0] == [9707, 1879]
    assert got["loaded"]["eos_token_id"] == 151645 and got["loaded"]["pad_token_id"] == 151643


def test_prompt_renders_paper_format_byte_for_byte():
    row = {"demographic": {"age": 34, "gender": "Female", "education": None, "party_id": "Lean Democrat",
                           "household_size": 3},
           "stimuli": "How much do you agree? Only return an integer from 1 to 5, nothing else.", "prompt": None}
    assert D.render_prompt(row) == (
        "You are a survey respondent with the following demographic profile:\n"
        "- Age: 34\n- Gender: Female\n- Party Id: Lean Democrat\n- Household Size: 3\n\n"
        "Read the question below and answer exactly as this person would. Follow the response instructions precisely.\n\n"
        "How much do you agree? Only return an integer from 1 to 5, nothing else.")
    assert D.render_prompt({**row, "prompt": "verbatim"}) == "verbatim"


@needs_real_sample
def test_rendering_matches_the_authors_prompts_on_real_rows():
    rows = [json.loads(line) for line in REAL_SAMPLE.open(encoding="utf-8")]
    with_prompt = [r for r in rows if r.get("prompt")]
    assert len(with_prompt) > 1000
    mismatched = [r["sample_id"] for r in with_prompt if D.render_prompt({**r, "prompt": None}) != r["prompt"]]
    assert mismatched == []


def test_labels_mask_everything_but_the_answer(tok):
    rows = synthetic.generate(12, seed=3)
    for row, (ids, labels) in zip(rows, D.encode(tok, rows, SYSTEM)):
        scored = [t for t, l in zip(ids, labels) if l != -100]
        assert tok.decode(scored) == f"{row['response']}<|im_end|>"
        n = len(scored)
        assert labels[:-n] == [-100] * (len(ids) - n) and labels[-n:] == ids[-n:]
        prompt = tok.decode(ids[:-n])
        assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
        assert prompt.endswith(D.render_prompt(row) + "<|im_end|>\n<|im_start|>assistant\n")


def test_synthetic_is_deterministic_and_varied():
    a, b = synthetic.generate(240, seed=1), synthetic.generate(240, seed=1)
    assert a == b and a != synthetic.generate(240, seed=2)
    assert len({r["study_id"] for r in a}) >= 4
    assert len({(r["study_id"], r["condition_num"], r["task_num"]) for r in a}) > 8
    assert len({r["response"] for r in a}) > 3
    D.validate_rows(a, "synthetic")


def test_unseen_studies_split_is_disjoint_and_subset_keeps_every_study():
    src = D.load_source("synthetic:600", seed=0)
    train, test = D.split_rows(src, "unseen-studies", seed=7)
    s_train, s_test = {r["study_id"] for r in train}, {r["study_id"] for r in test}
    assert s_train and s_test and not (s_train & s_test)
    assert len(train) + len(test) == 600
    assert D.split_rows(src, "unseen-studies", seed=7) == (train, test)  # deterministic
    sub = D.stratified_subset(train, 0.01, seed=7)  # 1% would drop small studies without stratification
    assert {r["study_id"] for r in sub} == s_train
    assert len(sub) < len(train) / 5


def test_mappings_decide_the_split_when_present(tmp_path):
    rows = synthetic.generate(200, seed=0)
    studies = sorted({r["study_id"] for r in rows})
    (tmp_path / "metadata").mkdir()
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "metadata" / "participant_mapping.json").write_text(json.dumps({"seen": studies[1:], "unseen": studies[:1]}))
    (tmp_path / "metadata" / "condition_mapping.json").write_text(
        json.dumps({studies[0]: {"train": [1], "eval": [2]}}))
    src = D.load_source(str(tmp_path))
    train, test = D.split_rows(src, "unseen-studies", seed=0)
    assert {r["study_id"] for r in test} == {studies[0]}
    train, test = D.split_rows(src, "unseen-conditions", seed=0)
    assert {(r["study_id"], r["condition_num"]) for r in test} == {(studies[0], 2)}
    assert all(not (r["study_id"] == studies[0] and r["condition_num"] == 2) for r in train)
    # without a mapping: per-study held-out tasks, never all of a study's tasks
    train, test = D.split_rows(src, "unseen-tasks", seed=0)
    held = {(r["study_id"], r["task_num"]) for r in test}
    assert held and not held & {(r["study_id"], r["task_num"]) for r in train}


def test_prepare_writes_splits_stats_and_hash(tmp_path):
    res = prepare("synthetic:120", tmp_path, subset=0.5, seed=3)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["train"]["rows"] == res.train_rows == sum(1 for _ in open(tmp_path / "train.jsonl"))
    t = stats["train"]["tokens"]
    assert 0 < t["p50"] <= t["p90"] <= t["max"] and t["total"] == sum(v["total"] for v in stats["train"]["per_study"].values())
    assert stats["train"]["cells"] >= stats["train"]["studies"]
    assert res.data_hash == D.content_hash(tmp_path) == stats["data_hash"]
    again = prepare("synthetic:120", tmp_path / "again", subset=0.5, seed=3)
    assert again.data_hash == res.data_hash


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


ROW = '{"study_id": "abcde", "response": 3, "condition_num": 1, "task_num": 1, '
OK_ROW = ROW + '"prompt": "p"}\n'


@pytest.mark.parametrize("content,problem,meta,args", [
    ('{"study_id": "abcde", "response": 3, "condition_num": 1}\n', "missing column(s) task_num", None, ()),
    (ROW[:-1].replace("3", '"three"', 1) + ' "prompt": "p"}\n', "not an integer", None, ()),
    (ROW.replace("3", "2.5", 1) + '"prompt": "p"}\n', "not an integer", None, ()),
    (OK_ROW, "test side empty", None, ()),
    ('{"study_id": "abcde", "resp', "not valid JSON", None, ()),
    # wrong types that used to pass validation and crash (exit 1) after the splits were written
    (ROW + '"stimuli": "q", "demographic": 5}\n', "row 0: demographic 5 is not an object", None, ()),
    (ROW + '"stimuli": "q", "demographic": "abc"}\n', "demographic 'abc' is not an object", None, ()),
    (ROW + '"stimuli": "q", "demographic": ["a"]}\n', "demographic ['a'] is not an object", None, ()),
    (ROW + '"prompt": "p", "demographic": 5}\n', "demographic 5 is not an object", None, ()),
    (ROW + '"prompt": 5}\n', "row 0: prompt 5 is not text", None, ()),
    (ROW + '"prompt": ["p"], "stimuli": "q", "demographic": {}}\n', "prompt ['p'] is not text", None, ()),
    (ROW + '"prompt": "p", "stimuli": 7}\n', "stimuli 7 is not text", None, ()),
    # malformed metadata: one line naming the mapping file and the expected shape
    (OK_ROW, "is a JSON list, expected an object {\"seen\"", {"participant_mapping.json": "[1, 2]"}, ()),
    (OK_ROW, "'unseen' is 5, expected", {"participant_mapping.json": '{"unseen": 5}'}, ()),
    (OK_ROW, "study 'abcde' maps to [1, 2], expected an object {study_id: {\"train\": [condition_num",
     {"condition_mapping.json": '{"abcde": [1, 2]}'}, ("--split", "unseen-conditions")),
    (OK_ROW, "study 'abcde' 'eval' is 'x', expected", {"task_mapping.json": '{"abcde": {"eval": "x"}}'},
     ("--split", "unseen-tasks")),
])
def test_bad_data_exits_2_with_one_line_naming_file_and_problem(tmp_path, content, problem, meta, args):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    named = bad
    for fname, text in (meta or {}).items():
        (tmp_path / "metadata").mkdir(exist_ok=True)
        named = tmp_path / "metadata" / fname
        named.write_text(text)
    out = tmp_path / "out"
    r = _job("prepare", "--data", str(bad), "--out", str(out), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(named) in lines[0] and problem in lines[0], r.stderr
    assert not out.exists()  # nothing created: no splits, no events.jsonl
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left


def test_bad_data_leaves_an_existing_prepared_folder_byte_identical(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in synthetic.generate(60, seed=0)))
    out = tmp_path / "out"
    r = _job("prepare", "--data", str(good), "--out", str(out))
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"train.jsonl", "test.jsonl", "stats.json", "events.jsonl"} <= set(before)
    bad = tmp_path / "bad.jsonl"
    rows = synthetic.generate(60, seed=1)
    rows[7]["demographic"] = ["a"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _job("prepare", "--data", str(bad), "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "row 7" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]


@pytest.mark.parametrize("verb", ["prepare", "train"])
def test_out_empty_or_a_file_is_refused(tmp_path, verb):
    a_file = tmp_path / "taken"
    a_file.write_text("keep")
    extra = ["--data", "synthetic:60"] if verb == "prepare" else ["--config", str(REPO / "configs" / "smoke.yaml")]
    for out, problem in (("", "--out: empty"), ("  ", "--out: empty"), (str(a_file), "is not a folder")):
        r = subprocess.run([sys.executable, "-m", "job", verb, *extra, "--out", out], cwd=tmp_path,  # cwd: where "" points
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and problem in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and a_file.read_text() == "keep"


def test_unreadable_file_exits_2(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    r = _job("prepare", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unreadable" in r.stderr and str(bad) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _job("prepare", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr


def test_bad_source_names():
    with pytest.raises(ContractError, match="whole number >= 1"):
        D.load_source("synthetic:abc")
    with pytest.raises(ContractError, match="unseen-studies"):
        D.split_rows(D.load_source("synthetic:50"), "by-vibes", 0)


# --- unseen-participants: the paper's setting (a fraction of each study's participants trains) -------------

def _people(rows: list[dict]) -> set[tuple]:
    return {(r["study_id"], r["participant"]) for r in rows}


def test_unseen_participants_split_shares_no_participant_and_is_stratified_per_study():
    src = D.load_source("synthetic:600", seed=0)
    # Generated rows carry participant ids, each answering several questions of one study.
    per_person = {}
    for r in src.rows:
        per_person[(r["study_id"], r["participant"])] = per_person.get((r["study_id"], r["participant"]), 0) + 1
    assert max(per_person.values()) >= 3
    train, test = D.split_rows(src, "unseen-participants", seed=7, participant_fraction=0.25)
    assert not _people(train) & _people(test)
    assert len(train) + len(test) == 600 and sorted(map(id, train + test)) == sorted(map(id, src.rows))
    assert D.split_rows(src, "unseen-participants", seed=7, participant_fraction=0.25) == (train, test)
    assert D.split_rows(src, "unseen-participants", seed=8, participant_fraction=0.25) != (train, test)
    # Per study: round(25% of its participants), at least 1, never all; computed here by counting.
    for study in {r["study_id"] for r in src.rows}:
        everyone = {p for s, p in per_person if s == study}
        trained = {p for s, p in _people(train) if s == study}
        assert len(trained) == min(len(everyone) - 1, max(1, round(len(everyone) * 0.25))), study
    # The default is the paper's 10%.
    train10, _ = D.split_rows(src, "unseen-participants", seed=7)
    assert len(_people(train10)) < len(_people(train))


def test_unseen_participants_one_participant_study_is_all_test():
    rows = [{"study_id": s, "participant": p, "response": 1, "condition_num": 1, "task_num": t, "prompt": "q"}
            for s, people in (("aaaaa", 10), ("bbbbb", 1)) for p in range(people) for t in (1, 2)]
    train, test = D.split_rows(D.Source(rows, "hand"), "unseen-participants", seed=0, participant_fraction=0.3)
    # aaaaa: 3 of 10 participants (6 rows) train; bbbbb's only participant is test.
    assert len(_people(train)) == 3 and {s for s, _ in _people(train)} == {"aaaaa"}
    assert len(train) == 6 and ("bbbbb", 0) in _people(test)


def test_unseen_participants_prepare_writes_the_split_and_zero_shared(tmp_path):
    r = _job("prepare", "--data", "synthetic:300", "--split", "unseen-participants", "--participant-fraction", "0.2",
             "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "unseen-participants: 0.2 of each study's participants train, 0 shared" in r.stdout
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    train = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert stats["split"] == "unseen-participants" and stats["participant_fraction"] == 0.2
    assert stats["participants"] == {"train": len(_people(train)), "test": len(_people(test)), "shared": 0}
    assert not _people(train) & _people(test)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_participant_fraction_out_of_range_is_refused(tmp_path, value):
    r = _job("prepare", "--data", "synthetic:60", "--split", "unseen-participants", "--participant-fraction", value,
             "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--participant-fraction: {float(value)!r} is not accepted (a fraction in (0, 1)" in r.stderr
    assert not (tmp_path / "out").exists()


def test_rows_without_participant_ids_are_refused_in_one_line(tmp_path):
    rows = synthetic.generate(60, seed=0)
    rows[5]["participant"] = None
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _job("prepare", "--data", str(src), "--split", "unseen-participants", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{src}: --split unseen-participants needs participant ids, and 1 of 60 rows have none (row 5" in r.stderr
    assert not (tmp_path / "out").exists()


@needs_real_sample
def test_real_sample_unseen_participants(tmp_path):
    """The sample's `participant` is null on every row: a one-line refusal. With ids attached (here: one
    participant per (study, demographic profile), an approximation), the split shares none."""
    r = _job("prepare", "--data", str(REAL_SAMPLE), "--split", "unseen-participants", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "needs participant ids, and 2,780 of 2,780 rows have none" in r.stderr
    assert not (tmp_path / "out").exists()

    rows = [json.loads(line) for line in REAL_SAMPLE.open(encoding="utf-8")]
    ids: dict[tuple, int] = {}
    for row in rows:
        key = (row["study_id"], json.dumps(row["demographic"], sort_keys=True))
        row["participant"] = ids.setdefault(key, len(ids))
    train, test = D.split_rows(D.Source(rows, "real+ids"), "unseen-participants", seed=42)
    assert not _people(train) & _people(test)
    assert len(train) + len(test) == len(rows)
    studies = {r["study_id"] for r in rows}
    people = {s: {p for t, p in _people(rows) if t == s} for s in studies}
    assert {r["study_id"] for r in train} == {s for s in studies if len(people[s]) > 1}
