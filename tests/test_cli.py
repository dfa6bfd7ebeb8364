"""The `evertrain` command's front door: --version, --help of every command without importing torch,
the help lines shown for commands that are not loaded, and `--run`/`--run-dir` on every run command."""
from __future__ import annotations

import subprocess
import sys

import pytest

import evertrain
from evertrain.launch import cli

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
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"evertrain {evertrain.__version__}"


def test_help_of_every_command_imports_no_torch():
    """In one fresh interpreter: --help, --version and each command's --help, then torch must still
    be unimported (importing it is most of a command's start-up time)."""
    helps = [["--help"], ["--version"], *([name, "--help"] for name in cli.COMMANDS),
             ["data", "prepare", "--help"], ["export", "hf", "--help"]]
    code = ("import sys\nfrom evertrain.launch import cli\n"
            f"for argv in {helps!r}:\n"
            "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "heavy = [m for m in ('torch', 'deepspeed', 'matplotlib', 'safetensors') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
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
