"""The `evertrain` command. Each subcommand lives in its own module with `register(subparsers)`.

Errors a user can cause (`EvertrainError`) print one line and exit 2; nothing else is caught.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from evertrain.errors import EvertrainError

# module path -> it registers one top-level subcommand (some with their own sub-subcommands)
COMMAND_MODULES = (
    "evertrain.launch.data_cmd",  # evertrain data prepare|append
    "evertrain.launch.fork",  # evertrain fork
    "evertrain.launch.forker",  # evertrain forker
    "evertrain.launch.report",  # evertrain report
    "evertrain.launch.export",  # evertrain export hf
    "evertrain.launch.sweep",  # evertrain sweep (the horizon experiment)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evertrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command not built yet in this checkout
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EvertrainError as exc:
        print(f"evertrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
