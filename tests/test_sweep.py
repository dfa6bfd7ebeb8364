"""The horizon sweep's pipeline on a tiny model (the science is in docs/horizon_sweep.md): every run
and fork happens, evals land on the horizons, the table/compute/figure/doc come out, a rerun skips
finished runs, and bad requests fail with one line before anything runs."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from evertrain.launch import sweep
from evertrain.launch.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
HORIZONS = (10, 20)  # 8 processes: the whole pipeline in about a minute


def load_bench():
    spec = importlib.util.spec_from_file_location("horizon_sweep", REPO / "bench" / "horizon_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quick_args(out: Path, data: Path) -> list[str]:
    return ["--quick", "--horizons", *map(str, HORIZONS), "--shapes", "linear", "--config",
            str(REPO / "configs" / "tiny.yaml"), "--out", str(out), f"data.path={data}", "model.vocab_size=512"]


def test_plan_ends_cooldowns_at_the_horizons():
    plan = sweep.SweepPlan(config="c.yaml", horizons=(200, 400, 800))
    assert [plan.fork_step(t) for t in plan.horizons] == [160, 320, 640]
    assert [plan.cooldown_steps(t) for t in plan.horizons] == [40, 80, 160]
    assert plan.eval_every == 40 and plan.checkpoint_every == 160
    jobs = sweep.jobs_of(plan)
    names = [job.name for job in jobs]
    assert names[:2] == ["rsqrt", "constant"]  # the long runs start first
    assert sorted(n for n in names if n.startswith("cosine")) == ["cosine_T200", "cosine_T400", "cosine_T800"]
    forks = [job for job in jobs if isinstance(job, sweep.ForkJob)]
    assert len(forks) == 3 * 2 * 2
    assert {(f.step + f.cooldown_steps) for f in forks} == {200, 400, 800}
    assert sweep.saving_words(0.229) == "23% fewer" and sweep.saving_words(-0.2) == "20% more"
    assert sweep.SweepPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize("kwargs, message", [
    ({"horizons": (400, 200)}, "--horizons"),
    ({"horizons": (200, 400), "cooldown_fraction": 1.5}, "--cooldown-fraction"),
    ({"horizons": (2, 4)}, "cooldown steps"),
    ({"horizons": (200,), "shapes": ("square",)}, "--shapes"),
    ({"horizons": (200,), "schedules": ("cosine",)}, "--schedules"),
])
def test_bad_plans_name_the_argument(kwargs, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.SweepPlan(config="c.yaml", **kwargs)


def test_bad_override_fails_before_any_run(tmp_path, tiny_data, capsys):
    out = tmp_path / "sweep"
    rc = cli_main(["sweep", *quick_args(out, tiny_data), "optim.max_lrr=1e-3"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.max_lrr" in err
    assert not out.exists()


def test_quick_sweep_end_to_end_and_resume(tmp_path, tiny_data):
    bench = load_bench()
    out, doc = tmp_path / "sweep", tmp_path / "docs" / "horizon_sweep.md"
    doc.parent.mkdir()
    doc.write_text(f"# Horizon sweep\n\nhand-written intro\n\n{bench.BEGIN}\nstale table\n{bench.END}\n\nhand-written analysis\n")
    assert bench.main([*quick_args(out, tiny_data), "--doc", str(doc)]) == 0

    results = json.loads((out / "results.json").read_text())
    labels = [row["label"] for row in results["rows"]]
    assert labels == ["cosine (tuned to T)", "rsqrt + linear cooldown", "rsqrt, no cooldown",
                      "constant + linear cooldown", "constant, no cooldown"]
    for row in results["rows"]:
        assert set(row["val_loss"]) == {str(t) for t in HORIZONS}
        assert all(0 < loss < 10 for loss in row["val_loss"].values())
    assert all(abs(gap) < 1e-9 for gap in results["rows"][0]["gap_pct"].values())
    assert results["compute"]["cosine_steps"] == 10 + 20
    assert results["compute"]["fork_steps_per_shape"] == 20 + 2 + 4

    # each fork starts at 0.8 T from the open-ended run and ends at T with an lr of exactly 0
    for t in HORIZONS:
        result = json.loads((out / "rsqrt" / "cooldowns" / f"from_{t - t // 5:09d}_linear_{t // 5}"
                             / "result.json").read_text())
        assert result["from_step"] + result["cooldown_steps"] == t
    records = [json.loads(line) for line in (out / "constant" / "cooldowns" / "from_000000016_linear_4"
                                             / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["kind"] == "train"][-1] == 0.0
    # the cosine run to T ends with the same val batches as the no-cooldown eval at T
    cosine = sweep.read_evals(out / "cosine_T20")
    assert sorted(cosine) == list(range(2, 21, 2))

    text = doc.read_text()
    assert text.startswith("# Horizon sweep\n\nhand-written intro") and text.endswith("hand-written analysis\n")
    assert "stale table" not in text and "| rsqrt + linear cooldown |" in text and "fewer" in text
    assert (tmp_path / "docs" / "horizon_sweep.png").stat().st_size > 10_000

    # a rerun finds every run done and launches nothing
    plan = sweep.plan_from_args(parse_sweep_args(quick_args(out, tiny_data)))
    messages = []
    sweep.run_jobs(plan, out, sweep.jobs_of(plan), echo=messages.append)
    assert messages == ["sweep: 8 of 8 runs finished already"]


def parse_sweep_args(argv: list[str]):
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return parser.parse_args(argv)


def test_other_settings_into_the_same_out_are_refused(tmp_path):
    config = str(REPO / "configs" / "tiny.yaml")
    plan = sweep.SweepPlan(config=config, horizons=(200, 400))
    sweep.claim_out_dir(plan, tmp_path)
    sweep.claim_out_dir(plan, tmp_path)  # the same plan resumes
    with pytest.raises(sweep.SweepError, match="horizons"):
        sweep.claim_out_dir(sweep.SweepPlan(config=config, horizons=(200, 800)), tmp_path)
    with pytest.raises(sweep.SweepError, match="the config"):
        sweep.claim_out_dir(sweep.SweepPlan(config=config, horizons=(200, 400),
                                            overrides=("optim.max_lr=1e-2",)), tmp_path)


def test_failed_run_names_its_log(tmp_path, tiny_data):
    plan = sweep.SweepPlan(config=str(REPO / "configs" / "tiny.yaml"), horizons=(10,),
                           overrides=(*sweep.QUICK_OVERRIDES, f"data.path={tmp_path / 'missing'}",
                                      "model.vocab_size=512"))
    jobs = [job for job in sweep.jobs_of(plan) if job.name == "cosine_T10"]
    with pytest.raises(sweep.SweepError, match=r"cosine_T10: exited with status 2 .*cosine_T10\.log"):
        sweep.run_jobs(plan, tmp_path, jobs, parallel=1, echo=lambda _: None)
