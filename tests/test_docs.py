"""Every command line in README.md and docs/*.md runs as written.

Each line of a ```bash block (or a block without a language) that starts with a program below is
parsed by the program it calls, without running it: `evertrain ...` by
the CLI's own parser; `pretrain.py ...` by pretrain.py's parser and then the config loader (so a config
key or value the code no longer has fails here); `torchrun` and `deepspeed` by their own launcher
parsers (so a flag the launcher would swallow, like torchrun taking `--run` for its `--run-path`, shows
as arguments missing from what the script receives); `make X` by the Makefile's targets; scripts by
their existence. Synopses and placeholders (`...`, `<...>`, `[--opt X]`, `A|B`) are prose in code form and
are skipped; shell variables (`$i`, `${N}`) stand for the value 1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_LANGS = {"bash", "sh", "shell", "console", "text"}  # text: a block without a language


@dataclass(frozen=True)
class Line:
    doc: str
    number: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.number}: {self.text}"


def command_lines() -> list[Line]:
    """The commands of every shell block: continuations joined, comments and prompts removed."""
    found = []
    for doc in DOCS:
        lang, pending, start = None, "", 0
        for number, raw in enumerate(doc.read_text().splitlines(), 1):
            fence = FENCE.match(raw.strip())
            if fence:
                lang = None if lang is not None else fence.group(1) or "text"
                continue
            if lang not in SHELL_LANGS:
                continue
            line = raw.strip().removeprefix("$ ")
            if not pending:
                start = number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            text = (pending + line).strip()
            pending = ""
            if text and not text.startswith("#"):
                found.append(Line(doc.relative_to(REPO).as_posix(), start, text))
    return found


def words(line: Line) -> list[str]:
    """The command's words: shell comments dropped, leading VAR=value assignments dropped, and only the
    first command of a pipeline or list."""
    try:
        tokens = shlex.split(line.text, comments=True)
    except ValueError:  # not shell (unbalanced quotes in a JSON or YAML line)
        return []
    for i, token in enumerate(tokens):
        if token in ("|", "&&", ";", "||", "&") or token.startswith((">", "2>")):
            tokens = tokens[:i]
            break
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]
    return tokens


def check_evertrain(args: list[str]) -> None:
    from evertrain.launch import cli

    try:
        cli.build_parser().parse_args(args)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for an error (already printed)
        assert exc.code == 0 and ({"--help", "-h", "--version"} & set(args)), f"evertrain {' '.join(args)}"


ENGINES_OF_LAUNCHER = {
    "python": ("auto", "single"),
    "torchrun": ("auto", "fsdp"),
    "deepspeed": ("auto", "deepspeed"),
}


def check_pretrain(args: list[str], launcher: str = "python") -> None:
    """Parses and loads the config, and checks the engine it asks for is one this launcher can start."""
    import pretrain
    from evertrain.pretrain.config import load_config

    parsed = pretrain.parse_args(args)
    overrides = list(parsed.overrides) + ([f"engine.name={parsed.engine}"] if parsed.engine else [])
    if parsed.config is None:  # a resume by run dir: keys that exist and that a resume may change
        from evertrain.pretrain.run.run_config import resumable

        assert parsed.run_dir, "pretrain.py needs --config or --run"
        assert all(resumable(item.split("=", 1)[0]) for item in overrides), overrides
        load_config(None, overrides)
        return
    cfg = load_config(REPO / parsed.config, overrides)
    if launcher in ENGINES_OF_LAUNCHER:
        assert cfg.engine.name in ENGINES_OF_LAUNCHER[launcher], (
            f"{launcher} cannot start engine.name={cfg.engine.name} (from {parsed.config}); add --engine"
        )


def check_script(script: str, args: list[str], launcher: str = "python") -> None:
    """A Python script or module as the launchers and python start it."""
    if script == "pretrain.py":
        check_pretrain(args, launcher)
    elif script.endswith(".py"):
        if script.startswith("runs/"):
            return  # written into a run dir by the run (DeepSpeed's zero_to_fp32.py), not shipped
        assert (REPO / script).is_file(), f"{script}: no such script"
    else:  # -m module
        import importlib.util

        assert importlib.util.find_spec(script) is not None, f"-m {script}: no such module"
        if script.startswith("evertrain.launch."):
            check_module_cli(script, args)


def check_module_cli(module: str, args: list[str]) -> None:
    """`python -m evertrain.launch.X ARGS` parses ARGS like `evertrain X ARGS`."""
    import importlib

    mod = importlib.import_module(module)
    if hasattr(mod, "main") and hasattr(mod, "build_parser"):
        mod.build_parser().parse_args(args)


def check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    assert any(a.startswith(("--nproc_per_node", "--nproc-per-node")) for a in args), (
        "torchrun without --nproc_per_node starts one process per node"
    )
    parsed = get_args_parser().parse_args(args)
    script_at = args.index(parsed.training_script)
    given = args[script_at + 1 :]
    assert parsed.training_script_args == given, (
        f"torchrun took some of the script's arguments for its own: the script gets "
        f"{parsed.training_script_args}, the line gives {given}"
    )
    check_script(parsed.training_script, parsed.training_script_args, "torchrun")


def check_deepspeed(args: list[str]) -> None:
    from deepspeed.launcher.runner import parse_args

    parsed = parse_args(args)
    script_at = args.index(parsed.user_script)
    assert parsed.user_args == args[script_at + 1 :], (parsed.user_args, args[script_at + 1 :])
    check_script(parsed.user_script, parsed.user_args, "deepspeed")


def check_make(args: list[str]) -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in (a for a in args if "=" not in a and not a.startswith("-")):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target}: no such target"


def check(line: Line) -> bool:
    """Checks one line; False when it is not a command this test knows how to parse."""
    tokens = words(line)
    if not tokens or any(
        t == "..." or re.fullmatch(r"<[^>]*>", t) or t.startswith(("[", "(")) or re.search(r"\w\|\w", t)
        for t in tokens
    ):
        return False  # a synopsis ([--opt X], A|B, (a | b)) or a placeholder, not a command
    tokens = [re.sub(r"\$\{?\w+\}?", "1", t) for t in tokens]  # shell variables: a value of any type
    program, args = Path(tokens[0]).name, tokens[1:]
    if program == "evertrain":
        check_evertrain(args)
    elif program in ("python", "python3"):
        if not args or args[0].startswith("-") and args[0] != "-m":
            return False
        if args[:1] == ["-m"]:
            check_script(args[1], args[2:])
        else:
            check_script(args[0], args[1:])
    elif program == "torchrun":
        check_torchrun(args)
    elif program == "deepspeed":
        check_deepspeed(args)
    elif program == "make":
        check_make(args)
    elif program == "bash" and args:
        assert (REPO / args[0]).is_file(), f"{args[0]}: no such script"
    elif program in ("srun", "sbatch", "mpirun", "salloc") and "pretrain.py" in args:
        check_pretrain(
            args[args.index("pretrain.py") + 1 :], launcher=None
        )  # the engine is the script's choice
    else:
        return False
    return True


LINES = command_lines()


def test_the_docs_have_commands_to_check():
    checked = [
        line
        for line in LINES
        if words(line)
        and Path(words(line)[0]).name in ("evertrain", "python", "torchrun", "deepspeed", "make")
    ]
    assert len(checked) >= 20, [str(line) for line in checked]


@pytest.mark.parametrize("line", LINES, ids=lambda line: f"{line.doc}:{line.number}")
def test_documented_command_parses(line, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    try:
        check(line)
    except SystemExit as exc:
        pytest.fail(f"{line}\n  exits {exc.code} while parsing its arguments")
    except AssertionError as exc:
        pytest.fail(f"{line}\n  {exc}")
    except Exception as exc:  # e.g. a ConfigError naming a key the code no longer has
        pytest.fail(f"{line}\n  {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------- speaking to users

INTERNAL = re.compile(
    r"\bissue ?#?\d+|\bthis issue\b|\bthis session\b|\bsession's\b|\bthe seed's\b|\bengineers'", re.IGNORECASE
)


def test_docs_and_messages_speak_to_users():
    """No references a user cannot follow: the project's issue numbers, its work sessions, "the seed"."""
    texts = [
        *DOCS,
        REPO / "pretrain.py",
        *sorted((REPO / "evertrain").rglob("*.py")),
        *sorted((REPO / "configs").glob("*")),
        *sorted((REPO / "examples").rglob("*")),
        REPO / "scripts" / "demo.sh",
        REPO / "Makefile",
    ]
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in texts
        if path.is_file()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not found, "\n".join(found)


def test_config_reference_is_current():
    """docs/config.md is what `python -m evertrain.launch.config_reference` prints, with a meaning for
    every key (regenerate it after changing a config dataclass)."""
    from evertrain.launch import config_reference
    from evertrain.pretrain.config import valid_keys

    rows = config_reference.rows()
    assert [key for _, key, *_ in rows] == valid_keys()
    assert not [key for _, key, _, _, meaning in rows if not meaning], "keys without a meaning"
    assert (REPO / "docs" / "config.md").read_text() == config_reference.render(), (
        "docs/config.md is stale: python -m evertrain.launch.config_reference > docs/config.md"
    )


SBATCH = REPO / "examples" / "slurm" / "train.sbatch"


def test_the_slurm_template_is_a_script_with_sbatch_options():
    text = SBATCH.read_text()
    assert subprocess.run(["bash", "-n", str(SBATCH)], check=False).returncode == 0
    options = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert {"--nodes=2", "--ntasks-per-node=8", "--time=24:00:00"} <= set(options)
    assert "srun" in text and "pretrain.py" in text and "forker" in text


@pytest.mark.slow
def test_the_slurm_template_trains_and_forks_under_a_fake_scheduler(tiny_data, tmp_path):
    """examples/slurm/train.sbatch as sbatch runs it (tests/fakebin: the job and its srun tasks run here):
    FSDP2 on two srun tasks trains the tiny model; the forker beside it submits the fork as a Slurm job
    of its own; the report closes the job."""
    run_dir = tmp_path / "runs" / "tiny"
    fakebin = REPO / "tests" / "fakebin"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{fakebin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FAKE_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "CONFIG": "configs/tiny.yaml",
        "RUN": str(run_dir),
        "MAX_STEPS": "8",
        "OVERRIDES": f"data.path={tiny_data} model.vocab_size=512 checkpoint.every_steps=8 eval.every_steps=0 "
        "train.micro_batch_size=2",
        "FORK_EVERY": "8",
        "FORK_FRACTION": "0.25",
        "FORK_POOL": "slurm:1",
        "FORK_SLURM_ARGS": "--time 10:00 --nodes 1 --ntasks-per-node 2",
    }
    proc = subprocess.run(
        ["sbatch", "--nodes", "1", "--ntasks-per-node", "2", "--wrap", f"bash {SBATCH}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:] + (run_dir / "forker.log").read_text()[-3000:]
    result = json.loads((run_dir / "cooldowns" / "from_000000008_1-sqrt_2" / "result.json").read_text())
    assert result["from_step"] == 8 and result["val_loss"] > 0
    assert "plot: " in output
