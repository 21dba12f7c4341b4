"""A stand-in for `python -m job VERB` (tests only): prints real events, writes a real adapter +
manifest, and fails where FAKEJOB_FAIL says. Faults are injected around the real launcher.

Knobs (environment): FAKEJOB_STEPS (default 5), FAKEJOB_STEP_S (sleep per step, default 0.05), FAKEJOB_FULL (train
writes a full fine-tune's model/ in two shards instead of an adapter),
FAKEJOB_FAIL=check|prepare|train|evaluate (exit 1 there), FAKEJOB_HANG=VERB (never ends there), FAKEJOB_CORRUPT=1 (an artifact that
does not match its manifest), FAKEJOB_LEAK=1 (print HF_TOKEN, to test redaction), FAKEJOB_HOSTILE=1 (train
prints HOSTILE_LINES, the lines a broken or hostile job may send, and writes an exit_code that is no status).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from contracts import manifest
from contracts.events import LINE_PREFIX, dumps, make


def emit(kind: str, **fields) -> None:
    print(LINE_PREFIX + dumps(make(kind, **fields)), flush=True)


def hostile_lines() -> list[str]:
    """What a broken or hostile job may print (issue 25): each must be skipped or shown harmlessly."""
    step = ('{"v":1,"event":"step","ts":%s,"step":1,"total_steps":5,"epoch":0.2,"loss":1.0,"lr":0.001,'
            '"tokens_per_s":1.0,"gpu_mem_gib":0.0,"eta_s":%s}')
    log = lambda message: dumps(make("log", message=message))  # noqa: E731
    return [LINE_PREFIX + step % (time.time(), "Infinity"), LINE_PREFIX + step % (time.time(), "NaN"),
            LINE_PREFIX + (step % (time.time(), "1")).replace('"step":1', '"step":[1]'),
            LINE_PREFIX + '{"v":1,"event":"log","ts":%s,"message":"big","n":%s}' % (time.time(), "7" * 5000),
            LINE_PREFIX + log("clipboard \x1b]52;c;cm0gLXJmIH4K\x07 written"),
            LINE_PREFIX + log("\x1b[2J\x1b[Hscreen cleared"),
            LINE_PREFIX + log("a \x1b]8;;https://evil.example/\x1b\\link\x1b]8;;\x1b\\ to click"),
            LINE_PREFIX + log("\r\x1b[1;32madapter:\x1b[0m /tmp/evil (verified against manifest.json)"),
            LINE_PREFIX + dumps(make("phase", phase="tearing down")),
            LINE_PREFIX + log("x" * (2 << 20)),  # a line over the 1 MiB accepted
            "raw output \x1b]52;c;cm0gLXJmIH4K\x07 with an escape"]


def wait_recorded(message: str, timeout: float = 60) -> None:
    """Until the launcher following this (local) job has recorded the log event `message`."""
    record = Path(os.environ["SOCRATES_RUNS_DIR"]) / os.environ["SOCRATES_RUN_ID"] / "events.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if record.is_file() and f'"message":"{message}"' in record.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise SystemExit(f"fakejob: the launcher never recorded {message!r}")


def arg(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else default


def main(argv: list[str]) -> int:
    verb = argv[0]
    emit("start", verb=verb)
    if os.environ.get("FAKEJOB_LEAK"):
        print(f"debug: token is {os.environ.get('HF_TOKEN')}", flush=True)
    if os.environ.get("FAKEJOB_FAIL") == verb:
        print(f"fakejob: failing in {verb} as asked", file=sys.stderr, flush=True)
        return 1
    if os.environ.get("FAKEJOB_HANG") == verb:  # a node of the cluster died under it (tests/fakesky.py)
        while True:
            time.sleep(1)
    if verb == "check":
        emit("check", ok=True, card="cpu")
    elif verb == "prepare":
        out = Path(arg(argv, "--out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.jsonl").write_text("{}\n")
        emit("prepare", train_rows=40, test_rows=8)
    elif verb == "train":
        out = Path(arg(argv, "--out"))
        steps = int(os.environ.get("FAKEJOB_STEPS", "5"))
        for step in range(1, steps + 1):
            time.sleep(float(os.environ.get("FAKEJOB_STEP_S", "0.05")))
            if os.environ.get("FAKEJOB_HOSTILE") and step == 2:
                Path("exit_code").write_text("\u00b2\n")  # the launcher's exit-status file, in the job's folder
                for line in hostile_lines():
                    print(line, flush=True)
                for mark in ("hostile lines sent", "and read"):  # the second is read in a poll begun after the first
                    emit("log", message=mark)
                    wait_recorded(mark)

            emit("step", step=step, total_steps=steps, epoch=step / steps, loss=2.0 / step, lr=1e-3,
                 tokens_per_s=1000.0, gpu_mem_gib=0.0, eta_s=(steps - step) * 0.05)
        if os.environ.get("FAKEJOB_FULL"):  # a full fine-tune's output: model/ in two safetensors shards
            model = out / "model"
            model.mkdir(parents=True, exist_ok=True)
            (model / "config.json").write_text('{"model_type": "qwen2"}\n')
            shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
            for name in shards:
                (model / name).write_bytes(os.urandom(8192))
            (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
            manifest.write(out, {"config": "fake"})
            emit("done", reason="completed")
            return 0
        adapter = out / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter_model.safetensors").write_bytes(os.urandom(4096))
        (adapter / "adapter_config.json").write_text('{"r": 8}\n')
        manifest.write(out, {"config": "fake"})
        if os.environ.get("FAKEJOB_CORRUPT"):
            (adapter / "adapter_model.safetensors").write_bytes(b"corrupted")
        emit("artifact", path="adapter/adapter_model.safetensors", sha256="-", size=4096)
        emit("done", reason="completed")
    elif verb == "evaluate":
        if "--as-configured" in argv:  # as the real job: the run config says whether (eval.enabled, eval.base)
            import yaml

            wanted = (yaml.safe_load(Path(arg(argv, "--config")).read_text()) or {}).get("eval") or {}
            if not wanted.get("enabled", True) or ("--base" in argv and not wanted.get("base", False)):
                print("evaluate: skipped (as configured)")
                return 0
        out = Path(arg(argv, "--out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"wasserstein": 0.1, "argv": argv}) + "\n")
        emit("eval", metrics={"wasserstein": 0.1})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
