"""The `evertrain` command's front door: --version, --help of every command without importing torch,
the help lines shown for commands that are not loaded, and `--run`/`--run-dir` on every run command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import evertrain
from evertrain.launch import cli

REPO = Path(__file__).resolve().parents[1]

RUN_COMMANDS = {  # argv that parses up to a run dir, per command that takes one
    "fork": ["fork", "--step", "10", "--cooldown-steps", "2"],
    "forker": ["forker", "--every", "10", "--cooldown-fraction", "0.2"],
    "report": ["report"],
    "average": ["average", "--last", "3"],
    "export": ["export", "hf", "--step", "10", "--out", "x"],
}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert (
        exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"evertrain {evertrain.__version__}"
    )


def test_help_of_every_command_imports_no_torch():
    """In one fresh interpreter: --help, --version and each command's --help, then torch must still
    be unimported (importing it is most of a command's start-up time)."""
    helps = [
        ["--help"],
        ["--version"],
        *([name, "--help"] for name in cli.COMMANDS),
        ["data", "prepare", "--help"],
        ["export", "hf", "--help"],
    ]
    code = (
        "import sys\nfrom evertrain.launch import cli\n"
        f"for argv in {helps!r}:\n"
        "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'matplotlib', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "HEAVY []"
    for name in cli.COMMANDS:
        assert f"usage: evertrain {name}" in proc.stdout


def test_top_level_help_lines_are_the_commands_own():
    full = cli.build_parser(None)
    light = cli.build_parser("")
    choices = {p.dest: p.help for p in full._subparsers._group_actions[0]._choices_actions}
    shown = {p.dest: p.help for p in light._subparsers._group_actions[0]._choices_actions}
    assert choices == shown == {name: help_line for name, (_, help_line) in cli.COMMANDS.items()}


@pytest.mark.parametrize("command", sorted(RUN_COMMANDS))
@pytest.mark.parametrize("flag", ["--run", "--run-dir"])
def test_run_and_run_dir_on_every_run_command(command, flag):
    argv = [*RUN_COMMANDS[command], flag, "runs/x"]
    assert cli.build_parser(command).parse_args(argv).run == "runs/x"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frok"])
    assert exit_info.value.code == 2 and "invalid choice: 'frok'" in capsys.readouterr().err


def all_parsers():
    """(words, parser) of `evertrain`, every command and subcommand, and pretrain.py."""
    import argparse

    import pretrain

    def walk(parser, words):
        yield words, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{words} {name}".strip())

    yield from walk(cli.build_parser(None), "")
    yield "pretrain.py", pretrain.build_parser()


def test_every_option_of_every_command_says_its_default():
    import argparse

    missing = []
    for words, parser in all_parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
            ):
                continue
            text = formatter._get_help_string(action) if action.help else ""
            if not text or (action.option_strings and "default" not in text and "required" not in text):
                missing.append(
                    f"{words or 'evertrain'} {'/'.join(action.option_strings) or action.dest}: {text!r}"
                )
    assert not missing, "\n".join(missing)


def test_every_command_help_ends_with_examples_that_parse():
    import shlex

    import pretrain

    for words, parser in all_parsers():
        help_text = parser.format_help()
        tail = help_text.rstrip("\n").split("\nexamples:\n")
        assert len(tail) == 2, f"{words or 'evertrain'}: --help does not end with examples"
        lines = tail[1].splitlines()
        assert 2 <= len(lines) <= 3, (words, lines)
        for line in lines:
            argv = shlex.split(line, comments=True)
            if words == "pretrain.py":  # after the launcher and its own options
                argv = argv[argv.index("pretrain.py") + 1 :]
                assert pretrain.parse_args(argv).config, line
            else:
                assert argv[0] == "evertrain", line
                args = cli.build_parser(argv[1]).parse_args(argv[1:])
                assert args.command == argv[1], line


def test_pretrain_help_and_print_config_import_no_torch():
    """pretrain.py answers --help and --print-config before importing torch (what a user waits for:
    bench/cli_startup.py times it)."""
    code = (
        "import sys\nsys.argv[0] = 'pretrain.py'\nimport pretrain\n"
        "assert pretrain.main(['--config', 'configs/tiny.yaml', '--print-config', 'train.max_steps=5']) == 0\n"
        "assert pretrain.main(['--config', 'configs/tiny.yaml', 'train.max_lr=1']) == 2\n"
        "try:\n    pretrain.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(REPO), check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max_steps: 5" in proc.stdout and "examples:" in proc.stdout
    assert "train.max_lr: unknown key; did you mean optim.max_lr?" in proc.stderr
    assert proc.stdout.splitlines()[-1] == "HEAVY []"


def test_forker_nodes_is_the_old_spelling_of_pool_and_warns_once(capsys):
    parser = cli.build_parser("forker")
    base = ["forker", "--run", "runs/x", "--every", "10", "--cooldown-fraction", "0.2"]
    assert parser.parse_args([*base, "--pool", "local:2"]).pool == "local:2"
    assert capsys.readouterr().err == ""
    assert parser.parse_args([*base, "--nodes", "local:3", "--nodes", "local:4"]).pool == "local:4"
    assert capsys.readouterr().err == "warning: --nodes is now --pool (the old spelling will go)\n"
    plan = cli.build_parser("plan").parse_args(
        ["plan", "--config", "c.yaml", "--nodes", "4", "--gpus-per-node", "8"]
    )
    assert plan.nodes == 4  # plan's --nodes counts nodes, and keeps its name


def test_fork_and_forker_default_to_the_measured_cooldown_shape():
    from evertrain.launch.forker import ForkerOptions
    from evertrain.pretrain.config import DEFAULT_COOLDOWN_SHAPE

    fork = cli.build_parser("fork").parse_args(["fork", "--run", "r", "--step", "1", "--cooldown-steps", "1"])
    forker = cli.build_parser("forker").parse_args(["forker", "--run", "r", "--every", "1"])
    assert fork.shape == forker.shape == ForkerOptions(run_dir=None, cooldown_fraction=None).shape == "1-sqrt"
    assert DEFAULT_COOLDOWN_SHAPE == "1-sqrt"
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "--shape linear" not in demo and "--shape linear" not in (REPO / "README.md").read_text()
