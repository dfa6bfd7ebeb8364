"""Post-fork evaluation hooks: `--eval-cmd "CMD {hf_dir} {out_json}"` and `--lm-eval-tasks` (the latter with
lm-evaluation-harness on a tiny task defined here, offline) put their metrics into each fork's result.json,
through `evertrain fork` and through the forker, and `evertrain report` tables them."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from evertrain.launch import lm_eval_runner
from evertrain.launch.cli import main as cli_main
from evertrain.launch.evals import EvalHooks, hook_commands, hooks_from_args, run_hooks
from evertrain.launch.forker import Forker, ForkerOptions
from evertrain.launch.lm_eval_runner import task_metrics
from evertrain.launch.nodes import parse_pool
from evertrain.pretrain.config import load_config

from conftest import pretrain_tiny

REPO = Path(__file__).resolve().parents[1]

# The eval command of the tests: checks it got an HF directory, writes metrics read from it.
HOOK = """
import json, sys
from pathlib import Path
hf_dir, out_json = Path(sys.argv[1]), Path(sys.argv[2])
config = json.loads((hf_dir / "config.json").read_text())
assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "tokenizer.model").is_file()
out_json.write_text(json.dumps({"toy": {"hidden": config["hidden_size"], "layers": config["num_hidden_layers"]}}))
print("toy hook ran on", hf_dir)
"""

TASK = """task: evertrain_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def overrides(data: Path) -> list[str]:
    return [
        f"data.path={data}",
        "model.vocab_size=512",
        "model.d_model=32",
        "model.seq_len=32",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.device=cpu",
        "engine.name=single",
        "eval.every_steps=0",
        "eval.batches=1",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=100",
    ]


@pytest.fixture(scope="module")
def main_run(tiny_data, tmp_path_factory):
    """A 4-step main run with checkpoints at steps 2 and 4 (pretrain.py, in process)."""
    run_dir = tmp_path_factory.mktemp("evals") / "main"
    assert pretrain_tiny(run_dir, *overrides(tiny_data), "train.max_steps=4") == 0
    return run_dir


@pytest.fixture(scope="module")
def finished_fork(main_run) -> Path:
    """A fork done without hooks (its final/ weights are what the hooks read)."""
    assert (
        cli_main(
            [
                "fork",
                "--run",
                str(main_run),
                "--step",
                "4",
                "--cooldown-steps",
                "1",
                "--shape",
                "1-sqrt",
                "--eval-batches",
                "1",
            ]
        )
        == 0
    )
    return main_run / "cooldowns" / "from_000000004_1-sqrt_1"


@pytest.fixture
def hook(tmp_path) -> str:
    script = tmp_path / "toy_hook.py"
    script.write_text(HOOK)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{hf_dir}} {{out_json}}"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def tiny_task(dir: Path) -> Path:
    """A 4-question multiple-choice task over a local JSON file, in lm_eval's YAML format."""
    dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": "To be, or not", "choices": [" to be", " the king"], "answer": 0},
        {"question": "My lord", "choices": [",", " banana"], "answer": 0},
        {"question": "Good", "choices": [" night", " xylophone"], "answer": 0},
        {"question": "What", "choices": [" is", " qz"], "answer": 0},
    ]
    (dir / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dir / "evertrain_tiny.yaml").write_text(TASK.format(data=dir / "tiny.jsonl"))
    return dir


def test_eval_cmd_metrics_go_into_result_json_and_a_failing_hook_is_retried(main_run, hook, tmp_path, capsys):
    argv = ["fork", "--run", str(main_run), "--step", "2", "--cooldown-steps", "1", "--eval-batches", "1"]
    failing = f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(3)' {{hf_dir}} {{out_json}}"
    assert cli_main([*argv, "--eval-cmd", failing]) == 2
    errors = [
        line for line in capsys.readouterr().err.splitlines() if "error" in line
    ]  # (the rest: a progress bar)
    out = main_run / "cooldowns" / "from_000000002_1-sqrt_1"
    assert errors == [f"evertrain fork: error: --eval-cmd: exited with code 3; see {out / 'eval.log'}"]
    assert (
        not (out / "result.json").exists() and (out / "checkpoints").is_dir()
    )  # not done: rerun redoes the hook
    assert cli_main(["report", "--run", str(main_run), "--out", str(tmp_path / "failed.png")]) == 0
    shown = capsys.readouterr().out  # failed, with the reason, not "running" forever
    assert f"failed: {out.name}: --eval-cmd: exited with code 3" in shown and "running" not in shown

    assert cli_main([*argv, "--eval-cmd", hook]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["evals"] == {"toy": {"hidden": 32, "layers": 2}} and result["val_loss"] > 0
    assert not (out / "checkpoints").exists() and not (out / "hf").exists()
    assert "toy hook ran on" in (out / "eval.log").read_text()

    # a fork done without hooks gets them when asked again; one done with them is left alone
    plain = main_run / "cooldowns" / "from_000000004_1-sqrt_1"
    assert (
        cli_main(
            ["fork", "--run", str(main_run), "--step", "4", "--cooldown-steps", "1", "--eval-batches", "1"]
        )
        == 0
    )
    assert "evals" not in json.loads((plain / "result.json").read_text())
    assert (
        cli_main(["fork", "--run", str(main_run), "--step", "4", "--cooldown-steps", "1", "--eval-cmd", hook])
        == 0
    )
    assert json.loads((plain / "result.json").read_text())["evals"]["toy"]["layers"] == 2
    capsys.readouterr()
    assert cli_main(["report", "--run", str(main_run), "--out", str(tmp_path / "r.png")]) == 0
    table = capsys.readouterr().out
    assert "toy/hidden" in table and "toy/layers" in table


def test_hooks_work_with_a_relative_run_dir_from_another_directory(main_run, tmp_path, monkeypatch):
    """As the README writes it: `--run runs/t0` and `python score.py ...`, both relative to where the user is."""
    (tmp_path / "score.py").write_text(HOOK)
    monkeypatch.chdir(tmp_path)
    run = os.path.relpath(main_run, tmp_path)
    assert not Path(run).is_absolute()
    assert (
        cli_main(
            [
                "fork",
                "--run",
                run,
                "--step",
                "2",
                "--cooldown-steps",
                "1",
                "--shape",
                "cosine",
                "--eval-batches",
                "1",
                "--eval-cmd",
                f"{shlex.quote(sys.executable)} score.py {{hf_dir}} {{out_json}}",
            ]
        )
        == 0
    )
    out = main_run / "cooldowns" / "from_000000002_cosine_1"
    assert json.loads((out / "result.json").read_text())["evals"] == {"toy": {"hidden": 32, "layers": 2}}


# Stands in for `python -m evertrain.launch.fork` under the forker: records its argv, leaves result.json.
FAKE_FORK = """
import json, sys
from pathlib import Path
args = sys.argv[1:]
run, step, c, shape = (args[args.index(k) + 1] for k in ("--run", "--step", "--cooldown-steps", "--shape"))
out = Path(run) / "cooldowns" / f"from_{int(step):09d}_{shape}_{c}"
(out / "argv.json").write_text(json.dumps(args))
(out / "result.json").write_text(json.dumps({"from_step": int(step), "cooldown_steps": int(c), "shape": shape,
                                             "tokens": 1, "val_loss": 1.0, "val_ppl": 2.7}))
"""

# Stands in for lm-evaluation-harness: records what the runner asked for, returns lm_eval-shaped results.
FAKE_LM_EVAL = {
    "lm_eval/__init__.py": """
import json, os
def simple_evaluate(**kwargs):
    kwargs["task_manager"] = kwargs["task_manager"].include_path
    with open(os.environ["FAKE_LM_EVAL_LOG"], "w") as f:
        json.dump(kwargs, f)
    return {"results": {t: {"alias": t, "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 3}
                        for t in kwargs["tasks"]}}
""",
    "lm_eval/tasks/__init__.py": """
class TaskManager:
    def __init__(self, include_path=None):
        self.include_path = include_path
    def match_tasks(self, names):
        return [n for n in names if n in ("hellaswag", "evertrain_tiny")]
""",
}


def test_forker_passes_the_hooks_to_every_fork(tmp_path, hook, monkeypatch):
    (tmp_path / "fakefork.py").write_text(FAKE_FORK)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{REPO}")
    run_dir = tmp_path / "run"
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step_{step:09d}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{step:09d}" / "meta.json").write_text(json.dumps({"step": step}))
    hooks = hooks_from_args(SimpleNamespace(eval_cmd=hook, lm_eval_tasks="hellaswag", lm_eval_limit=5))
    options = ForkerOptions(run_dir, cooldown_fraction=0.5, every=2, once=True, poll_s=0.05, hooks=hooks)
    assert Forker(options, parse_pool("local:2"), fork_module="fakefork", log=lambda _: None).run() == 0
    for name in ("from_000000002_1-sqrt_1", "from_000000004_1-sqrt_2"):
        argv = json.loads((run_dir / "cooldowns" / name / "argv.json").read_text())
        assert argv[-6:] == ["--eval-cmd", hook, "--lm-eval-tasks", "hellaswag", "--lm-eval-limit", "5"], argv


def run_lm_eval_hook(fork_dir: Path, tasks_dir: Path, limit: int) -> dict:
    """The --lm-eval-tasks hook on a finished fork's final weights."""
    hooks = EvalHooks(lm_eval_tasks=("evertrain_tiny",), lm_eval_include=str(tasks_dir), lm_eval_limit=limit)
    return run_hooks(hooks, fork_dir, fork_dir / "final", load_config(fork_dir / "config.yaml"))


def test_lm_eval_runner_calls_the_harness_on_the_export(finished_fork, tmp_path, monkeypatch, capsys):
    """With a fake lm_eval (the real one takes minutes to import and run on this machine's CPUs; the test
    below runs it when EVERTRAIN_TEST_LM_EVAL=1)."""
    for name, text in FAKE_LM_EVAL.items():
        (tmp_path / "fake" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fake" / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'fake'}:{REPO}")
    monkeypatch.setenv("FAKE_LM_EVAL_LOG", str(tmp_path / "lm_eval_call.json"))
    fork_dir = finished_fork
    tasks = tiny_task(tmp_path / "tasks")
    assert run_lm_eval_hook(fork_dir, tasks, limit=3) == {"evertrain_tiny": {"acc": 0.5}}
    call = json.loads((tmp_path / "lm_eval_call.json").read_text())
    assert call["model"] == "hf" and call["model_args"] == {
        "pretrained": str(fork_dir / "hf"),
        "dtype": "float32",
    }
    assert call["tasks"] == ["evertrain_tiny"] and call["limit"] == 3 and call["device"] == "cpu"
    assert call["task_manager"] == str(tasks)
    assert not (fork_dir / "hf").exists()  # the export is removed once the hooks are done

    # a relative fork dir from another working directory: the runner is handed the export's absolute path
    monkeypatch.chdir(tmp_path)
    relative = Path(os.path.relpath(fork_dir, tmp_path))
    assert run_lm_eval_hook(relative, tasks, limit=3) == {"evertrain_tiny": {"acc": 0.5}}
    assert json.loads((tmp_path / "lm_eval_call.json").read_text())["model_args"]["pretrained"] == str(
        fork_dir / "hf"
    )

    monkeypatch.syspath_prepend(str(tmp_path / "fake"))  # the runner in process, for its one-line errors
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for argv, message in [
        (["--hf-dir", str(fork_dir / "final"), "--tasks", "hellaswag"], "no config.json"),
        (
            ["--hf-dir", str(tmp_path / "hf"), "--tasks", "no_such_task"],
            "lm_eval knows no task 'no_such_task' (a task of your own needs --include-path)",
        ),
    ]:
        assert lm_eval_runner.main([*argv, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()


@pytest.mark.skipif(
    not os.environ.get("EVERTRAIN_TEST_LM_EVAL"), reason="set EVERTRAIN_TEST_LM_EVAL=1 (minutes)"
)
def test_lm_eval_tasks_with_the_real_harness_offline_on_a_local_task(finished_fork, tmp_path, offline):
    pytest.importorskip("lm_eval")
    evals = run_lm_eval_hook(finished_fork, tiny_task(tmp_path / "tasks"), limit=3)
    assert set(evals) == {"evertrain_tiny"} and set(evals["evertrain_tiny"]) == {"acc"}
    assert evals["evertrain_tiny"]["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)  # 3 questions (limit)


def test_hook_arguments_are_checked_and_become_commands(tmp_path):
    def hooks(**kw):
        return hooks_from_args(SimpleNamespace(**kw))

    for kw, message in [
        ({"eval_cmd": "run {hf_dir}"}, "must contain {out_json}"),
        ({"eval_cmd": "run {hf_dir} {out_json} {model}"}, "unknown placeholder {model}"),
        ({"eval_cmd": "run {hf_dir {out_json}"}, "--eval-cmd:"),
        ({"eval_cmd": 'run "{hf_dir}" {out_json}'}, "{hf_dir} is inside quotes"),
        ({"eval_cmd": "run '{hf_dir}' {out_json}"}, "{hf_dir} is inside quotes"),
        ({"eval_cmd": 'run {hf_dir} --out="x/{out_json}"'}, "{out_json} is inside quotes"),
        ({"eval_cmd": "run \\{hf_dir} {out_json}"}, "{hf_dir} is inside quotes or after a backslash"),
        ({"eval_cmd": "sh -c 'run {hf_dir} {out_json}'"}, "{hf_dir} is inside quotes"),
        ({"lm_eval_tasks": " , "}, "--lm-eval-tasks: expected T1,T2"),
        ({"lm_eval_limit": 5}, "only with --lm-eval-tasks"),
        ({"lm_eval_tasks": "a", "lm_eval_limit": 0}, "--lm-eval-limit: must be > 0"),
        ({"lm_eval_tasks": "a", "lm_eval_include": str(tmp_path / "no")}, "not a directory"),
    ]:
        with pytest.raises(Exception, match=message.replace("{", r"\{").replace("(", r"\(")) as err:
            hooks(**kw)
        assert "\n" not in str(err.value)

    for fine in [
        "echo \"a b\" {hf_dir} 'c' {out_json}",
        'run \\" {hf_dir} {out_json} "\\""',
        "a\\'b {hf_dir} {out_json}",
    ]:
        assert hooks(eval_cmd=fine).eval_cmd == fine  # quotes that close before the placeholders
    h = hooks(
        eval_cmd="score {hf_dir} --json {out_json}",
        lm_eval_tasks="hellaswag, arc_easy",
        lm_eval_include=str(tmp_path),
        lm_eval_limit=10,
    )
    assert h.argv() == [
        "--eval-cmd",
        "score {hf_dir} --json {out_json}",
        "--lm-eval-tasks",
        "hellaswag,arc_easy",
        "--lm-eval-include",
        str(tmp_path),
        "--lm-eval-limit",
        "10",
    ]
    (name1, shell, json1), (name2, argv, json2) = hook_commands(h, Path("/x/my hf"), Path("/w"))
    assert shell == "score '/x/my hf' --json /w/eval_cmd.json" and json1 == Path("/w/eval_cmd.json")
    assert (
        argv[1:3] == ["-m", "evertrain.launch.lm_eval_runner"]
        and argv[argv.index("--tasks") + 1] == "hellaswag,arc_easy"
    )
    assert argv[argv.index("--limit") + 1] == "10" and argv[argv.index("--hf-dir") + 1] == "/x/my hf"
    assert not EvalHooks() and bool(h)


def test_bad_hook_arguments_are_one_line_exit_2(tmp_path, capsys):
    for cmd in (
        ["fork", "--run", str(tmp_path), "--step", "1", "--cooldown-steps", "1"],
        ["forker", "--run", str(tmp_path), "--every", "1", "--cooldown-fraction", "0.5"],
    ):
        assert cli_main([*cmd, "--eval-cmd", "x {hf_dir}"]) == 2
        err = capsys.readouterr().err
        assert "--eval-cmd: must contain {out_json}" in err and len(err.strip().splitlines()) == 1


def test_lm_eval_results_are_flattened_per_task():
    results = {
        "hellaswag": {"alias": "hellaswag", "acc,none": 0.25, "acc_stderr,none": 0.01, "acc_norm,none": 0.3},
        "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2, "samples": True},
        "empty": {"alias": "x"},
    }
    assert task_metrics(results) == {
        "hellaswag": {"acc": 0.25, "acc_norm": 0.3},
        "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2},
    }
