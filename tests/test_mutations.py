"""The suite cannot quietly go blind: each bug below once slipped past the test named for the property
it breaks. Each is applied to a copy of the tree, and the test that guards the property must fail.

A mutation whose target text is gone (the code was rewritten) fails here with a message saying so:
update the mutation to the new code, keeping the bug it plants.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # node ids that must fail with the mutation applied


MUTATIONS = (
    Mutation("M1: resume() never resumes (every rerun restarts from step 0)",
             "evertrain/pretrain/checkpoint/manager.py",
             '        """Load the run\'s latest checkpoint, if any; returns its `extra` with "step"."""\n',
             '        """Load the run\'s latest checkpoint, if any; returns its `extra` with "step"."""\n'
             "        return None\n",
             ("tests/test_resume.py::test_sigkill_mid_run_then_resume_is_bitwise_identical",)),
    Mutation("M2: a device-to-host copy of the loss on every step",
             "evertrain/pretrain/loop.py",
             "                loss, grad_norm = engine.train_step(list(batch.split(t.micro_batch_size)))\n",
             "                loss, grad_norm = engine.train_step(list(batch.split(t.micro_batch_size)))\n"
             "                loss.cpu().numpy()\n",
             ("tests/test_train.py::test_no_host_sync_on_steps_that_do_not_log",)),
    Mutation("M3: the schedule returns a constant max_lr",
             "evertrain/pretrain/schedule.py",
             "        s = step.to(torch.float64)\n        lr = self._base(s)\n",
             "        s = step.to(torch.float64)\n        lr = torch.full_like(s, self.max_lr)\n",
             ("tests/test_train.py::test_train_records_follow_the_design",)),
    Mutation("M4: export --cooldown exports the main run's checkpoint instead",
             "evertrain/launch/export_cmd.py",
             "    return cooldown_dir / \"final\", config if config.is_file() else run_dir / \"config.yaml\"\n",
             "    return resolve_checkpoint(run_dir, \"latest\")[1], run_dir / \"config.yaml\"\n",
             ("tests/test_export.py::test_cli_exports_a_cooldown_result",)),
    Mutation("M5: FSDP reduce-scatters after the first micro-batch instead of the last",
             "evertrain/pretrain/engines/fsdp.py",
             'self.model.set_requires_gradient_sync(last or self.accumulate == "sharded")',
             "self.model.set_requires_gradient_sync(i == 0)",
             ("tests/test_engines.py::test_engines_give_the_same_loss_curve",)),
)


def mutated_copy(root: Path, mutation: Mutation) -> Path:
    """The tree as tests see it (package, entry point, configs, tests; the corpus by link), mutated."""
    tree = root / "tree"
    for name in ("evertrain", "tests", "configs"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pretrain.py", "pyproject.toml"):
        shutil.copy2(REPO / name, tree / name)
    (tree / "corpus").symlink_to(REPO / "corpus")
    target = tree / mutation.file
    text = target.read_text()
    assert text.count(mutation.old) == 1, (
        f"{mutation.name}: its target text is no longer in {mutation.file} exactly once; the code changed, "
        f"so update the mutation in tests/test_mutations.py to plant the same bug in the new code")
    target.write_text(text.replace(mutation.old, mutation.new))
    return tree


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name.split(":")[0])
def test_the_guarding_test_catches_the_mutation(mutation, tiny_data, tmp_path):
    tree = mutated_copy(tmp_path, mutation)
    env = {**os.environ, "PYTHONPATH": str(tree), "EVERTRAIN_TEST_TINY_DATA": str(tiny_data),
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp"), *mutation.tests],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    # exit 1 = tests ran and failed; 2-5 would be an interrupted run, a usage error or nothing collected
    assert proc.returncode == 1 and " failed" in summary and "error" not in summary, (
        f"{mutation.name} was not caught by {mutation.tests} (exit {proc.returncode}): {summary}\n"
        f"{proc.stdout[-3000:]}")
