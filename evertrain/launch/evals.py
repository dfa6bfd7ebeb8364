"""Post-fork evaluation hooks: downstream metrics for every cooldown, next to its validation loss.

After a fork has cooled down, evaluated and published final/, its weights are exported as a Hugging
Face Llama directory (export.py) to COOLDOWN/hf/, and each hook runs on it in turn:
  --eval-cmd "CMD {hf_dir} {out_json}"   any command (run by the shell, placeholders substituted
                                         shell-quoted, so they must stand outside quotes); it must
                                         write a JSON object to {out_json}
  --lm-eval-tasks T1,T2                  lm-evaluation-harness on those tasks (lm_eval_runner.py, in
                                         its own process; `pip install evertrain[eval]`)
Their metrics are merged into result.json under "evals" (a task/metric tree of numbers). Hooks run in
the fork's rank-0 process after its engine is closed, so they have the device to themselves, in its
working directory (the placeholders are absolute paths); their output goes to COOLDOWN/eval.log. A
hook that fails stops the fork with one line before result.json is written: the fork is not done, and
rerunning it (or the forker's retry) only redoes the hooks, since the fork's
checkpoints are still there. COOLDOWN/hf/ is removed once the hooks succeeded
(`evertrain export hf --cooldown` writes it again).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from evertrain.errors import EvertrainError

PLACEHOLDERS = ("hf_dir", "out_json")
LM_EVAL_MODULE = "evertrain.launch.lm_eval_runner"


class EvalHookError(EvertrainError, ValueError):
    """A bad hook argument, or a hook that failed or wrote no usable metrics (the message names its log)."""


@dataclass(frozen=True)
class EvalHooks:
    eval_cmd: str | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str | None = None  # a directory of task YAMLs (lm_eval's --include_path)
    lm_eval_limit: int | None = None  # examples per task (a quick look, not a benchmark number)

    def __bool__(self) -> bool:
        return bool(self.eval_cmd or self.lm_eval_tasks)

    def argv(self) -> list[str]:
        """The same hooks as fork arguments (the forker passes them on)."""
        args = ["--eval-cmd", self.eval_cmd] if self.eval_cmd else []
        if self.lm_eval_tasks:
            args += ["--lm-eval-tasks", ",".join(self.lm_eval_tasks)]
        if self.lm_eval_include:
            args += ["--lm-eval-include", self.lm_eval_include]
        if self.lm_eval_limit is not None:
            args += ["--lm-eval-limit", str(self.lm_eval_limit)]
        return args


def check_eval_cmd(cmd: str) -> str:
    """The command must name both placeholders and no others (a typo would run a wrong command)."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(cmd) if name is not None}
    except ValueError as exc:
        raise EvalHookError(f"--eval-cmd: {exc} in {cmd!r} (write a literal brace as {{{{ or }}}})") from None
    unknown = sorted(names - set(PLACEHOLDERS))
    if unknown:
        raise EvalHookError(
            f"--eval-cmd: unknown placeholder {{{unknown[0]}}}; use {{hf_dir}} and {{out_json}}"
        )
    missing = [name for name in PLACEHOLDERS if name not in names]
    if missing:
        raise EvalHookError(f'--eval-cmd: must contain {{{missing[0]}}}, e.g. "CMD {{hf_dir}} {{out_json}}"')
    quoted = quoted_placeholder(cmd)
    if quoted:
        raise EvalHookError(
            f"--eval-cmd: {{{quoted}}} is inside quotes or after a backslash in {cmd!r}; write it "
            "bare: evertrain substitutes it shell-quoted (quoted again, a path holding $(...) "
            "or a quote would run as shell code)"
        )
    return cmd


def quoted_placeholder(cmd: str) -> str | None:
    """The first placeholder that stands inside '...' or "..." or right after a backslash, else None.
    The substitution is shlex.quote'd, which is a single word only where the shell is not quoting."""
    state = ""  # "", "'" or '"': the quote the shell is inside
    escaped = False
    for literal, name, _, _ in string.Formatter().parse(cmd):
        for char in literal:
            if escaped:
                escaped = False
            elif char == "\\" and state != "'":
                escaped = True
            elif char in "'\"" and state in ("", char):
                state = char if state == "" else ""
        if name is not None and (state or escaped):
            return name
        escaped = False
    return None


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise EvalHookError(f"--lm-eval-tasks: expected T1,T2,..., got {text!r}")
    return tasks


def hooks_from_args(args) -> EvalHooks:
    """The hooks a fork/forker command line asks for, each argument checked."""
    cmd = getattr(args, "eval_cmd", None)
    tasks = getattr(args, "lm_eval_tasks", None)
    include, limit = getattr(args, "lm_eval_include", None), getattr(args, "lm_eval_limit", None)
    if not tasks and (include or limit is not None):
        raise EvalHookError("--lm-eval-include/--lm-eval-limit: only with --lm-eval-tasks")
    if include and not Path(include).is_dir():
        raise EvalHookError(f"--lm-eval-include {include}: not a directory")
    if limit is not None and limit <= 0:
        raise EvalHookError(f"--lm-eval-limit: must be > 0, got {limit}")
    return EvalHooks(
        eval_cmd=check_eval_cmd(cmd) if cmd else None,
        lm_eval_tasks=parse_tasks(tasks) if tasks else (),
        lm_eval_include=str(Path(include).resolve()) if include else None,
        lm_eval_limit=limit,
    )


def hook_commands(hooks: EvalHooks, hf_dir: Path, out_dir: Path) -> list[tuple[str, list[str] | str, Path]]:
    """(name, command, its out_json) per hook: the eval command as a shell string, lm-eval as argv."""
    commands = []
    if hooks.eval_cmd:
        out_json = out_dir / "eval_cmd.json"
        shell = hooks.eval_cmd.format(hf_dir=shlex.quote(str(hf_dir)), out_json=shlex.quote(str(out_json)))
        commands.append(("--eval-cmd", shell, out_json))
    if hooks.lm_eval_tasks:
        out_json = out_dir / "lm_eval.json"
        argv = [
            sys.executable,
            "-m",
            LM_EVAL_MODULE,
            "--hf-dir",
            str(hf_dir),
            "--out",
            str(out_json),
            "--tasks",
            ",".join(hooks.lm_eval_tasks),
        ]
        if hooks.lm_eval_include:
            argv += ["--include-path", hooks.lm_eval_include]
        if hooks.lm_eval_limit is not None:
            argv += ["--limit", str(hooks.lm_eval_limit)]
        commands.append(("--lm-eval-tasks", argv, out_json))
    return commands


def read_metrics(name: str, out_json: Path, log: Path) -> dict:
    if not out_json.is_file():
        raise EvalHookError(f"{name}: wrote no {out_json}; see {log}")
    try:
        metrics = json.loads(out_json.read_text())
    except json.JSONDecodeError:
        raise EvalHookError(f"{name}: {out_json} is not valid JSON; see {log}") from None
    if not isinstance(metrics, dict):
        raise EvalHookError(
            f"{name}: {out_json} holds a {type(metrics).__name__}, not a JSON object of metrics"
        )
    return metrics


def run_hooks(hooks: EvalHooks, out: Path, final_dir: Path, cfg) -> dict:
    """Export final/ to out/hf, run every hook on it, return their merged metrics."""
    from evertrain.launch.export import export_hf_checkpoint
    from evertrain.launch.export_cmd import tokenizer_from_manifest
    from evertrain.pretrain.checkpoint import store

    # absolute: the hooks run in this process's working directory (where the user's own script lives,
    # e.g. `python score.py {hf_dir} {out_json}`), while `out` may be relative to it (`--run runs/t0`)
    out, final_dir = out.resolve(), final_dir.resolve()
    hf_dir, work, log = out / "hf", out / "evals", out / "eval.log"
    shutil.rmtree(hf_dir, ignore_errors=True)  # a half-finished earlier attempt
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    tokenizer, bos_id, eos_id = tokenizer_from_manifest(cfg.data.path, out / "config.yaml")
    # weights only, a shard at a time
    export_hf_checkpoint(
        final_dir, store.read_meta(final_dir), cfg.model, tokenizer, hf_dir, bos_id=bos_id, eos_id=eos_id
    )
    evals: dict = {}
    for name, command, out_json in hook_commands(hooks, hf_dir, work):
        shown = command if isinstance(command, str) else shlex.join(command)
        with open(log, "a") as f:
            f.write(f"=== evertrain fork: {name} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {shown}\n")
            f.flush()
            code = subprocess.call(
                command,
                shell=isinstance(command, str),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ},
            )
        if code != 0:
            raise EvalHookError(f"{name}: exited with code {code}; see {log}")
        metrics = read_metrics(name, out_json, log)
        clash = sorted(set(metrics) & set(evals))
        if clash:
            raise EvalHookError(f"{name}: metric {clash[0]!r} is also reported by an earlier hook")
        evals.update(metrics)
    shutil.rmtree(hf_dir)
    shutil.rmtree(work)
    return evals
