"""Config: YAML + dotted overrides, and one clear error naming the key for every kind of bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from evertrain.pretrain.config import ConfigError, config_hash, dump_yaml, from_dict, load_config, model_hash

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\n  n_heads: 4\noptim:\n  max_lr: 0.003\n")
    cfg = load_config(
        path,
        ["optim.max_lr=1e-2", "optim.betas=[0.8,0.9]", "train.max_steps=20", "optim.rsqrt_timescale=null"],
    )
    assert cfg.model.d_model == 64 and cfg.optim.max_lr == 1e-2
    assert cfg.optim.betas == (0.8, 0.9) and cfg.train.max_steps == 20
    assert cfg.optim.rsqrt_timescale is None


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.n_layers=3", "optim.decay=cosine", "optim.horizon=500"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg and config_hash(again) == config_hash(cfg)


def test_model_hash_tracks_shape_only():
    a = load_config(None, [])
    b = load_config(None, ["optim.max_lr=0.5"])
    c = load_config(None, ["model.d_model=256"])
    assert model_hash(a) == model_hash(b) != model_hash(c)


@pytest.mark.parametrize(
    "override, key",
    [
        (["model.bogus=1"], "model.bogus"),
        (["nosection.x=1"], "nosection.x"),
        (["model.d_model=abc"], "model.d_model"),
        (["model.d_model=1.5"], "model.d_model"),
        (["optim.max_lr=-1"], "optim.max_lr"),
        (["optim.max_lr=.nan"], "optim.max_lr"),
        (["model.n_heads=3"], "model.n_heads"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
        (["optim.betas=[0.9,1.0]"], "optim.betas[1]"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["optim.decay=cosine"], "optim.horizon"),
        (["data.prefetch=-1"], "data.prefetch"),
        (["optim.decay=exp"], "optim.decay"),
        (["engine.zero_stage=4"], "engine.zero_stage"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["tie_embeddings"], "tie_embeddings"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert str(info.value).startswith(key)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="^model: expected a mapping"):
        from_dict({"model": 3})


def test_shipped_configs_are_valid():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths, "configs/*.yaml missing"
    for path in paths:
        load_config(path)


def test_pretrain_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "pretrain.py"),
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--run-dir",
            str(tmp_path / "r"),
            "model.n_heads=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert len(lines) == 1 and "model.n_heads" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()
