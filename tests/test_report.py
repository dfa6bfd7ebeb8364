"""`evertrain report` on a synthetic run: the tables, the PNG, the scaling-law fit with its band and
degenerate-fit warnings, the one projection console and plot share, branches drawn from their fork
point on a log token axis, the eval hook's metrics, and clear messages for too few points and bad
arguments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from evertrain.launch.cli import main as cli_main
from evertrain.launch.report import (
    figure,
    fit_cooldowns,
    fit_power_law,
    load_run,
    main_run_at,
    parse_cooldown_name,
    run_projection,
)
from evertrain.pretrain.checkpoint.retention import pin

TOKENS_PER_STEP = 1000


def law(tokens):
    return 1.5 + 40.0 * np.power(np.asarray(tokens, dtype=np.float64), -0.35)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def synthetic_run(run_dir: Path, fork_steps=(200, 400, 800, 1600), last_step=2000, evals=None) -> Path:
    """A main run of `last_step` steps and linear cooldowns (C = 20% of S) whose val loss follows `law`."""
    tokens = [s * TOKENS_PER_STEP for s in range(10, last_step + 1, 10)]
    write_jsonl(
        run_dir / "metrics.jsonl",
        [
            {
                "kind": "train",
                "step": d // TOKENS_PER_STEP,
                "tokens": d,
                "loss": float(law(d)) + 0.3,
                "lr": 1e-3 / math.sqrt(d),
                "grad_norm": 1.0,
                "tokens_per_s": 1.0,
                "time": 0.0,
            }
            for d in tokens
        ]
        + [
            {"kind": "eval", "step": d // TOKENS_PER_STEP, "tokens": d, "val_loss": float(law(d)) + 0.35}
            for d in tokens[9::10]
        ],
    )
    for step in (1800, 1900, 2000):
        step_dir = run_dir / "checkpoints" / f"step_{step:09d}"
        step_dir.mkdir(parents=True)
        (step_dir / "meta.json").write_text(json.dumps({"step": step, "tokens": step * TOKENS_PER_STEP}))
    pin(run_dir / "checkpoints" / "step_000001900", "fork.test", 600)
    for s in fork_steps:
        c = s // 5
        out = run_dir / "cooldowns" / f"from_{s:09d}_linear_{c}"
        end = (s + c) * TOKENS_PER_STEP
        progress = [(t, (t - s) / c) for t in range(s + 5, s + c + 1, 5)]
        write_jsonl(
            out / "metrics.jsonl",
            [
                {
                    "kind": "train",
                    "step": t,
                    "tokens": t * TOKENS_PER_STEP,
                    "loss": float(law(end)) + 0.3 * (1 - x),
                    "lr": 1e-4 * (1 - x),
                }
                for t, x in progress
            ],
        )
        val = float(law(end))
        result = {
            "from_step": s,
            "cooldown_steps": c,
            "shape": "linear",
            "tokens": end,
            "val_loss": val,
            "val_ppl": math.exp(val),
        }
        if evals is not None:
            result["evals"] = evals(s)
        (out / "result.json").write_text(json.dumps(result))
    (run_dir / "cooldowns" / "from_000002000_linear_400").mkdir(parents=True)  # queued, not started
    return run_dir


def test_fit_recovers_a_known_law_and_is_robust():
    tokens = np.array([2.4e5, 4.8e5, 9.6e5, 1.92e6, 3.84e6])
    fit = fit_power_law(tokens, law(tokens))
    assert fit.E == pytest.approx(1.5, abs=2e-3) and fit.beta == pytest.approx(0.35, abs=2e-3)
    assert float(fit(1e7)) == pytest.approx(float(law(1e7)), abs=1e-3)
    noisy = law(tokens) + np.array([0.01, -0.01, 0.005, 0.0, -0.005])
    fit = fit_power_law(tokens, noisy)
    assert fit is not None and fit.E >= 0 and fit.B > 0 and fit.rmse < 0.02
    assert fit_power_law(tokens, law(tokens)[::-1]) is None  # loss rising with tokens: no law
    assert fit_power_law(tokens[:2], law(tokens[:2])) is None
    assert fit_power_law([1e6, 1e6, 1e6], [3.0, 3.1, 2.9]) is None  # one token count is one point
    straight = fit_power_law([1e3, 2e3, 3e3], [3.0, 2.0, 1.0])  # would need E < 0: clamped to the boundary
    assert straight is not None and straight.E == 0.0 and straight.B > 0


def test_report_prints_tables_projection_and_writes_png(tmp_path, capsys):
    run_dir = synthetic_run(tmp_path / "run")
    out = tmp_path / "plots" / "r.png"
    assert cli_main(["report", "--run", str(run_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "checkpoints of" in text and "fork.test" in text and "1900" in text
    for s in ("200", "400", "800", "1600"):
        assert s in text
    assert "queued" in text  # the cooldown dir without a result
    assert "fit (4 linear cooldowns)" in text and "warning" not in text
    # 2M tokens so far, cooldowns of 20%: cooling down now ends at 2.4M, training 2M more first at 4.8M
    decision = " ".join(text.split("decision: ")[1].split())
    assert decision.startswith("training 2M more tokens, then cooling down, is projected to reach ")
    loss, band = float(decision.split("reach ")[1].split()[0]), float(decision.split("+- ")[1].split()[0])
    gain = float(decision.split("(gain ")[1].split()[0])
    assert loss == pytest.approx(float(law(4.8e6)), abs=1e-4) and band < 1e-3  # exact data: a thin band
    assert gain == pytest.approx(float(law(2.4e6) - law(4.8e6)), abs=1e-4)
    hours = float(decision.split("costing ")[1].split()[0])  # the synthetic run logs 1 token/s
    assert hours == pytest.approx((4.8e6 - 2e6) / 3600, rel=1e-2) and "measured 1 tokens/s" in decision
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert f"plot: {out}" in text.replace("\n", "")

    assert cli_main(["report", "--run", str(run_dir), "--extra-tokens", "1e6", "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    gain = float(text.split("(gain ")[1].split()[0])
    assert gain == pytest.approx(float(law(2.4e6) - law(3.6e6)), abs=1e-4)


def projection_and_figure(run_dir: Path):
    report = load_run(run_dir)
    result = fit_cooldowns(report.cooldowns)
    proj = run_projection(report, result, None)
    return report, result.fit, proj, figure(report, result.fit, proj)


def test_plot_shows_the_console_projection_branches_from_fork_points_on_log_tokens(tmp_path, capsys):
    run_dir = synthetic_run(tmp_path / "run")
    report, fit, proj, fig = projection_and_figure(run_dir)
    ax_loss, ax_lr = fig.axes
    assert ax_loss.get_xscale() == "log" and ax_lr.get_xscale() == "log"
    marker = [line for line in ax_loss.get_lines() if line.get_label().startswith("train 2M more, cool down")]
    assert len(marker) == 1
    assert marker[0].get_xdata()[0] == proj.target == 4.8e6 and marker[0].get_ydata()[0] == proj.loss
    assert cli_main(["report", "--run", str(run_dir)]) == 0
    console = capsys.readouterr().out
    assert proj.loss_text() in marker[0].get_label() and proj.loss_text() in console
    now = [line for line in ax_loss.get_lines() if line.get_label().startswith("cool down now")]
    assert now[0].get_xdata()[0] == 2.4e6 and f"{proj.loss_now:.4f}" in console
    # each branch starts where the main run was at the fork step: its tokens, loss and LR
    for c in report.cooldowns:
        if not c.curve:
            continue
        main = main_run_at(report.train, c.from_step)
        lr_line = [line for line in ax_lr.get_lines() if line.get_xdata()[-1] == c.curve[-1]["tokens"]][0]
        assert lr_line.get_xdata()[0] == c.fork_tokens == c.from_step * TOKENS_PER_STEP
        assert lr_line.get_ydata()[0] == pytest.approx(1e-3 / math.sqrt(c.from_step * TOKENS_PER_STEP))
        assert lr_line.get_ydata()[0] == main["lr"]


def test_fit_recovers_a_noisy_power_law_within_its_band():
    tokens, target = np.geomspace(2e5, 4e6, 6), 8e6
    covered = 0
    for seed in range(30):
        noisy = law(tokens) + np.random.default_rng(seed).normal(0.0, 0.01, len(tokens))
        fit = fit_power_law(tokens, noisy, "linear")
        assert not fit.degenerate and fit.dof == 3
        covered += abs(float(fit(target)) - float(law(target))) <= fit.band([target])[0]
        if seed == 0:
            assert abs(fit.E - 1.5) <= 3.182 * fit.param_stderr("E")
            assert abs(fit.beta - 0.35) <= 3.182 * fit.param_stderr("beta")
            assert 0 < fit.band([target])[0] < 0.2 and fit.band([4e6])[0] < fit.band([target])[0]
    assert covered >= 26  # a 95% band: ~28.5 of 30 expected


def test_band_is_students_t_times_the_standard_error_over_n_minus_p_dof():
    """The band recomputed from its definition, independently of scaling.py: the Jacobian by central
    differences at the fitted parameters, s^2 = SSE / (n - p), cov = s^2 (J^T J)^-1, and t for n - p = 3
    degrees of freedom (3.182, not 1.96). SSE / n or 1.96 gives a band ~29% or ~38% too narrow."""
    tokens, target = np.geomspace(2e5, 4e6, 6), 8e6
    noisy = law(tokens) + np.random.default_rng(0).normal(0.0, 0.01, len(tokens))
    fit = fit_power_law(tokens, noisy, "linear")
    assert not fit.degenerate and fit.free == ("E", "b", "beta") and fit.dof == 3

    def model(params, d):
        e, b, beta = params
        return e + b * np.power(d / fit.scale, -beta)

    params = np.array([fit.E, fit.B * fit.scale**-fit.beta, fit.beta])
    steps = 1e-6 * np.maximum(np.abs(params), 1.0)

    def jacobian(d):
        return np.stack(
            [
                (model(params + h, d) - model(params - h, d)) / (2 * h[i])
                for i, h in enumerate(np.diag(steps))
            ],
            axis=1,
        )

    sse = float(np.sum((model(params, tokens) - noisy) ** 2))
    jac = jacobian(tokens)
    cov = sse / (len(tokens) - 3) * np.linalg.inv(jac.T @ jac)
    g = jacobian(np.array([target]))[0]
    expected = 3.182 * math.sqrt(g @ cov @ g)
    assert fit.band([target])[0] == pytest.approx(expected, rel=1e-3), (
        "the band is not t(n-p) * sqrt(g^T cov g) with s^2 = SSE/(n-p)"
    )
    assert fit.param_stderr("beta") == pytest.approx(math.sqrt(cov[2, 2]), rel=1e-3)


def test_degenerate_fits_warn(tmp_path, capsys):
    tokens = np.array([2.4e5, 9.6e5, 3.84e6])
    fit = fit_power_law(tokens, law(tokens))  # 3 points, 3 parameters
    assert fit.degenerate and "3 points for 3 free parameters" in fit.warnings[0]
    assert math.isnan(fit.band([1e7])[0]) and "+- ?" in fit.formula()
    clamped = fit_power_law([1e3, 2e3, 3e3, 4e3], [3.0, 2.0, 1.0, 0.1])  # would need E < 0
    assert clamped.E == 0.0 and "E is at its bound 0" in clamped.warnings[0] and clamped.free == ("b", "beta")
    assert math.isfinite(clamped.band([5e3])[0])

    run_dir = synthetic_run(tmp_path / "run", fork_steps=(200, 400, 800))
    assert cli_main(["report", "--run", str(run_dir)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "warning: degenerate fit: 3 points for 3 free parameters" in text
    assert "is projected to reach" in text and "+- ? (gain" in text


def test_fork_evals_are_tabled_and_plotted(tmp_path, capsys):
    run_dir = synthetic_run(tmp_path / "run", evals=lambda s: {"tiny_task": {"acc": s / 4000}, "note": "x"})
    assert cli_main(["report", "--run", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "tiny_task/acc" in text and "0.05" in text and "0.4" in text and "note" not in text
    *_, fig = projection_and_figure(run_dir)
    ax_evals = fig.axes[2]
    (line,) = ax_evals.get_lines()
    assert line.get_label() == "tiny_task/acc" and list(line.get_ydata()) == [0.05, 0.1, 0.2, 0.4]


def test_report_says_when_there_are_too_few_points(tmp_path, capsys):
    run_dir = synthetic_run(tmp_path / "run", fork_steps=(200, 400))
    assert cli_main(["report", "--run", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "only 2 cooldown result(s)" in text and "needs 3" in text and "projected gain" not in text
    assert (run_dir / "report.png").is_file()
    report = load_run(run_dir)
    assert [c.pinned_by for c in report.checkpoints] == [[], ["fork.test"], []]


def test_report_bad_inputs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in [
        (["--run", str(tmp_path / "missing")], "no such run directory"),
        (["--run", str(empty)], "nothing to report"),
        (["--run", str(empty), "--out", "x.jpg"], "must be a .png"),
        (["--run", str(empty), "--extra-tokens", "0"], "--extra-tokens: must be > 0"),
    ]:
        assert cli_main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert parse_cooldown_name("from_000001000_1-sqrt_200") == (1000, "1-sqrt", 200)
    assert parse_cooldown_name("from_x_linear_1") is None


def test_a_fork_whose_eval_hook_failed_or_that_the_forker_gave_up_on_is_failed_not_running(tmp_path, capsys):
    run_dir = synthetic_run(tmp_path / "run", fork_steps=(200, 400, 800))
    for step, c in ((1000, 200), (1200, 240), (1400, 280)):  # each cooled down, with no result.json
        write_jsonl(
            run_dir / "cooldowns" / f"from_{step:09d}_linear_{c}" / "metrics.jsonl",
            [
                {
                    "kind": "train",
                    "step": step + c,
                    "tokens": (step + c) * TOKENS_PER_STEP,
                    "loss": 3.0,
                    "lr": 0.0,
                }
            ],
        )
    hook_failed = run_dir / "cooldowns" / "from_000001000_linear_200"
    (hook_failed / "failed.json").write_text(
        json.dumps({"error": "--eval-cmd: exited with code 3; see eval.log"})
    )
    (run_dir / "forker").mkdir()
    (run_dir / "forker" / "state.json").write_text(
        json.dumps(
            {
                "jobs": [
                    {
                        "name": "from_000001200_linear_240",
                        "status": "failed",
                        "error": "no result after 3 attempts",
                    },
                    {"name": "from_000001400_linear_280", "status": "running"},
                ]
            }
        )
    )
    assert cli_main(["report", "--run", str(run_dir), "--out", str(tmp_path / "r.png")]) == 0
    text = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert "failed" in rows["1000"] and "failed" in rows["1200"] and "running" in rows["1400"]
    assert "failed: from_000001000_linear_200: --eval-cmd: exited with code 3; see eval.log" in text
    assert "failed: from_000001200_linear_240: no result after 3 attempts" in text
    assert "fit (3 linear cooldowns)" in text  # the failed ones are no points of the fit


def test_a_half_written_result_json_is_one_line_and_the_report_stands(tmp_path, capsys):
    from evertrain.launch.runs import read_result

    run_dir = synthetic_run(tmp_path / "run", fork_steps=(200, 400, 800, 1600))
    cut = run_dir / "cooldowns" / "from_000000400_linear_80"
    text = (cut / "result.json").read_text()
    (cut / "result.json").write_text(text[: len(text) // 2])
    assert cli_main(["report", "--run", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"warning: {cut / 'result.json'}: not a cooldown result (half-written?); shown as unfinished"
    )
    assert [c.result is None for c in load_run(run_dir).cooldowns if c.name.startswith("from_000000400")] == [
        True
    ]
    assert read_result(cut) is None  # the forker and `fork` redo it instead of crashing on it


def test_report_marks_the_data_version_of_each_checkpoint_and_when_it_changed(tmp_path, capsys):
    """Data appended while the run trained: the checkpoints table says which version each one trained
    on, a line says from which step each version was read, and the plot marks the change."""
    run_dir = synthetic_run(tmp_path / "run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if r["kind"] == "train":
            r["data_version"] = 1 if r["step"] <= 1850 else 2  # appended shards joined after step 1850
    write_jsonl(run_dir / "metrics.jsonl", records)
    assert cli_main(["report", "--run", str(run_dir)]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("│")[1].strip(): line
        for line in out.splitlines()
        if line.count("│") == 5 and line.split("│")[1].strip() in ("1800", "1900", "2000")
    }
    assert " v1 " in rows["1800"] and " v2 " in rows["1900"] and " v2 " in rows["2000"]
    assert "data: v1 from step 10, v2 from step 1860" in out
    fig = figure(load_run(run_dir), None, None)
    assert any(t.get_text() == "data v2 (step 1860)" for t in fig.axes[0].texts)
