"""What pretrain.py says before any heavy work: `--print-config`, the nearest valid key for a typo,
and the preflight checks that the data dir can serve the config (one line each, exit 2, nothing
written to the run dir)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from evertrain.pretrain.config import ConfigError, load_config
from evertrain.pretrain.run.preflight import preflight

REPO = Path(__file__).resolve().parents[1]


def run_pretrain(argv, capsys) -> tuple[int, str, str]:
    import pretrain

    code = pretrain.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.max_lr=1e-3", "optim.max_lr"),  # the right key in the wrong section
        ("optim.max_rl=1e-3", "optim.max_lr"),  # a typo in the key
        ("optimm.max_lr=1e-3", "optim.max_lr"),  # a typo in the section
        ("model.vocab=512", "model.vocab_size"),
    ],
)
def test_unknown_key_suggests_the_nearest_valid_one(override, suggestion):
    with pytest.raises(ConfigError, match=re.escape(f"unknown key; did you mean {suggestion}?")):
        load_config(None, [override])


def test_unknown_key_without_a_near_one_suggests_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.zzz: unknown key$"):
        load_config(None, ["optim.zzz=1"])
    (tmp_path / "c.yaml").write_text("optim:\n  maxlr: 0.1\n")  # in the file, too
    with pytest.raises(ConfigError, match=re.escape("optim.maxlr: unknown key; did you mean optim.max_lr?")):
        load_config(tmp_path / "c.yaml")


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_pretrain(
        [
            "--config",
            "configs/tiny.yaml",
            "--run",
            str(run_dir),
            "--print-config",
            "optim.max_lr=0.01",
            "--engine",
            "single",
        ],
        capsys,
    )
    assert code == 0 and err == ""
    printed = yaml.safe_load(out)
    assert printed["optim"]["max_lr"] == 0.01 and printed["engine"]["name"] == "single"
    assert (printed["model"]["d_model"], printed["model"]["n_kv_heads"], printed["train"]["log_every"]) == (
        64,
        2,
        5,
    )
    assert not run_dir.exists()
    code, _, err = run_pretrain(["--config", "configs/tiny.yaml", "--print-config", "train.max_lr=1"], capsys)
    assert code == 2 and err == "pretrain.py: error: train.max_lr: unknown key; did you mean optim.max_lr?\n"


def test_a_vocab_smaller_than_the_datas_is_one_line_before_any_work(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_pretrain(
        [
            "--config",
            "configs/tiny.yaml",
            "--run",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=500",
            "engine.name=single",
        ],
        capsys,
    )
    assert code == 2
    assert err == (
        f"pretrain.py: error: model.vocab_size=500 is smaller than the 512-token vocabulary of "
        f"data.path={tiny_data}; set model.vocab_size=512 (or more)\n"
    )
    assert not run_dir.exists()  # nothing started


def test_a_vocab_far_larger_than_the_datas_is_a_warning(tiny_data, capsys):
    cfg = load_config("configs/tiny.yaml", [f"data.path={tiny_data}"])  # vocab 4096 on 512-token data
    assert preflight(cfg, verify_checksums=False).vocab_size == 512
    assert capsys.readouterr().err == (
        f"warning: model.vocab_size=4096, but data.path={tiny_data} has a 512-token "
        "vocabulary: 3584 embedding rows will never see a token\n"
    )
    preflight(cfg, verify_checksums=False, quiet=True)
    assert capsys.readouterr().err == ""
    preflight(
        load_config("configs/tiny.yaml", [f"data.path={tiny_data}", "model.vocab_size=640"]),
        verify_checksums=False,
    )
    assert capsys.readouterr().err == ""  # padding rows are fine


def test_periodic_eval_needs_a_validation_split(tiny_data, tmp_path):
    data = tmp_path / "noval"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["val"] = []
    manifest["history"] = [{**record, "val": 0} for record in manifest["history"]]
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config("configs/tiny.yaml", [f"data.path={data}", "model.vocab_size=512"])
    with pytest.raises(ConfigError, match=r"eval.every_steps=20, but data.path=.* has no validation shards"):
        preflight(cfg, verify_checksums=True)
    preflight(
        load_config("configs/tiny.yaml", [f"data.path={data}", "model.vocab_size=512", "eval.every_steps=0"]),
        verify_checksums=True,
    )


@pytest.mark.parametrize("config", ["1b", "8b"])
def test_big_configs_without_their_data_say_how_to_prepare_it(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here, as on a fresh clone
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    code, _, err = run_pretrain(
        ["--config", f"configs/{config}.yaml", "--run", str(tmp_path / "run")], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert (
        "data.path=data/corpus_32k: no manifest.json there; prepare it first with `evertrain data prepare "
        "--input TEXT... --out data/corpus_32k --vocab-size 32000`" in err
    )


def test_shipped_configs_match_the_vocabulary_of_their_default_data():
    """The Makefile prepares data/shakespeare; every config that defaults to it has its vocabulary."""
    makefile = (REPO / "Makefile").read_text()
    data_dir = re.search(r"^DATA := (\S+)$", makefile, re.M).group(1)
    vocab = int(re.search(r"--out \$\(DATA\) --vocab-size (\d+)", makefile).group(1))
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.data.path == data_dir:
            assert cfg.model.vocab_size == vocab, path


def test_vocab_size_auto_is_the_default_and_reads_the_datas_manifest(tiny_data, tmp_path, capsys):
    assert load_config(None).model.vocab_size == "auto"
    assert load_config(None, ["model.vocab_size=auto"]).model.vocab_size == "auto"
    with pytest.raises(ConfigError, match="model.vocab_size: expected an integer"):
        load_config(None, ["model.vocab_size=big"])
    # a config that does not name the vocabulary trains with the data's (512 here)
    tree = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    del tree["model"]["vocab_size"]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(tree))
    run_dir = tmp_path / "run"
    code, _, err = run_pretrain(
        [
            "--config",
            str(tmp_path / "mine.yaml"),
            "--run",
            str(run_dir),
            f"data.path={tiny_data}",
            "train.max_steps=1",
            "eval.every_steps=0",
            "--engine",
            "single",
        ],
        capsys,
    )
    assert code == 0 and "warning" not in err, err
    assert load_config(run_dir / "config.yaml").model.vocab_size == 512  # the run's config holds the number
    # as an override, and without data to read it from: one line
    code, _, err = run_pretrain(
        [
            "--config",
            "configs/tiny.yaml",
            "--run",
            str(tmp_path / "r2"),
            "model.vocab_size=auto",
            f"data.path={tmp_path / 'none'}",
            "--engine",
            "single",
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and "no manifest.json there" in err and "--vocab-size N" in err
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("override", ["optim.lr=1e-3", "train.lr=1e-3", "optim.learning_rate=1e-3"])
def test_a_learning_rate_under_another_name_suggests_max_lr(override):
    with pytest.raises(ConfigError, match=re.escape("unknown key; did you mean optim.max_lr?")):
        load_config(None, [override])


def test_a_misspelt_section_is_offered_a_section_not_a_key(tmp_path):
    (tmp_path / "c.yaml").write_text("trainer:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"^trainer: unknown section; did you mean train\?$"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("zzz:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"^zzz: unknown section \(sections: model, data, "):
        load_config(tmp_path / "c.yaml")


def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\n n_layers: 2\n")  # one space short on line 3
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: not valid YAML: line 3, column 2: expected <block end>")
