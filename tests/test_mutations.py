"""The suite cannot quietly go blind: each bug below once slipped past the test named for the property
it breaks. Each is planted in a copy of the tree, and the test that guards the property must fail, on
the assertion that names it: the failing test is the guard (not an unrelated test that happens to
break) and its failure report holds the mutation's `message` (not an import error or a timeout).

A mutation whose target text is gone (the code was rewritten) fails here with a message saying so:
update the mutation to the new code, keeping the bug it plants.

Cheap by construction, so the list can grow: the copy is hard links to the repo's files (the mutated
file alone is a new file, and guarding tests write only under their tmp_path, so the repo is never
written), and each mutation is one pytest process (`-x -p no:cacheprovider`) that runs only its
guarding tests, on the session's prepared data.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREE = ("evertrain", "tests", "configs", "bench", "pretrain.py", "pyproject.toml")  # what the tests read


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    # node ids (one without [...] stands for all its parameters), run in this order in one process with
    # -x: the cheap test named for the property first, a slower end-to-end one after it as a backstop
    # that runs only if the first misses (then the backstop's failure must carry `message`)
    tests: tuple[str, ...]
    message: str  # a fragment of the guard's failure report that shows it failed on the planted bug


MUTATIONS = (
    Mutation(
        "M1: resume() never resumes (every rerun restarts from step 0)",
        "evertrain/pretrain/checkpoint/manager.py",
        '        """Load the run\'s latest checkpoint, if any; returns its `extra` with "step"."""\n',
        '        """Load the run\'s latest checkpoint, if any; returns its `extra` with "step"."""\n'
        "        return None\n",
        (
            "tests/test_checkpoint.py::test_resume_continues_bitwise",
            "tests/test_resume.py::test_sigkill_mid_run_then_resume_is_bitwise_identical",
        ),
        "assert None == {",
    ),
    Mutation(
        "M2: a device-to-host copy of the loss on every step",
        "evertrain/pretrain/loop.py",
        "                loss, grad_norm = engine.train_step(list(batch.split(t.micro_batch_size)))\n",
        "                loss, grad_norm = engine.train_step(list(batch.split(t.micro_batch_size)))\n"
        "                loss.cpu().numpy()\n",
        ("tests/test_train.py::test_no_host_sync_on_steps_that_do_not_log",),
        "{1: ['cpu', 'numpy']",
    ),
    Mutation(
        "M3: the schedule returns a constant max_lr",
        "evertrain/pretrain/schedule.py",
        "        s = step.to(torch.float64)\n        lr = self._base(s)\n",
        "        s = step.to(torch.float64)\n        lr = torch.full_like(s, self.max_lr)\n",
        (
            "tests/test_schedule.py::test_rsqrt_is_the_seeds_max_lr_sqrt_w_over_step",
            "tests/test_train.py::test_train_records_follow_the_design",
        ),
        "assert_close(lr_at(Schedule(MAX_LR, W), STEPS), want)",
    ),
    Mutation(
        "M4: export --cooldown exports the main run's checkpoint instead",
        "evertrain/launch/export_cmd.py",
        '    return cooldown_dir / "final", config if config.is_file() else run_dir / "config.yaml"\n',
        '    return resolve_checkpoint(run_dir, "latest")[1], run_dir / "config.yaml"\n',
        ("tests/test_export.py::test_cli_exports_a_cooldown_result",),
        'logits_after_export(out, load_consolidated(cooldown / "final")',
    ),
    Mutation(
        "M5: FSDP reduce-scatters after the first micro-batch instead of the last",
        "evertrain/pretrain/engines/fsdp.py",
        'self.model.set_requires_gradient_sync(last or self.accumulate == "sharded")',
        "self.model.set_requires_gradient_sync(i == 0)",
        (
            "tests/test_engines.py::test_fsdp2_reduce_scatters_per_step_as_its_accumulate_mode_says",
            "tests/test_engines.py::test_engines_give_the_same_loss_curve",
        ),
        "accumulate=unsharded: reduce-scatters after micro-batches [0, 0",
    ),
    Mutation(
        "M6: read-ahead discarded at a refresh is not credited back to the prefetch limit",
        "evertrain/pretrain/data/prefetch.py",
        "                    self.left = None if self.left is None else self.left + len(self.ready)\n",
        "",
        ("tests/test_prefetch.py::test_read_ahead_discarded_by_a_refresh_is_credited_back_to_the_limit",),
        "the read-ahead discarded by the refresh was not credited back to the limit",
    ),
    Mutation(
        "M7: the DCP metadata allow-list takes any torch.* name, not only dtypes",
        "evertrain/pretrain/checkpoint/safe_load.py",
        'if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):',
        'if module == "torch" and hasattr(torch, name):',
        ("tests/test_faults.py::test_crafted_dcp_metadata_may_use_torch_dtypes_but_no_other_torch_name",),
        "a crafted .metadata ran torch.save",
    ),
    Mutation(
        "M8: the non-finite flag is set only when clipping is on",
        "evertrain/pretrain/engines/base.py",
        "    if skip_nonfinite:\n        optimizer.found_inf",
        "    if skip_nonfinite and max_norm > 0:\n        optimizer.found_inf",
        ("tests/test_faults.py::test_skip_drops_a_nan_update_with_clipping_off_too",),
        "a NaN step changed weights or moments with optim.grad_clip=0.0",
    ),
    Mutation(
        "M9: the fit's variance is SSE/n instead of SSE/(n-p)",
        "evertrain/launch/scaling.py",
        "    sigma2 = sse / fit.dof\n",
        "    sigma2 = sse / fit.points\n",
        ("tests/test_report.py::test_band_is_students_t_times_the_standard_error_over_n_minus_p_dof",),
        "the band is not t(n-p) * sqrt(g^T cov g) with s^2 = SSE/(n-p)",
    ),
    Mutation(
        "M10: the sweep's best LR is the one with the best single seed, not the best mean",
        "evertrain/launch/sweep/results.py",
        "            best = min(range(len(by_lr)), key=lambda i: by_lr[i][1])\n",
        "            best = min(range(len(by_lr)), key=lambda i: min(losses[schedule, cooldown, t, by_lr[i][0]]))\n",
        ("tests/test_sweep.py::test_best_lr_is_the_lowest_mean_over_seeds_not_the_luckiest_seed",),
        "the best LR was picked at 0.01, not by the lowest mean over seeds",
    ),
    Mutation(
        "M11: a token file's id equal to the vocab size is accepted",
        "evertrain/pretrain/data/encode.py",
        "        if chunk.min() < 0 or chunk.max() >= enc.vocab_size:\n",
        "        if chunk.min() < 0 or chunk.max() > enc.vocab_size:\n",
        ("tests/test_append.py::test_a_token_id_equal_to_the_vocab_size_is_refused",),
        "a token id equal to the vocab size (512 of 512) was accepted",
    ),
    Mutation(
        "M12: HF import no longer compares rms_norm_eps",
        "evertrain/pretrain/model/hf_llama.py",
        ' ("norm_eps", "rms_norm_eps", model_cfg.norm_eps),',
        "",
        ("tests/test_hf_import.py::test_every_config_field_must_match_the_run[rms_norm_eps]",),
        "{'rms_norm_eps': 0.05} was imported into a model that does not compute it",
    ),
)


def linked_tree(root: Path) -> Path:
    """The files tests read, as hard links to the repo's (a copy where linking fails); the corpus by link."""
    tree = root / "tree"
    for name in TREE:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source, tree / name, copy_function=link_or_copy, ignore=shutil.ignore_patterns("__pycache__")
            )
        elif source.is_file():
            tree.mkdir(parents=True, exist_ok=True)
            link_or_copy(source, tree / name)
    (tree / "corpus").symlink_to(REPO / "corpus")
    return tree


def link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def mutated_tree(root: Path, mutation: Mutation) -> Path:
    tree = linked_tree(root)
    target = tree / mutation.file
    text = target.read_text()
    assert text.count(mutation.old) == 1, (
        f"{mutation.name}: its target text is no longer in {mutation.file} exactly once; the code changed, "
        f"so update the mutation in tests/test_mutations.py to plant the same bug in the new code"
    )
    target.unlink()  # a new file in place of the link: writing through the link would change the repo
    target.write_text(text.replace(mutation.old, mutation.new))
    assert (REPO / mutation.file).read_text() == text
    return tree


def failed_tests(output: str) -> list[str]:
    """Node ids of pytest's short summary: `FAILED <node id> - <message>` lines."""
    return re.findall(r"^FAILED (\S+)", output, flags=re.MULTILINE)


def test_mutations_are_named_once_and_planted_by_exact_text():
    names = [m.name.split(":")[0] for m in MUTATIONS]
    assert names == [f"M{i}" for i in range(1, len(MUTATIONS) + 1)]
    for mutation in MUTATIONS:
        assert (REPO / mutation.file).read_text().count(mutation.old) == 1, mutation.name
        assert mutation.old != mutation.new and mutation.message, mutation.name


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name.split(":")[0])
def test_the_guarding_test_catches_the_mutation(mutation, tiny_data, tmp_path):
    tree = mutated_tree(tmp_path, mutation)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "EVERTRAIN_TEST_TINY_DATA": str(tiny_data),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rf",
            "--basetemp",
            str(tmp_path / "basetemp"),
            *mutation.tests,
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = proc.stdout
    summary = output.strip().splitlines()[-1] if output.strip() else proc.stderr[-2000:]
    failed = failed_tests(output)
    # exit 1 = tests ran and failed; 2-5 would be an interrupted run, a usage error or nothing collected
    assert proc.returncode == 1 and failed and " error" not in summary, (
        f"{mutation.name} was not caught by {mutation.tests} (exit {proc.returncode}): {summary}\n{output[-3000:]}"
    )
    assert failed[0] in mutation.tests or failed[0].split("[")[0] in mutation.tests, (
        f"{mutation.name}: {failed[0]} failed, not the guarding test {mutation.tests}:\n{output[-3000:]}"
    )
    report = output.split("= FAILURES =", 1)[-1]
    assert mutation.message in report, (
        f"{mutation.name}: {failed[0]} failed, but not on the planted bug (no {mutation.message!r} in its "
        f"report):\n{report[-3000:]}"
    )
