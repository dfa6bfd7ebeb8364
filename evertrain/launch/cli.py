"""The `evertrain` command. Each subcommand lives in its own module with `register(subparsers)`.

Only the module of the command being run is imported, and command modules import torch only once
they do work that needs it, so `evertrain --help`, `evertrain --version` and `evertrain CMD --help`
answer at once (bench/cli_startup.py measures it; docs/performance.md has the figure).
Errors a user can cause (`EvertrainError`) print one line and exit 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import evertrain
from evertrain.errors import EvertrainError
from evertrain.launch.helptext import HelpFormatter, dress, examples_epilog

# command -> (the module that registers it, its one-line help for `evertrain --help`)
COMMANDS = {
    "data": ("evertrain.launch.data_cmd", "prepare or grow a tokenized data dir"),
    "fork": ("evertrain.launch.fork", "cool a checkpoint down on the side and evaluate it"),
    "forker": ("evertrain.launch.forker", "fork a cooldown from each new checkpoint of a live run"),
    "average": ("evertrain.launch.average", "evaluate the uniform average of a run's last K checkpoints"),
    "predict": ("evertrain.launch.lossmodel.predict", "predict a cooldown's final val loss before it runs"),
    "report": ("evertrain.launch.report", "checkpoints, cooldown results, plot and 'should we keep going?'"),
    "export": ("evertrain.launch.export_cmd", "export a checkpoint to another format"),
    "sweep": (
        "evertrain.launch.sweep.command",
        "rsqrt/constant + forked cooldowns vs cosine at several horizons",
    ),
    "plan": ("evertrain.launch.plan", "per-rank memory and FLOPs of a config on N nodes x G GPUs"),
}


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the top level takes no option with a value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of `command` (all of them when None); the others only list their help line."""
    parser = argparse.ArgumentParser(
        prog="evertrain",
        description=evertrain.__doc__,
        formatter_class=HelpFormatter,
        epilog=examples_epilog(""),
    )
    parser.add_argument("--version", action="version", version=f"evertrain {evertrain.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_line) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_line, add_help=False)  # never parsed: its module is not loaded
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # a command not built yet in this checkout
                continue
            raise
        module.register(sub)
        dress(sub.choices[name], name)  # defaults in every option's help, examples at the end
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EvertrainError as exc:
        print(f"evertrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
