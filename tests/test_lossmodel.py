"""The loss model (evertrain/launch/lossmodel/): on a synthetic run whose every logged loss follows a
known L = L0 + A * S1^-alpha - C * S2, the fit recovers the parameters and `evertrain predict` an unseen
cooldown; the stop rule stops at the step a hand calculation gives; the trainer honours RUN/STOP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evertrain.launch.cli import main as cli_main
from evertrain.launch.lossmodel.areas import DECAY, areas, branch_lrs
from evertrain.launch.lossmodel.decision import Rule, evaluate
from evertrain.launch.lossmodel.fit import NAMES, LossModelFit, fit_loss_model
from evertrain.launch.lossmodel.observations import LossModelError, load_observations
from evertrain.launch.lossmodel.predict import predict_cooldown
from evertrain.pretrain.config import dump_yaml, load_config

REPO = Path(__file__).resolve().parents[1]
TRUE = dict(L0=2.0, A=3.0, alpha=0.4, C=0.002, delta=0.05)
TOKENS_PER_STEP = 512
LOG_EVERY = 5


def true_law(s1, s2):
    return TRUE["L0"] + TRUE["A"] * np.power(s1, -TRUE["alpha"]) - TRUE["C"] * np.asarray(s2)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_rows(lrs, peak, first, last, noise, rng, decay=DECAY):
    """Train records every LOG_EVERY steps of (first, last]: the law's mean over each window, plus noise."""
    a = areas(lrs, peak, decay)
    rows = []
    for end in range(first + LOG_EVERY, last + 1, LOG_EVERY):
        window = slice(end - LOG_EVERY, end)
        loss = float(np.mean(true_law(a.s1[window], a.s2[window]))) + rng.normal(0.0, noise)
        rows.append(
            {
                "kind": "train",
                "step": end,
                "tokens": end * TOKENS_PER_STEP,
                "loss": loss,
                "lr": float(lrs[end - 1]),
                "tokens_per_s": 1000.0,
            }
        )
    return rows


def synthetic_run(
    run_dir: Path,
    last=400,
    forks=((100, 20), (200, 40), (300, 60)),
    noise=0.0,
    seed=0,
    overrides=(),
    decay=DECAY,
) -> Path:
    """A main run (tiny config's schedule) to `last` and linear cooldowns whose losses follow TRUE,
    with annealing areas of momentum `decay`."""
    rng = np.random.default_rng(seed)
    cfg = load_config(REPO / "configs" / "tiny.yaml", list(overrides))
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    peak = cfg.optim.max_lr
    lrs = branch_lrs(cfg.optim, last)
    a = areas(lrs, peak, decay)
    evals = [
        {
            "kind": "eval",
            "step": s,
            "tokens": s * TOKENS_PER_STEP,
            "val_loss": float(true_law(a.s1[s - 1], a.s2[s - 1])) + TRUE["delta"] + rng.normal(0.0, noise),
        }
        for s in range(50, last + 1, 50)
    ]
    write_jsonl(run_dir / "metrics.jsonl", train_rows(lrs, peak, 0, last, noise, rng, decay) + evals)
    for step, c in forks:
        out = run_dir / "cooldowns" / f"from_{step:09d}_linear_{c}"
        branch = branch_lrs(cfg.optim, step + c, (step, c, "linear"))
        write_jsonl(out / "metrics.jsonl", train_rows(branch, peak, step, step + c, noise, rng, decay))
        b = areas(branch, peak, decay)
        val = float(true_law(b.s1[-1], b.s2[-1])) + TRUE["delta"] + rng.normal(0.0, noise)
        (out / "result.json").write_text(
            json.dumps(
                {
                    "from_step": step,
                    "cooldown_steps": c,
                    "shape": "linear",
                    "tokens": (step + c) * TOKENS_PER_STEP,
                    "val_loss": val,
                    "val_ppl": float(np.exp(val)),
                }
            )
        )
    return run_dir


def true_val(run_dir: Path, step: int, c: int, decay=DECAY) -> float:
    cfg = load_config(run_dir / "config.yaml")
    b = areas(branch_lrs(cfg.optim, step + c, (step, c, "linear")), cfg.optim.max_lr, decay)
    return float(true_law(b.s1[-1], b.s2[-1])) + TRUE["delta"]


def test_areas_follow_their_definition():
    lrs = np.array([0.5, 1.0, 1.0, 0.5, 0.0])  # a rise (no annealing), then two drops of 0.5
    a = areas(lrs, peak_lr=1.0, decay=0.5)
    assert a.s1.tolist() == [0.5, 1.5, 2.5, 3.0, 3.0]
    # m = 0, 0, 0, 0.5, 0.5 * 0.5 + 0.5 = 0.75; S2 = cumulative sum
    assert a.s2.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.25])


def test_fit_recovers_the_parameters_of_a_known_law(tmp_path):
    obs = load_observations(synthetic_run(tmp_path / "run"), skip_steps=40)
    fit = fit_loss_model(obs, train_curves=True)  # train windows and val losses: delta is their gap
    for name in NAMES:
        assert fit[name] == pytest.approx(TRUE[name], rel=1e-3, abs=1e-5), name
    val_only = fit_loss_model(obs)  # 11 val losses: fitted alone, the offset folds into L0
    assert not val_only.train_curves and val_only["delta"] == 0.0
    assert val_only["L0"] == pytest.approx(TRUE["L0"] + TRUE["delta"], rel=1e-3)
    for name in ("A", "alpha", "C"):
        assert val_only[name] == pytest.approx(TRUE[name], rel=2e-3), name


def test_noisy_fit_predicts_an_unseen_cooldown_within_its_interval(tmp_path, capsys):
    run_dir = synthetic_run(tmp_path / "run", noise=0.01, seed=3)
    fit = fit_loss_model(load_observations(run_dir), train_curves=True)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=4 * fit.stderr("alpha") + 0.02)
    assert fit.sigma_train == pytest.approx(0.01, rel=0.3)
    assert cli_main(["predict", "--run", str(run_dir), "--step", "350", "--cooldown-steps", "70"]) == 0
    text = capsys.readouterr().out
    value = float(text.split("over 70 steps")[1].split("): ")[1].split()[0])
    half = float(text.split("+- ")[-1].split()[0])
    assert abs(value - true_val(run_dir, 350, 70)) <= half and half < 0.1, text
    # --at-tokens: 50 steps of tokens later than step 300 is the same cooldown
    assert (
        cli_main(
            [
                "predict",
                "--run",
                str(run_dir),
                "--step",
                "300",
                "--at-tokens",
                str(50 * TOKENS_PER_STEP),
                "--cooldown-steps",
                "70",
            ]
        )
        == 0
    )
    assert f"{value:.4f} +- {half:.4f}" in capsys.readouterr().out


def test_fit_finds_the_momentum_of_a_run_whose_annealing_acts_fast(tmp_path):
    # lambda = 0.9: an LR drop's benefit arrives within ~10 steps (not 0.999's ~1000). A fit held to
    # 0.999 puts the cooldowns' benefit on the wrong steps and misses the unseen cooldown by ~0.02.
    TRUE["C"], saved = 0.03, TRUE["C"]
    try:
        run_dir = synthetic_run(tmp_path / "run", noise=0.002, seed=5, decay=0.9)
        obs = load_observations(run_dir)
        fit = fit_loss_model(obs, train_curves=True)
        assert fit.decay == 0.9
        assert fit["C"] == pytest.approx(TRUE["C"], rel=0.1)
        unseen = predict_cooldown(obs, fit, 350, 70, "linear")
        error = unseen["predicted"] - true_val(run_dir, 350, 70, decay=0.9)
        assert abs(error) <= min(unseen["interval"], 0.01), unseen
        assert unseen["fit"]["decay"] == 0.9  # prediction.json says which lambda it used
    finally:
        TRUE["C"] = saved


def test_the_interval_holds_every_plausible_lambdas_forecast(tmp_path):
    # noisy curves leave several lambdas about as likely: the forecast keeps the most likely one's value
    # and widens its interval to hold the others' intervals (their disagreement is uncertainty too)
    obs = load_observations(synthetic_run(tmp_path / "run", noise=0.02, seed=4))
    fit = fit_loss_model(obs)
    assert fit.plausible and all(f.decay != fit.decay for f in fit.plausible)
    cooldown = (obs.areas_of(420, (350, 70, "linear")), 420)
    value, half = fit.val_loss(*cooldown)
    own = fit.val_loss_at_own_decay(*cooldown)
    assert value == own[0]
    for other in fit.plausible:
        v, h = other.val_loss_at_own_decay(*cooldown)
        assert value - half <= v - h + 1e-12 and v + h <= value + half + 1e-12
    assert half > own[1]  # here the other lambdas reach beyond the most likely one's own interval
    now, on = (obs.areas_of(420, (350, 70, "linear")), 420), (obs.areas_of(480, (400, 80, "linear")), 480)
    gain, band = fit.difference(now, on)
    for other in fit.plausible:
        g, b = other.difference_at_own_decay(now, on)
        assert gain - band <= g - b + 1e-12 and g + b <= gain + band + 1e-12


def test_predict_needs_val_losses_and_names_the_problem(tmp_path, capsys):
    run_dir = synthetic_run(tmp_path / "run", forks=())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(line for line in lines if '"eval"' not in line) + "\n")
    assert cli_main(["predict", "--run", str(run_dir), "--cooldown-fraction", "0.2"]) == 2
    assert "0 validation loss(es) to fit against" in capsys.readouterr().err
    with pytest.raises(LossModelError, match="not a run directory"):
        load_observations(tmp_path / "nothing")


def test_an_eval_after_the_last_logged_train_window_is_fitted(tmp_path):
    """train.log_every need not divide eval.every_steps: the newest eval may come after the newest train
    record (the branch's areas once ended at the train record, and the fit crashed on the eval)."""
    run_dir = synthetic_run(tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if not ('"train"' in line and json.loads(line)["step"] > 390)]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    obs = load_observations(run_dir, until_step=400)
    assert obs.last_step < 400 and obs.branches[0].val[-1][0] == 400
    fit = fit_loss_model(obs, train_curves=True)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-3)


def test_a_backtest_before_the_first_eval_names_the_missing_val_losses(tmp_path):
    """bench/backtest.py reads the run as it was at each fork step, the first of which may come before
    the first eval: no val loss is no fit, said in words (it once crashed on the empty list of evals)."""
    run_dir = synthetic_run(tmp_path / "run")  # evals from step 50 on
    obs = load_observations(run_dir, until_step=45)
    assert obs.last_step == 45 and obs.branches[0].val == []
    with pytest.raises(LossModelError, match="0 validation loss"):
        fit_loss_model(obs)


def test_a_run_that_never_annealed_predicts_no_cooldown(tmp_path, capsys):
    """Constant LR, no cooldown finished: S2 = 0 at every point, so nothing constrains C. The fit pins it
    to 0 and says so, and a cooldown's prediction is refused (an unconstrained C once predicted -31718)."""
    run_dir = synthetic_run(
        tmp_path / "run", forks=(), noise=0.01, overrides=["optim.decay=constant", "optim.warmup_steps=10"]
    )
    obs = load_observations(run_dir)
    fit = fit_loss_model(obs)
    assert not fit.annealing_seen and fit["C"] == 0.0 and fit.stderr("C") == 0.0
    assert any("no annealing" in w for w in fit.warnings)
    with pytest.raises(LossModelError, match="no annealing yet"):
        predict_cooldown(obs, fit, 300, 60, "linear")
    assert cli_main(["predict", "--run", str(run_dir), "--step", "300", "--cooldown-steps", "60"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finish one cooldown first" in err
    # one finished cooldown is annealing seen: C is fitted and cooldowns are predicted again
    rerun = synthetic_run(
        tmp_path / "rerun", forks=((200, 40),), overrides=["optim.decay=constant", "optim.warmup_steps=10"]
    )
    obs = load_observations(rerun)
    fit = fit_loss_model(obs)
    assert fit.annealing_seen and fit["C"] == pytest.approx(TRUE["C"], rel=0.05)
    assert predict_cooldown(obs, fit, 300, 60, "linear")["predicted"] == pytest.approx(
        true_val(rerun, 300, 60), abs=0.01
    )


def exact_fit() -> LossModelFit:
    """The true law as a fit with no uncertainty: the rule's arithmetic alone."""
    return LossModelFit(np.array([TRUE[n] for n in NAMES]), np.zeros((5, 5)), 0.0, 0.0, 100, 10)


def test_rule_stops_at_the_step_a_hand_calculation_gives(tmp_path):
    # constant LR, no warmup: S1 = s exactly; a linear cooldown of c steps from it adds sum(1 - k/c, k=1..c)
    # = (c - 1) / 2 to S1. With C = 0, the loss of cooling down at s is L0 + A * (s + (c - 1)/2)^-alpha.
    TRUE["C"], saved = 0.0, TRUE["C"]
    try:
        run_dir = synthetic_run(
            tmp_path / "run", forks=(), overrides=["optim.decay=constant", "optim.warmup_steps=0"]
        )
        obs = load_observations(run_dir)
        tps, stride, f = 1000.0, 20, 0.1

        def hand(s):  # nats per hour of training `stride` more steps
            c0, c1 = round(f * s), round(f * (s + stride))
            gain = TRUE["A"] * (
                (s + (c0 - 1) / 2) ** -TRUE["alpha"] - (s + stride + (c1 - 1) / 2) ** -TRUE["alpha"]
            )
            return gain / ((stride + c1 - c0) * TOKENS_PER_STEP / tps / 3600)

        steps = list(range(20, 2001, 20))
        threshold = (hand(600) + hand(620)) / 2  # falls below between 600 and 620
        expected = next(s for s in steps if hand(s) < threshold)
        assert expected == 620
        rule = Rule(min_gain_per_hour=threshold, cooldown_fraction=f, stride=stride)
        verdicts = {s: evaluate(obs, exact_fit(), rule, s, tps) for s in (600, 620)}
        assert verdicts[600]["verdict"] == "continue" and verdicts[620]["verdict"] == "stop"
        assert verdicts[620]["gain_per_hour"] == pytest.approx(hand(620), rel=1e-6)
        final = verdicts[620]["final"]
        assert final["step"] == 620 and 1 <= final["cooldown_steps"] <= 310
        # a token budget: stop before training on 20 steps and cooling down 10% would pass it
        budget = Rule(budget_tokens=700 * TOKENS_PER_STEP, cooldown_fraction=f, stride=stride)
        stops = [s for s in steps if evaluate(obs, exact_fit(), budget, s, tps)["verdict"] == "stop"]
        assert stops[0] == 620  # (620 + 20) * 1.1 = 704 > 700, (600 + 20) * 1.1 = 682 <= 700
        assert evaluate(obs, exact_fit(), budget, 620, tps)["final"]["cooldown_steps"] <= 700 - 620
    finally:
        TRUE["C"] = saved


# -- the real thing: trainer, forker, final cooldown ---------------------------------------------


def test_trainer_stops_at_the_checkpoint_after_a_stop_request(tiny_data, tmp_path):
    from conftest import pretrain_tiny

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").write_text("stop\n")
    common = [
        f"data.path={tiny_data}",
        "model.vocab_size=512",
        "train.micro_batch_size=4",
        "train.log_every=5",
        "eval.every_steps=0",
        "checkpoint.every_steps=10",
        "engine.name=single",
    ]
    assert pretrain_tiny(run_dir, *common, "train.max_steps=200") == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 10 and (run_dir / "checkpoints" / "step_000000010").is_dir()
    assert not (run_dir / "STOP").exists()  # met: removed, so a resume runs on
    assert pretrain_tiny(run_dir, *common, "train.max_steps=30") == 0
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 30


BUDGET_STEPS = 600


@pytest.mark.slow
def test_forker_decides_once_launches_the_final_cooldown_and_stops_the_main_run(tiny_data, tmp_path):
    """configs/tiny trains with no step limit; the forker forks every 100th checkpoint under a token budget
    with --stop-main: it decides stop once the budget says so, the trainer stops at a checkpoint, the final
    cooldown runs once (result.json final), and a restarted forker neither decides nor launches again."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    tps = 4 * 64  # tokens per step: micro_batch_size 4, seq_len 64
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    trainer = subprocess.Popen(
        [
            sys.executable,
            "pretrain.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            "train.max_steps=5000",
            "train.log_every=5",
            "eval.every_steps=20",
            "eval.batches=1",
            "checkpoint.every_steps=20",
            "checkpoint.keep_last=2",
            "checkpoint.keep_every=100",
            "engine.name=single",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    forker = [
        sys.executable,
        "-m",
        "evertrain.launch.cli",
        "forker",
        "--run",
        str(run_dir),
        "--every",
        "100",
        "--max-queued",
        "1",
        "--cooldown-fraction",
        "0.1",
        "--shape",
        "linear",
        "--pool",
        "local:1",
        "--poll-s",
        "0.5",
        "--eval-batches",
        "1",
        "--budget-tokens",
        str(BUDGET_STEPS * tps),
        "--stop-main",
        "--max-retries",
        "0",
    ]
    try:
        first = subprocess.run(forker, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert trainer.wait(timeout=300) == 0, trainer.stderr.read()[-2000:]
    finally:
        trainer.kill()
    lines = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    assert [line["verdict"] for line in lines].count("stop") == 1 and lines[-1]["verdict"] == "stop"
    stop = lines[-1]
    # the budget rule: training on 100 steps (--every) and cooling down 10% passes the budget (in steps)
    assert (stop["step"] + 100) * 1.1 > BUDGET_STEPS and stop["stop_main"]
    assert all((line["step"] + 100) * 1.1 <= BUDGET_STEPS for line in lines[:-1])
    final = stop["final"]
    assert final["step"] == stop["step"] and final["cooldown_steps"] >= 1
    if final["note"] is None:  # decided in time: the final cooldown ends within the budget
        assert final["step"] + final["cooldown_steps"] <= BUDGET_STEPS
    name = f"from_{final['step']:09d}_linear_{final['cooldown_steps']}"
    result = json.loads((run_dir / "cooldowns" / name / "result.json").read_text())
    assert result["final"] is True and "predicted" in result and "prediction_error" in result
    assert (run_dir / "cooldowns" / name / "prediction.json").is_file()
    assert first.stdout.count(f"launched {name}") == 1
    # the main run stopped at a checkpoint step soon after the request, and removed it
    main_last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert main_last["step"] % 20 == 0 and main_last["step"] < 5000 and not (run_dir / "STOP").exists()
    restarted = subprocess.run(forker, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "launched" not in restarted.stdout and "decision at" not in restarted.stdout
    assert len((run_dir / "decisions.jsonl").read_text().splitlines()) == len(lines)
    assert not (run_dir / "STOP").exists()
    assert cli_main(["report", "--run", str(run_dir)]) == 0


def test_report_tables_predicted_vs_actual_with_mae_and_coverage(tmp_path, capsys):
    run_dir = synthetic_run(tmp_path / "run")
    for name, _predicted, half in (
        ("from_000000100_linear_20", None, 0.05),
        ("from_000000200_linear_40", None, 0.01),
    ):
        out = run_dir / "cooldowns" / name
        actual = json.loads((out / "result.json").read_text())["val_loss"]
        offset = 0.03 if half == 0.05 else 0.02  # inside its interval; outside its interval
        (out / "prediction.json").write_text(json.dumps({"predicted": actual - offset, "interval": half}))
    result = json.loads((run_dir / "cooldowns" / "from_000000300_linear_60" / "result.json").read_text())
    (run_dir / "cooldowns" / "from_000000300_linear_60" / "result.json").write_text(
        json.dumps({**result, "final": True})
    )
    assert cli_main(["report", "--run", str(run_dir), "--out", str(tmp_path / "r.png")]) == 0
    text = capsys.readouterr().out
    assert "predicted vs actual" in text and "300 final" in text
    assert "prediction MAE: 0.0250 nats over 2 fork(s); 1 of 2 inside their 95% intervals" in " ".join(
        text.split()
    )


def test_gain_recovered_by_an_average_is_its_share_of_the_cooldowns_gain():
    from evertrain.launch.free_estimates import recoveries

    averages = [
        {"step": 120, "steps": [40, 60, 80, 100, 120], "val_loss": 3.7, "weighting": "tail"},
        {"step": 100, "steps": [100], "val_loss": 3.0},
    ]
    rows = recoveries({120: 3.8, 100: 3.9}, [("from_000000100_linear_20", 120, 3.6)], averages)
    assert len(rows) == 1 and rows[0].weighting == "tail" and rows[0].k == 5
    assert rows[0].gain == pytest.approx(0.2) and rows[0].fraction == pytest.approx(0.5)


@pytest.mark.slow
def test_two_ranks_stop_together_at_the_checkpoint_after_a_stop_request(tiny_data, tmp_path):
    """DeepSpeed on 2 CPU ranks: the stop vote lands on the checkpoint step (each rank looks for the file
    one step before it), so both ranks stop at step 10 with that checkpoint, and the request is removed."""
    from conftest import launcher, run_ok

    run_dir = tmp_path / "ds"
    run_dir.mkdir()
    (run_dir / "STOP").write_text("stop\n")
    run_ok(
        [
            *launcher("deepspeed", 2),
            "pretrain.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            "train.max_steps=40",
            "train.log_every=5",
            "eval.every_steps=0",
            "checkpoint.every_steps=10",
        ],
        timeout=600,
    )
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 10 and (run_dir / "checkpoints" / "step_000000010").is_dir()
    assert not (run_dir / "STOP").exists()
