"""The `msn` command. Each subcommand lives beside the code it drives and registers here.

A subcommand module exposes `add_parser(subparsers)` that adds its parser and sets
`func=callable(args) -> int | None`. Heavy imports stay inside those callables so that
`msn --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from msn.errors import UsageError

# (module, attribute) pairs; a module that is not importable (an optional extra missing)
# still shows up, and its command explains what to install when run.
SUBCOMMANDS: list[str] = [
    "msn.models_cli",
    "msn.generate_cli",
    "server.cli",
    "training.cli",
    "benchmarks.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msn",
        description="msn-serve: MSN models with exact TR-Jacobi speculative decoding.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that subcommand has not landed in this checkout
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UsageError as exc:
        print(f"msn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
