"""Which config pretrain.py trains with: `--run D` alone resumes with the run's own config.yaml (overrides
only where a resume may change them, and a printed diff), a refused start leaves no config.yaml behind,
and the errors name what differs: the model's fields, the data the run trained on."""

from __future__ import annotations

from pathlib import Path

import pytest

from evertrain.pretrain.config import ConfigError, load_config
from evertrain.pretrain.observe import metrics

from conftest import load_pretrain

REPO = Path(__file__).resolve().parents[1]


def start(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--run-dir",
        str(run_dir),
        f"data.path={data}",
        "model.vocab_size=512",
        "model.d_model=64",
        "train.max_steps=2",
        "eval.every_steps=0",
        "train.device=cpu",
        "--engine",
        "single",
        *extra,
    ]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pretrain.py: error: "), err
    return err


def test_resume_by_run_dir_uses_its_config_yaml_and_allows_only_what_a_resume_may_change(
    tiny_data, tmp_path, capsys
):
    pretrain, run_dir = load_pretrain(), tmp_path / "run"
    assert pretrain.main(start(tiny_data, run_dir, "checkpoint.every_steps=2")) == 0
    capsys.readouterr()

    assert pretrain.main(["--run", str(run_dir), "train.max_steps=4", "logging.project=p2"]) == 0
    out = capsys.readouterr().out
    assert (
        f"pretrain.py: resuming {run_dir}; changed since its config.yaml: train.max_steps: 2 -> 4, "
        "logging.project: 'evertrain' -> 'p2'"
    ) in out
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000000004"
    written = load_config(run_dir / "config.yaml")
    assert (
        written.train.max_steps == 4 and written.model.d_model == 64 and written.data.path == str(tiny_data)
    )

    assert pretrain.main(["--run-dir", str(run_dir), "--print-config", "checkpoint.keep_last=7"]) == 0
    assert "keep_last: 7" in capsys.readouterr().out

    for override, message in [
        (
            "model.d_model=128",
            (
                "model.d_model: this run's checkpoints hold a model with "
                "model.d_model=64; a resume cannot change the model's shape"
            ),
        ),
        ("optim.max_lr=0.5", "optim.max_lr: a resume by run dir keeps it"),
        ("train.micro_batch_size=2", "train.micro_batch_size: a resume by run dir keeps it"),
    ]:
        assert pretrain.main(["--run", str(run_dir), override]) == 2
        assert message in one_error_line(capsys)
    assert load_config(run_dir / "config.yaml") == written  # a refused resume leaves it as it was

    assert pretrain.main(["--run", str(tmp_path / "new")]) == 2
    assert "no config.yaml there, so nothing to resume; a new run needs --config" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_a_data_error_names_the_data_the_run_trained_on(tiny_data, tmp_path, capsys):
    pretrain, run_dir = load_pretrain(), tmp_path / "run"
    assert pretrain.main(start(tiny_data, run_dir)) == 0
    capsys.readouterr()
    args = start(tmp_path / "nowhere", run_dir, "train.max_steps=3")
    assert pretrain.main(args) == 2
    err = one_error_line(capsys)
    assert "no manifest.json there" in err
    assert f"this run trained on data.path={tiny_data} ({run_dir / 'config.yaml'})" in err


def test_a_start_refused_late_leaves_no_config_and_the_corrected_rerun_starts(
    tiny_data, tmp_path, capsys, monkeypatch
):
    pretrain, run_dir = load_pretrain(), tmp_path / "run"
    # a tracker asked for but not installed: refused before the run dir is touched
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)
    assert pretrain.main(start(tiny_data, run_dir, "logging.mlflow=enabled")) == 2
    assert "logging.mlflow: the mlflow package is not installed" in one_error_line(capsys)
    assert not (run_dir / "config.yaml").exists()

    # a tracker that fails as it opens, after the checkpoint and data checks: a refused start all the same
    def refusing_sinks(cfg, run_dir):
        raise ConfigError("logging.mlflow_uri: cannot reach the tracking server")

    with monkeypatch.context() as patch:
        patch.setattr(metrics, "open_sinks", refusing_sinks)
        assert pretrain.main(start(tiny_data, run_dir)) == 2
    assert "cannot reach the tracking server" in one_error_line(capsys)
    assert not (run_dir / "config.yaml").exists()

    assert pretrain.main(start(tiny_data, run_dir, "model.d_model=32")) == 0  # another model: a new run still
    assert load_config(run_dir / "config.yaml").model.d_model == 32


def test_another_model_in_a_run_dir_is_refused_naming_the_fields(tiny_data, tmp_path, capsys):
    pretrain, run_dir = load_pretrain(), tmp_path / "run"
    assert pretrain.main(start(tiny_data, run_dir)) == 0
    capsys.readouterr()
    assert pretrain.main(start(tiny_data, run_dir, "model.d_model=128", "model.n_layers=3")) == 2
    err = one_error_line(capsys)
    assert (
        "this run dir trains another model (model.d_model=64 there, 128 in this config; model.n_layers=2 "
        "there, 3 in this config); use another --run-dir"
    ) in err


@pytest.mark.slow
def test_resume_by_run_dir_under_torchrun(tiny_data, tmp_path):
    """`torchrun ... pretrain.py --run-dir D k=v`: the run's own config on every rank, the diff said once."""
    from conftest import launcher, run_ok

    run_dir = tmp_path / "run"
    run_ok(
        [
            *launcher("fsdp", 2),
            "pretrain.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            "train.max_steps=2",
            "eval.every_steps=0",
            "--engine",
            "fsdp",
        ],
        timeout=600,
    )
    proc = run_ok(
        [*launcher("fsdp", 2), "pretrain.py", "--run-dir", str(run_dir), "train.max_steps=4"], timeout=600
    )
    assert (
        proc.stdout.count(
            f"pretrain.py: resuming {run_dir}; changed since its config.yaml: train.max_steps: 2 -> 4"
        )
        == 1
    )
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000000004"
    assert load_config(run_dir / "config.yaml").train.max_steps == 4
