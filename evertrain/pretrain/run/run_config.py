"""Which config a start of pretrain.py trains with, and what a resume may change.

    pretrain.py --config C [--run-dir D] [k=v ...]   the file and overrides: a new run, or a resume that
                                                     restates the whole config
    pretrain.py --run D [k=v ...]                    resume D with its own D/config.yaml and overrides

RUN_DIR/config.yaml is the resolved config of the run that started there (pretrain.py writes it once
the start is known good). A resume by run dir may change only what a resume can change (RESUMABLE):
where it stops, how it logs, checkpoints and evaluates, the data dir's location, the engine and the
runtime knobs that leave the parameters as they are. The model's shape never changes in a run dir,
whichever way the run is resumed; a change of anything else (the optimizer, the schedule, the batch)
is a deliberate new config, stated with --config.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from evertrain.pretrain.config import NOT_SHAPE, Config, ConfigError, load_config, model_shape, to_dict

CONFIG_FILE = "config.yaml"

# What `pretrain.py --run D k=v` may change; `section.*` = every key of the section.
RESUMABLE = (
    "train.max_steps",
    "train.log_every",
    "train.peak_tflops",
    "train.compile",
    "train.on_nonfinite",
    "train.device",
    "train.max_nonfinite_steps",
    "train.collective_timeout_s",
    "data.path",
    "data.prefetch",
    "checkpoint.*",
    "eval.*",
    "logging.*",
    "engine.*",
    "optim.impl",
    *(f"model.{name}" for name in sorted(NOT_SHAPE - {"init_from"})),
)


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE)


def previous_config(run_dir: Path) -> Config | None:
    """The config the run in `run_dir` trains with, or None for a new run dir."""
    path = run_dir / CONFIG_FILE
    return load_config(path) if path.is_file() else None


def resume_config(run_dir: Path, previous: Config | None, overrides: list[str]) -> Config:
    """`pretrain.py --run D [k=v ...]`: the run's own config with the overrides a resume may make."""
    if previous is None:
        raise ConfigError(
            f"--run {run_dir}: no {CONFIG_FILE} there, so nothing to resume; a new run needs "
            f"--config, e.g. --config configs/tiny.yaml --run {run_dir}"
        )
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if resumable(key):
            continue
        section, _, name = key.partition(".")
        if section == "model" and name in model_shape(previous):
            raise ConfigError(
                f"{key}: this run's checkpoints hold a model with {key}="
                f"{to_dict(previous)['model'][name]}; a resume cannot change the model's shape "
                "(start a new run in another --run-dir)"
            )
        raise ConfigError(
            f"{key}: a resume by run dir keeps it (it may change {', '.join(RESUMABLE[:9])}, ...); "
            "to change it on purpose, restate the whole config with --config"
        )
    return load_config(run_dir / CONFIG_FILE, overrides)


def changes(old: Config, new: Config) -> list[str]:
    """'section.key: old -> new' for every key whose value differs."""
    a, b = to_dict(old), to_dict(new)
    return [
        f"{section}.{key}: {a[section].get(key)!r} -> {value!r}"
        for section, values in b.items()
        for key, value in values.items()
        if a[section].get(key) != value
    ]


def check_same_model(run_dir: Path, previous: Config | None, cfg: Config) -> None:
    """A run dir belongs to one model: resuming it with another shape is refused up front, naming what differs."""
    if previous is None:
        return
    old, new = model_shape(previous), model_shape(cfg)
    differ = [f"model.{k}={old[k]} there, {new[k]} in this config" for k in new if old.get(k) != new[k]]
    if differ:
        raise ConfigError(
            f"{run_dir / CONFIG_FILE}: this run dir trains another model ({'; '.join(differ)}); "
            "use another --run-dir, or resume this run with `pretrain.py --run "
            f"{run_dir}`"
        )


def trained_on(run_dir: Path, previous: Config | None, cfg: Config) -> str:
    """What a data error adds when this start reads other data than the run trained on: which data that was."""
    if previous is None or previous.data.path == cfg.data.path:
        return ""
    return f"; this run trained on data.path={previous.data.path} ({run_dir / CONFIG_FILE})"
