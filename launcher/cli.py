"""`socrates-launch VERB ...`: dispatches to one module per verb, importing only that one."""
from __future__ import annotations

import argparse
import importlib
import sys

from contracts.errors import EXIT_BAD_INPUT, ContractError
from contracts.remote import clean  # a refusal may quote what a machine or a file said
from launcher import __version__

# verb -> (module, one-line help). Only the chosen verb's module is imported, so `--help` is fast.
VERBS: dict[str, tuple[str, str]] = {
    "up": ("launcher.verbs.up", "estimate, launch, stream progress, download and verify, tear down"),
    "estimate": ("launcher.verbs.estimate", "what a run will cost, per cloud offer, before it starts"),
    "logs": ("launcher.verbs.logs", "re-attach to a run's progress (latest run by default)"),
    "status": ("launcher.verbs.status", "a run's state, reconciled with whether its machine exists"),
    "down": ("launcher.verbs.down", "tear a run's machine down now (idempotent)"),
    "download": ("launcher.verbs.download", "pull a run's artifacts again and verify them"),
    "runs": ("launcher.verbs.runs", "list runs with state, card, duration and cost"),
    "report": ("launcher.verbs.report", "print a run's evaluation summary and the report's path"),
    "predict": ("launcher.verbs.predict", "predict how a person would answer, from an adapter"),
    "image": ("launcher.verbs.image", "build (and push) the job image; its tag derives from the lock"),
    "init": ("launcher.verbs.init", "write editable copies of the packaged configs (paper.yaml, smoke.yaml)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage is one line and exit 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser(chosen: str | None) -> tuple[argparse.ArgumentParser, object | None]:
    parser = _Parser(
        prog="socrates-launch",
        description="Reproduce and extend SOCRATES (Qwen2.5-14B QLoRA on SocSci210) on rented GPUs, "
        "with the cost shown first and the machine torn down by itself.",
    )
    parser.add_argument("--version", action="version", version=f"socrates-launch {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    module = None
    for name, (modname, help_) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            module = importlib.import_module(modname)
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser, module = build_parser(chosen if chosen in VERBS else None)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 0 if not argv else EXIT_BAD_INPUT
    try:
        return int(module.run(args) or 0)
    except ContractError as e:
        message = str(e)
        if getattr(e, "handles", None) is not None:  # a damaged run record (registry.DamagedRecord)
            from launcher.backends import end_by_hand  # only then: keeps --help light

            by_hand = end_by_hand(e.handles)
            message += f" ({by_hand})" if by_hand else ""
        print(f"socrates-launch {args.verb}: error: {clean(message)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"socrates-launch {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:  # a SkyPilot API server this command started is stopped when it ends (or it says how to)
        if (adapter := sys.modules.get("launcher.sky_adapter")) is not None:
            adapter.stop_server_if_started(lambda line: print(f"socrates-launch: {line}", file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
