"""`evertrain report` on a synthetic run: the tables, the PNG, the scaling-law fit and its projection,
and the clear messages for too few points and bad arguments."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from evertrain.launch.cli import main as cli_main
from evertrain.launch.report import fit_power_law, load_run, parse_cooldown_name
from evertrain.pretrain.checkpoint.retention import pin

TOKENS_PER_STEP = 1000


def law(tokens):
    return 1.5 + 40.0 * np.power(np.asarray(tokens, dtype=np.float64), -0.35)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def synthetic_run(run_dir: Path, fork_steps=(200, 400, 800, 1600), last_step=2000) -> Path:
    """A main run of `last_step` steps and linear cooldowns (C = 20% of S) whose val loss follows `law`."""
    tokens = [s * TOKENS_PER_STEP for s in range(10, last_step + 1, 10)]
    write_jsonl(run_dir / "metrics.jsonl",
                [{"kind": "train", "step": d // TOKENS_PER_STEP, "tokens": d, "loss": float(law(d)) + 0.3,
                  "lr": 1e-3 / math.sqrt(d), "grad_norm": 1.0, "tokens_per_s": 1.0, "time": 0.0} for d in tokens]
                + [{"kind": "eval", "step": d // TOKENS_PER_STEP, "tokens": d, "val_loss": float(law(d)) + 0.35}
                   for d in tokens[9::10]])
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
        write_jsonl(out / "metrics.jsonl", [{"kind": "train", "step": t, "tokens": t * TOKENS_PER_STEP,
                                             "loss": float(law(end)) + 0.3 * (1 - x), "lr": 1e-4 * (1 - x)}
                                            for t, x in progress])
        val = float(law(end))
        (out / "result.json").write_text(json.dumps({"from_step": s, "cooldown_steps": c, "shape": "linear",
                                                     "tokens": end, "val_loss": val, "val_ppl": math.exp(val)}))
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
    assert "fit (4 linear cooldowns)" in text and "projected gain" in text
    projected = float(law(2e6) - law(4e6))  # doubling the 2M tokens so far
    gain = float(text.split("projected gain of ")[1].split()[0])
    assert gain == pytest.approx(projected, abs=2e-3)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert f"plot: {out}" in text.replace("\n", "")

    assert cli_main(["report", "--run", str(run_dir), "--extra-tokens", "1e6", "--out", str(out)]) == 0
    gain = float(capsys.readouterr().out.split("projected gain of ")[1].split()[0])
    assert gain == pytest.approx(float(law(2e6) - law(3e6)), abs=2e-3)


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
    for argv, message in [(["--run", str(tmp_path / "missing")], "no such run directory"),
                          (["--run", str(empty)], "nothing to report"),
                          (["--run", str(empty), "--out", "x.jpg"], "must be a .png"),
                          (["--run", str(empty), "--extra-tokens", "0"], "--extra-tokens: must be > 0")]:
        assert cli_main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert parse_cooldown_name("from_000001000_1-sqrt_200") == (1000, "1-sqrt", 200)
    assert parse_cooldown_name("from_x_linear_1") is None
