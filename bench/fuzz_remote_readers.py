"""The fuzz of every reader of what a machine sends (issue 25, acceptance 2), at scale.

    python bench/fuzz_remote_readers.py [--examples 10000] [--only NAME,NAME]

Runs each hypothesis property of tests/test_remote_fuzz.py with `--examples` examples (no example
database, no deadline) and prints one row per reader: examples run, escapes (a property that failed:
an exception other than the reader's own refusal, or a broken invariant; hypothesis's shrunk example
is printed), seconds. Exit 1 if any reader had an escape.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=10_000, help="examples per reader (default 10000)")
    p.add_argument("--only", default=None, help="run only the properties whose name holds one of these (comma-separated)")
    args = p.parse_args(argv)
    os.environ["SOCRATES_FUZZ_EXAMPLES"] = str(args.examples)  # read by the test module as it is imported
    import test_remote_fuzz as fuzz

    rows, escapes = [], 0
    for prop in fuzz.PROPERTIES:
        if args.only and not any(part in prop.__name__ for part in args.only.split(",")):
            continue
        before = fuzz.RUNS.copy()
        start = time.time()
        failed = ""
        try:
            prop()
        except Exception as e:  # noqa: BLE001  (a failed property is the finding: report it, go on)
            failed = "".join(traceback.format_exception_only(type(e), e)).strip()
            escapes += 1
        ran = fuzz.RUNS - before  # the reader's label -> examples it ran (shrinking included)
        label = ", ".join(ran) or prop.__name__
        rows.append((label, sum(ran.values()), 1 if failed else 0, time.time() - start, failed))
        print(f"  {label}: {rows[-1][1]} examples, {'ESCAPE' if failed else 'no escape'} ({rows[-1][3]:.0f} s)",
              file=sys.stderr, flush=True)
    print(f"\n| reader | examples run | escapes | seconds |\n|---|---:|---:|---:|")
    for name, ran, bad, secs, _ in rows:
        print(f"| {name} | {ran:,} | {bad} | {secs:.0f} |")
    for name, _, bad, _, why in rows:
        if bad:
            print(f"\n{name}: {why}")
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
