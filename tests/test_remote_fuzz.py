"""Issue 25, acceptance 2: property-based tests (hypothesis) over every reader of what a machine sends.
For any input: no exception escapes but the reader's own one-line refusal, what passes is what the
schema accepts (finite, bounded numbers; no control character on its way to the terminal), and a bad
line among good ones never loses a good event. The suite runs a modest number of examples per reader;
bench/fuzz_remote_readers.py runs the same properties at 10,000 examples each and prints a table.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import events, remote
from contracts.errors import ContractError
from contracts.events import LINE_PREFIX

EXAMPLES = int(os.environ.get("SOCRATES_FUZZ_EXAMPLES", "30"))
RUNS = Counter()  # examples each property ran (bench/fuzz_remote_readers.py prints them)
FAST = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHOWN_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

# --- what a hostile machine writes ------------------------------------------------------------------

HOSTILE_TEXT = st.sampled_from(["\x1b]52;c;cm0gLXJmIH4K\x07", "\x1b[2J\x1b[H", "\x1b]8;;https://e.x/\x1b\\l\x1b]8;;\x1b\\",
                                "\r\x1b[1;32madapter:\x1b[0m /x (verified)", "\x9b31m", "\u202e", "[/]", "[bold]",
                                "\x00", "\x07", "\t", "\n"])
TEXT = st.one_of(st.text(max_size=30), HOSTILE_TEXT, st.lists(HOSTILE_TEXT | st.text(max_size=5), max_size=6).map("".join))
# Numbers as the machine may write them: bare tokens json.dumps would never produce.
NUMBER_TOKENS = st.one_of(st.integers(-2 ** 70, 2 ** 70).map(str), st.floats(allow_nan=False).map(repr),
                          st.sampled_from(["Infinity", "-Infinity", "NaN", "1e999", "-1e999", "7" * 401, "9" * 5000,
                                           "1" * 19, "9" * 19, "-0", "0.0", "1E400", "true", "false", "null"]))


def _json_text(value) -> str:
    """JSON text of a generated value; a ("raw", token) pair is written as the bare token."""
    if isinstance(value, tuple):
        return value[1]
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + _json_text(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_json_text, value)) + "]"
    return json.dumps(value)


VALUES = st.recursive(st.one_of(st.none(), st.booleans(), TEXT, NUMBER_TOKENS.map(lambda t: ("raw", t))),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=8)
FIELDS = sorted({f for kind in events.REQUIRED.values() for f in kind} | {"v", "ts", "detail", "data_sha256", "levers"})


@st.composite
def event_objects(draw) -> dict:
    """An object that looks like an event: a kind (known, launcher-only or made up) and fields of any type."""
    kind = draw(st.sampled_from([*events.KINDS, "phase", "bogus", ""]) | TEXT)
    obj = {"v": 1, "event": kind, "ts": draw(st.one_of(st.floats(0, 2e9), VALUES))}
    names = list(events.REQUIRED.get(kind, ())) + draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=4))
    for name in names:
        if draw(st.integers(0, 9)):  # now and then a required field is missing
            obj[name] = draw(VALUES)
    return obj


EVENT_LINES = st.builds(lambda obj, prefix: prefix + _json_text(obj), event_objects(),
                        st.sampled_from([LINE_PREFIX, "", "(head, rank=0) " + LINE_PREFIX, LINE_PREFIX[:-1]]))
LINES = st.one_of(EVENT_LINES, TEXT, st.binary(max_size=60).map(lambda b: b.decode("latin-1")))


def _counted(name: str):
    RUNS[name] += 1


def _check_numbers(v) -> None:
    """Every number in `v` finite and bounded (|n| < 2**63)."""
    if isinstance(v, float):
        assert math.isfinite(v)
    elif isinstance(v, int) and not isinstance(v, bool):
        assert -remote.MAX_INT < v < remote.MAX_INT
    elif isinstance(v, dict):
        list(map(_check_numbers, v.values()))
    elif isinstance(v, list):
        list(map(_check_numbers, v))


def _check_event(ev: dict) -> None:
    """What parse_line hands on is an event of a kind the job may send, its required fields typed, and
    every number in it finite and bounded."""
    assert events.validate(ev) is ev and ev["event"] in events.MACHINE_KINDS
    _check_numbers(ev)


def _render(evs: list[dict], terminal: bool = False) -> str:
    from rich.console import Console

    from launcher.progress import Progress

    buf = io.StringIO()
    progress = Progress(Console(file=buf, width=120, force_terminal=terminal), plain=not terminal, price_per_hour=1.0)
    for ev in evs:
        progress.on_event(ev)
    progress.close()
    return buf.getvalue()


# --- the properties ---------------------------------------------------------------------------------

@FAST
@given(LINES)
def test_fuzz_event_lines(line):
    """parse_line never raises; what it accepts renders without a control character reaching the terminal."""
    _counted("events.parse_line + Progress")
    ev = events.parse_line(line)
    if ev is not None:
        _check_event(ev)
        from launcher.backends.managed import _key

        hash(_key(ev))  # managed follow's dedupe key
        assert not SHOWN_CONTROLS.search(_render([ev]).replace("\n", ""))
        _render([ev, ev], terminal=True)  # the live bar (its own colours are escapes: only no exception)


def _good(i: int) -> str:
    return LINE_PREFIX + events.dumps(events.make("step", step=i, total_steps=99, epoch=0.1, loss=1.0, lr=0.1,
                                                  tokens_per_s=1.0, gpu_mem_gib=0.0, eta_s=5.0, ts=1000.0 + i))


@FAST
@given(st.lists(st.one_of(LINES, st.integers(300, 3000).map(lambda n: "x" * n)), max_size=8),
       st.lists(st.integers(1, 400), min_size=1, max_size=6), st.data())
def test_fuzz_event_stream_never_loses_a_good_event(bad, cuts, data):
    """Good step events among arbitrary lines (some over the line limit), cut into arbitrary chunks:
    the reader returns every good event, in order, and nothing it returns is outside the schema."""
    _counted("EventReader (chunks, long lines)")
    bad = [b.replace("\n", " ").replace("\r", " ") for b in bad]
    lines = [*bad]
    at = sorted(data.draw(st.lists(st.integers(0, len(bad)), min_size=3, max_size=3)))
    for i in (3, 2, 1):  # from the last: each good line goes in before the bad line at its position
        lines.insert(at[i - 1], _good(i))
    stream = "".join(line + "\n" for line in lines).encode("utf-8", errors="surrogateescape")
    chunks, at = [], 0
    while at < len(stream):
        step = cuts[len(chunks) % len(cuts)]
        chunks.append(stream[at:at + step])
        at += step
    reader = events.EventReader(Path("/nonexistent"), lines=remote.Lines(limit=256), skips=remote.Skips())
    got = reader.feed(chunks)
    assert reader.offset == len(stream)
    for ev in got:
        _check_event(ev)
    assert [e["step"] for e in got if e["event"] == "step" and e["ts"] == 1000.0 + e["step"]
            and e.get("total_steps") == 99] == [1, 2, 3]
    _render(got)


class _Stream:
    """A cloud whose job SUCCEEDED and whose log stream (every reconnect) gives `lines` (tests/fakesky.py
    shaped: the adapter calls the sky and managed backends make while following)."""

    def __init__(self, lines: list[str]):
        self.lines, self.tails = lines, 0

    def tail(self, cluster, job_id):
        self.tails += 1
        return iter(self.lines)

    def jobs_tail(self, job_id):
        return self.tail(None, job_id)

    def job_exit_code(self, cluster, job_id):
        return 0

    def jobs_queue(self, job_id, refresh=False):
        return {"status": "SUCCEEDED", "recovery_count": 0}

    def cluster_state(self, cluster):
        return "up"


@FAST
@given(st.lists(LINES, max_size=6), st.sampled_from(["sky", "managed"]))
def test_fuzz_follow_ends_a_succeeded_job_whatever_its_lines(lines, backend):
    """The sky and managed backends' follow, fed any lines by a job that succeeded: exit 0 on the first
    pass (never a reconnect loop), every delivered event valid, the recorder's display never raising."""
    from launcher.backends.managed import ManagedBackend
    from launcher.backends.sky import SkyBackend

    _counted("sky/managed follow (SUCCEEDED job)")
    stream = _Stream([ln.replace("\n", " ") for ln in lines])
    got = []
    with tempfile.TemporaryDirectory() as d:
        run = SimpleNamespace(id="r-20260101-000000-abcd", backend_state={"job_id": 1},
                              events_path=Path(d) / "events.jsonl", log_path=Path(d) / "job.log",
                              update=lambda **kw: None)
        make = ManagedBackend if backend == "managed" else SkyBackend
        assert make(adapter=stream, reconnect=(0.001, 0.001, 0.01)).follow(run, got.append) == 0
    assert stream.tails == 1
    for ev in got:
        _check_event(ev)
    _render(got)


@FAST
@given(st.lists(st.text(alphabet=st.sampled_from("ab\n\r€"), max_size=40), max_size=8), st.booleans())
def test_fuzz_join_lines_matches_a_plain_split(chunks, clean_end):
    """sky's join_lines: the lines a plain split gives (an over-long one cut to limit + 1), linear."""
    from launcher import sky_adapter

    _counted("sky_adapter.join_lines")
    limit = 10
    text = "".join(chunks)
    *whole, rest = text.split("\n")
    want = [(ln if len(ln) <= limit else ln[:limit + 1]).rstrip("\r") for ln in whole]
    if clean_end and rest:
        want.append((rest if len(rest) <= limit else rest[:limit + 1]).rstrip("\r"))
    assert list(sky_adapter.join_lines(iter([*chunks, *([None] if clean_end else [])]), limit)) == want


@FAST
@given(st.one_of(st.builds(_json_text, VALUES), st.text(max_size=40), st.binary(max_size=40)))
def test_fuzz_loads(text):
    """remote.loads refuses (Refused, one line) or returns JSON whose numbers are finite and bounded,
    equal to what the standard parser reads from the same text."""
    _counted("remote.loads")
    try:
        got = remote.loads(text)
    except remote.Refused as e:
        assert "\n" not in str(e)
        return
    assert json.loads(text) == got
    _check_numbers(got)


@FAST
@given(st.one_of(st.text(max_size=8), st.binary(max_size=8), st.integers(-400, 400).map(lambda n: f" {n}\n")))
def test_fuzz_exit_code(text):
    _counted("remote.exit_code")
    code = remote.exit_code(text)
    if code is not None:
        raw = text.decode() if isinstance(text, bytes) else text
        assert -255 <= code <= 255 and code == int(raw.strip()) and raw.strip().lstrip("-").isascii()


@FAST
@given(TEXT)
def test_fuzz_clean(text):
    _counted("remote.clean")
    shown = remote.clean(text)
    assert not SHOWN_CONTROLS.search(shown) and remote.clean(shown) == shown


def _file(data: bytes) -> Path:
    fd, name = tempfile.mkstemp()
    os.write(fd, data)
    os.close(fd)
    return Path(name)


METRICS = st.builds(lambda results: _json_text({"results": results}),
                    st.dictionaries(st.text(max_size=10) | HOSTILE_TEXT,
                                    st.dictionaries(st.sampled_from(["mode", "rows", "wasserstein", "cells_scored",
                                                                     "invalid_rate", "demographic_parity_difference"]),
                                                    VALUES, max_size=6) | VALUES, max_size=3))


@FAST
@given(st.one_of(METRICS, st.builds(_json_text, VALUES)))
def test_fuzz_metrics_and_report(text):
    """metrics.json: a ContractError (one line) or a report that renders without escapes."""
    from contracts.results import read_metrics
    from launcher.verbs.report import render

    _counted("results.read_metrics + report")
    path = _file(text.encode())
    try:
        data = read_metrics(path)
    except ContractError as e:
        assert "\n" not in str(e)
        return
    finally:
        path.unlink()
    assert not SHOWN_CONTROLS.search(remote.clean(render("run", data["results"], None)).replace("\n", ""))


CELL = st.fixed_dictionaries({k: VALUES for k in ("study_id", "condition_num", "task_num", "scale", "scale_source",
                                                   "human_n", "w", "skipped")})


@FAST
@given(st.lists(st.one_of(CELL.map(_json_text), st.builds(_json_text, VALUES), st.text(max_size=20)), max_size=3))
def test_fuzz_cells(lines):
    from contracts.results import read_cells

    _counted("results.read_cells")
    path = _file("\n".join(lines).encode())
    try:
        read_cells(path)
    except ContractError as e:
        assert "\n" not in str(e)
    finally:
        path.unlink()


PREDICT = st.fixed_dictionaries({k: VALUES for k in ("scale", "values", "probs", "valid_mass", "sample",
                                                      "sample_text", "human", "example", "prompt", "prompt_tokens")})


@FAST
@given(st.one_of(PREDICT.map(_json_text), st.builds(_json_text, VALUES), st.text(max_size=30)))
def test_fuzz_predict_lines(body):
    from contracts.results import PREDICT_PREFIX, parse_predict_line
    from launcher.verbs.predict import render

    _counted("results.parse_predict_line + render")
    try:
        result = parse_predict_line(PREDICT_PREFIX + body)
    except ContractError as e:
        assert "\n" not in str(e)
        return
    render(result)


RUN_FIELDS = ["id", "infra", "state", "created_at", "started_at", "ended_at", "price_per_hour", "estimate",
              "exit_code", "verified", "backend_state", "history", "gpu", "error"]


@FAST
@given(st.dictionaries(st.sampled_from(RUN_FIELDS), VALUES, max_size=8), st.booleans())
def test_fuzz_run_json(fields, own_id):
    """A run.json of any content: a sound run or one Damaged line, never an exception; `runs` shows it."""
    from launcher import registry
    from launcher.verbs.runs import _money, _short

    _counted("registry (run.json) + runs")
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "r-20260101-000000-abcd"
        folder.mkdir()
        if own_id:
            fields["id"] = folder.name
        (folder / "run.json").write_text(_json_text(fields))
        run, bad = registry._parse(folder / "run.json")
        assert run is not None or bad is not None
        if bad is None:
            _short(run.duration_s()), _money(run.actual_cost()), _money(run.expected_cost())
        sorted([bad or run, bad or run], key=lambda r: (r.created_at, r.id))


@FAST
@given(st.one_of(st.fixed_dictionaries({k: VALUES for k in ("launches", "first_start", "deadline", "starts")})
                 .map(_json_text), st.builds(_json_text, VALUES)), st.sampled_from([0.0, 60.0, 3600.0]))
def test_fuzz_launch_record(text, deadline_s):
    """job/managed.py: a launch record is refused (ValueError, one line) or its deadline is kept: never
    later, never before the first start, never dropped while the run has a cap."""
    from job import managed

    _counted("job.managed.read_state + start")
    with tempfile.TemporaryDirectory() as d:
        state = Path(d)
        (state / managed.STATE_FILE).write_text(text)
        try:
            before = managed.read_state(state)
            after = managed.start(state, None, deadline_s, t0=None)
        except ValueError as e:
            assert "\n" not in str(e)
            return
        if before["launches"]:
            assert after["deadline"] == before["deadline"] and after["first_start"] == before["first_start"]
            assert not after["deadline"] or after["deadline"] > after["first_start"]
            assert after["deadline"] or not deadline_s


@FAST
@given(st.one_of(st.builds(lambda v: yaml.safe_dump({"train": v}, allow_unicode=True),
                           st.dictionaries(st.sampled_from(["lr", "epochs", "global_batch", "seed", "max_steps"]),
                                           st.integers() | st.floats() | st.text(max_size=5), max_size=3)),
                 st.text(alphabet=st.sampled_from("ab:&*[]{},- \n1e9"), max_size=60),
                 st.integers(1, 12).map(lambda n: "a: &a [x,x,x,x]\n" + "".join(
                     f"{c}: &{c} [*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefghijkl", "bcdefghijklm"[:n])))))
def test_fuzz_config_yaml(text):
    """A run config of any text: a RunConfig or one ContractError line, quickly (no alias bomb)."""
    from contracts.config import load_config

    _counted("contracts.config.load_config")
    path = _file(text.encode())
    try:
        os.rename(path, path.with_suffix(".yaml"))
        path = path.with_suffix(".yaml")
        load_config(path)
    except ContractError as e:
        assert "\n" not in str(e) and len(str(e)) < 2000
    finally:
        path.unlink()


MANIFEST_ENTRY = st.fixed_dictionaries({"path": VALUES | st.text(max_size=8), "size": VALUES, "sha256": VALUES})


@FAST
@given(st.one_of(st.builds(lambda files, schema: _json_text({"schema": schema, "files": files}),
                           st.lists(MANIFEST_ENTRY, max_size=3), VALUES), st.builds(_json_text, VALUES)))
def test_fuzz_manifest(text):
    from contracts import manifest

    _counted("contracts.manifest.load")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / manifest.MANIFEST_FILE).write_text(text)
        try:
            manifest.load(d)
        except manifest.ManifestError as e:
            assert "\n" not in str(e)


PROPERTIES = [test_fuzz_event_lines, test_fuzz_event_stream_never_loses_a_good_event,
              test_fuzz_follow_ends_a_succeeded_job_whatever_its_lines, test_fuzz_join_lines_matches_a_plain_split,
              test_fuzz_loads, test_fuzz_exit_code, test_fuzz_clean, test_fuzz_metrics_and_report, test_fuzz_cells,
              test_fuzz_predict_lines, test_fuzz_run_json, test_fuzz_launch_record, test_fuzz_config_yaml,
              test_fuzz_manifest]
