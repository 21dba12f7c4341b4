"""`python -m job VERB ...`: one module per verb; exit 2 for bad input, 3 for a card that can't run it."""
from __future__ import annotations

import argparse
import importlib
import sys

from contracts.errors import EXIT_BAD_INPUT, ContractError
from job.errors import EXIT_CANNOT_RUN, JobCannotRun

VERBS: dict[str, tuple[str, str]] = {
    "check": ("job.check", "the card, a real 4-bit self-test, disk, and whether the config fits"),
    "prepare": ("job.prepare", "load SocSci210 (hub id or local file), split, subset, count tokens"),
    "train": ("job.train", "QLoRA SFT with resumable, atomic checkpoints; writes adapter + manifest"),
    "evaluate": ("job.evaluate", "the paper's metrics on the test split, and a report"),
    "predict": ("job.predict", "a predicted answer distribution for one person and one question"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="python -m job", description="The SOCRATES training job.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (modname, help_) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            module = importlib.import_module(modname)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 0 if not argv else EXIT_BAD_INPUT
    try:
        return int(module.run(args) or 0)
    except ContractError as e:
        print(f"job {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobCannotRun as e:
        print(f"job {args.verb}: cannot run: {e}", file=sys.stderr)
        return EXIT_CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main())
