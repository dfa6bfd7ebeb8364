"""Typed run configuration: YAML file + dotted `key=value` overrides.

Every section is a small dataclass. Unknown keys, wrong types and impossible values raise
`ConfigError` with one line naming the key, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evertrain.errors import EvertrainError


class ConfigError(EvertrainError, ValueError):
    """A config problem; the message names the offending key."""


AUTO = "auto"  # a key whose default is this may be set to it: resolved at start-up (preflight.resolve_auto)


@dataclass
class ModelConfig:
    vocab_size: int | str = AUTO  # auto = the data dir's tokenizer vocabulary (its manifest.json)
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    ffn_hidden: int | None = None  # SwiGLU width; None = multiple_of-rounded 8/3 * d_model
    multiple_of: int = 32
    seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    init_from: str | None = (
        None  # hf:PATH = start from a Hugging Face Llama checkpoint (not part of the shape)
    )
    # Runtime knobs (same parameters, so not part of model_hash); costs in docs/scaling.md.
    activation_checkpointing: str = "none"  # none | full | selective
    activation_checkpointing_every: int = 0  # selective: fully checkpoint every k-th block; 0 = op-level
    loss_chunk_tokens: int = 2048  # head + cross entropy this many positions at a time; 0 = whole batch


# ModelConfig fields that do not change the parameters' shapes: left out of model_hash, so a run
# started from a Hugging Face checkpoint resumes and forks like any other, and a run may resume or
# fork with other runtime knobs (checkpointing, loss chunking).
NOT_SHAPE = frozenset(
    {"init_from", "activation_checkpointing", "activation_checkpointing_every", "loss_chunk_tokens"}
)


@dataclass
class DataConfig:
    path: str = "data/shakespeare"
    prefetch: int = 2  # batches read ahead by a background thread (pinned, copied on a side stream); 0 = none


@dataclass
class OptimConfig:
    max_lr: float = 1e-3
    warmup_steps: int = 100
    decay: str = "rsqrt"  # rsqrt | constant | cosine | linear
    rsqrt_timescale: int | None = None  # tau; None = warmup_steps (max_lr*sqrt(w/step))
    horizon: int | None = None  # total steps, only for the fixed-horizon baselines cosine/linear
    min_lr_ratio: float = 0.0  # floor of the cosine/linear baselines, as a fraction of max_lr
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    impl: str = "auto"  # auto | triton | torch


@dataclass
class TrainConfig:
    micro_batch_size: int = 8  # windows per rank per micro-step
    grad_accum: int = 1  # global batch = micro_batch_size * grad_accum * world_size
    max_steps: int | None = None  # where this process stops; never part of the schedule
    log_every: int = 10
    seed: int = 1234
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast dtype on GPU)
    device: str = "auto"  # auto | cpu | cuda
    peak_tflops: float | None = None  # per device, for MFU; None = by device name (hardware.py), none on CPU
    compile: bool = False  # torch.compile each transformer block
    on_nonfinite: str = "stop"  # stop | skip: a NaN/Inf loss or gradient stops the run, or drops that update
    max_nonfinite_steps: int = 100  # with skip: this many non-finite steps in a row stop the run (exit 2)
    collective_timeout_s: float = 600.0  # seconds a rank waits for the others, then names the missing rank


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # 0 disables periodic checkpoints
    keep_last: int = 3
    keep_every: int = 0  # also keep every k-th step forever; 0 = none
    async_save: bool = True
    stop_budget_s: float = (
        25.0  # on SIGTERM: seconds to finish or abandon the last save (launchers SIGKILL at ~30)
    )
    verify: str = (
        "full"  # on load: full = size + content hash of every file; size = sizes only (no read-back)
    )


@dataclass
class EvalConfig:
    every_steps: int = 100  # 0 disables periodic eval
    batches: int = 8


@dataclass
class EngineConfig:
    name: str = "auto"  # auto | single | deepspeed | fsdp
    zero_stage: int = 2
    deepspeed_config: str | None = None  # optional JSON merged under our generated settings
    replicate: int = 1  # FSDP2: HSDP with this many replica groups, sharded within each (1 = plain FSDP)
    accumulate: str = (
        "auto"  # FSDP2 grads between micro-batches: auto | sharded | unsharded (see docs/scaling.md)
    )


@dataclass
class LoggingConfig:
    """Experiment trackers beside metrics.jsonl (loggers.py); both optional packages, both off by default."""

    # (not off/on: YAML reads those as booleans)
    wandb: str = (
        "disabled"  # disabled | online | offline (offline: files under RUN_DIR/wandb, `wandb sync` later)
    )
    mlflow: str = "disabled"  # disabled | enabled
    mlflow_uri: str | None = (
        None  # None = $MLFLOW_TRACKING_URI, else the SQLite store RUN_DIR/mlflow.db (offline)
    )
    project: str = "evertrain"  # the W&B project / MLflow experiment


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Named here, not in schedule.py, so that commands can offer them without importing torch.
DECAYS = ("rsqrt", "constant", "cosine", "linear")
COOLDOWN_SHAPES = ("linear", "1-sqrt", "cosine")
# every command's default: the shape measured in docs/horizon_sweep.md (its cooldowns end level with or below
# a tuned cosine), and Hägele et al.'s best
DEFAULT_COOLDOWN_SHAPE = "1-sqrt"

_CHOICES = {
    "optim.decay": DECAYS,
    "optim.impl": ("auto", "triton", "torch"),
    "train.dtype": ("float32", "bfloat16", "float16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.on_nonfinite": ("stop", "skip"),
    "engine.name": ("auto", "single", "deepspeed", "fsdp"),
    "logging.wandb": ("disabled", "online", "offline"),
    "logging.mlflow": ("disabled", "enabled"),
    "engine.accumulate": ("auto", "sharded", "unsharded"),
    "model.activation_checkpointing": ("none", "full", "selective"),
    "checkpoint.verify": ("full", "size"),
}


def _coerce(value, tp, key: str):
    """Check/convert a YAML value to the annotated type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            hint = did_you_mean_section(key) if cls is Config else did_you_mean(f"{prefix}{key}")
            raise ConfigError(f"{prefix}{key}: unknown {'section' if cls is Config else 'key'}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if f.default == AUTO and data[f.name] == AUTO:
            kwargs[f.name] = AUTO
        elif dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
    return cls(**kwargs)


def valid_keys() -> list[str]:
    """Every `section.key` a config can set."""
    hints = typing.get_type_hints(Config)
    return [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(hints[section.name])
    ]


# What people coming from other trainers type, and the key that means it here.
ALIASES = {
    "lr": "optim.max_lr",
    "learning_rate": "optim.max_lr",
    "max_learning_rate": "optim.max_lr",
    "warmup": "optim.warmup_steps",
    "batch_size": "train.micro_batch_size",
    "steps": "train.max_steps",
    "clip_grad": "optim.grad_clip",
    "gradient_accumulation_steps": "train.grad_accum",
}


def did_you_mean(key: str) -> str:
    """'; did you mean optim.max_lr?' for a misspelt or misplaced key, else ''."""
    keys = valid_keys()
    section, _, name = key.rpartition(".")
    close = [k for k in keys if k.endswith(f".{name}")]  # the right key in the wrong section
    if not close and name in ALIASES:
        close = [ALIASES[name]]
    if not close:
        names = [k.split(".", 1)[1] for k in keys if k.startswith(f"{section}.")]
        if names:  # a real section: a typo in the key's own name (not matched against other sections)
            close = [f"{section}.{n}" for n in difflib.get_close_matches(name, names, n=1, cutoff=0.6)]
        else:  # a typo in the section's name
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def did_you_mean_section(name: str) -> str:
    """'; did you mean train?' for a misspelt top-level section (a section is never offered a key)."""
    if name in ALIASES:  # `lr: 0.01` at the top level
        return f"; did you mean {ALIASES[name]}?"
    sections = [f.name for f in dataclasses.fields(Config)]
    close = difflib.get_close_matches(name, sections, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f" (sections: {', '.join(sections)})"


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"{item}: override must look like section.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def _apply_override(tree: dict, path: list[str], value, full_key: str) -> None:
    node = tree
    cls = Config
    for part in path[:-1]:
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            raise ConfigError(f"{full_key}: unknown key{did_you_mean(full_key)}")
        cls = hints[part]
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{full_key}: expected a mapping")
    node[path[-1]] = value


def validate(cfg: Config) -> None:
    """Values that type-check but cannot work."""
    m, o, t, c, e = cfg.model, cfg.optim, cfg.train, cfg.checkpoint, cfg.eval
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{section.name}.{f.name}: must be finite, got {v}")
    # auto: checked once resolved
    vocab = [("model.vocab_size", m.vocab_size)] if m.vocab_size != AUTO else []
    for key, value in [
        *vocab,
        ("model.d_model", m.d_model),
        ("model.n_layers", m.n_layers),
        ("model.n_heads", m.n_heads),
        ("model.seq_len", m.seq_len),
        ("model.multiple_of", m.multiple_of),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.grad_accum", t.grad_accum),
        ("train.log_every", t.log_every),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps),
        ("eval.batches", e.batches),
    ]:
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads: {m.n_heads} does not divide model.d_model={m.d_model}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model.n_heads: head dim {m.d_model // m.n_heads} must be even for RoPE")
    if m.n_kv_heads is not None and (m.n_kv_heads <= 0 or m.n_heads % m.n_kv_heads):
        raise ConfigError(
            f"model.n_kv_heads: {m.n_kv_heads} must be > 0 and divide model.n_heads={m.n_heads}"
        )
    if m.ffn_hidden is not None and m.ffn_hidden <= 0:
        raise ConfigError(f"model.ffn_hidden: must be > 0, got {m.ffn_hidden}")
    if m.init_from is not None and not (m.init_from.startswith("hf:") and len(m.init_from) > 3):
        raise ConfigError(
            f"model.init_from: expected hf:PATH (a Hugging Face Llama directory), got {m.init_from!r}"
        )
    if not (m.norm_eps > 0 and m.rope_theta > 0 and m.init_std > 0):
        raise ConfigError("model.norm_eps/rope_theta/init_std: must be > 0")
    if not (math.isfinite(o.max_lr) and o.max_lr > 0):
        raise ConfigError(f"optim.max_lr: must be a finite number > 0, got {o.max_lr}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must be >= 0, got {o.warmup_steps}")
    if o.rsqrt_timescale is not None and o.rsqrt_timescale <= 0:
        raise ConfigError(f"optim.rsqrt_timescale: must be > 0, got {o.rsqrt_timescale}")
    if o.decay == "rsqrt" and o.warmup_steps == 0 and o.rsqrt_timescale is None:
        raise ConfigError(
            "optim.rsqrt_timescale: must be set when optim.warmup_steps is 0 (it defaults to the warmup)"
        )
    if o.decay in ("cosine", "linear"):
        if o.horizon is None or o.horizon <= o.warmup_steps:
            raise ConfigError(
                f"optim.horizon: decay={o.decay} needs a horizon > optim.warmup_steps, got {o.horizon}"
            )
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    for i, b in enumerate(o.betas):
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"optim.betas[{i}]: must be in [0, 1), got {b}")
    if not o.eps > 0:
        raise ConfigError(f"optim.eps: must be > 0, got {o.eps}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip: must be >= 0, got {o.grad_clip}")
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        raise ConfigError(f"train.peak_tflops: must be > 0, got {t.peak_tflops}")
    if not cfg.logging.project:
        raise ConfigError("logging.project: must not be empty")
    if t.max_steps is not None and t.max_steps < 0:
        raise ConfigError(f"train.max_steps: must be >= 0, got {t.max_steps}")
    for key, value in [
        ("checkpoint.every_steps", c.every_steps),
        ("checkpoint.keep_every", c.keep_every),
        ("eval.every_steps", e.every_steps),
    ]:
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if cfg.data.prefetch < 0:
        raise ConfigError(
            f"data.prefetch: must be >= 0 (0 reads in the training thread), got {cfg.data.prefetch}"
        )
    if not cfg.train.collective_timeout_s > 0:
        raise ConfigError(f"train.collective_timeout_s: must be > 0, got {cfg.train.collective_timeout_s}")
    if not c.stop_budget_s > 0:
        raise ConfigError(f"checkpoint.stop_budget_s: must be > 0, got {c.stop_budget_s}")
    if c.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last: must be >= 1, got {c.keep_last}")
    for key, value in [
        ("model.activation_checkpointing_every", m.activation_checkpointing_every),
        ("model.loss_chunk_tokens", m.loss_chunk_tokens),
    ]:
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if cfg.engine.replicate < 1:
        raise ConfigError(f"engine.replicate: must be >= 1, got {cfg.engine.replicate}")
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage: must be 0, 1, 2 or 3, got {cfg.engine.zero_stage}")
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {'|'.join(allowed)}, got {value!r}")


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data or {}, "")
    validate(cfg)
    return cfg


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is (line and column from 1), on one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or exc.__class__.__name__
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML at `path` (None = defaults), apply `a.b=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        keys, value = _parse_override(item)
        _apply_override(tree, keys, value, ".".join(keys))
    return from_dict(tree)


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def model_shape(cfg: Config) -> dict:
    """The model fields that fix the parameters (all but NOT_SHAPE)."""
    return {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in NOT_SHAPE}


def model_hash(cfg: Config) -> str:
    """Identifies the parameter shapes: checkpoints refuse to load into a different model."""
    blob = json.dumps(model_shape(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_hash(cfg: Config) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
