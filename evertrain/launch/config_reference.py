"""docs/config.md, generated from the config dataclasses: every key with its type, default and one line of
meaning. The meaning is the field's own comment in config.py, unless MEANINGS has one: for the fields
with no comment, or one that only lists the choices (shown in the type column).

    python -m evertrain.launch.config_reference > docs/config.md

tests/test_docs.py fails when docs/config.md is not what this prints, and when a key has no meaning.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
import typing

from evertrain.pretrain import config

# One line each for the fields whose comment in config.py is missing or only lists the choices.
MEANINGS = {
    "model.vocab_size": "embedding rows; auto: the data dir's vocabulary (its manifest says it), else a number at least that",
    "model.d_model": "width of the residual stream",
    "model.n_layers": "transformer blocks",
    "model.n_heads": "attention heads; must divide d_model, with an even head dim (RoPE)",
    "model.multiple_of": "the default ffn_hidden is rounded up to a multiple of this",
    "model.seq_len": "tokens per training window (and the RoPE length)",
    "model.rope_theta": "RoPE base frequency",
    "model.norm_eps": "RMSNorm epsilon",
    "model.tie_embeddings": "the output head shares the input embedding's weights",
    "model.init_std": "standard deviation of the initial weights (residual projections scaled down by depth)",
    "data.path": "the data dir (made by `evertrain data prepare`): shards + manifest.json",
    "optim.max_lr": "peak learning rate, reached at the end of the warmup",
    "optim.warmup_steps": "linear warmup from 0 to max_lr",
    "optim.betas": "AdamW beta1, beta2",
    "optim.eps": "AdamW epsilon",
    "optim.weight_decay": "decoupled weight decay of the weight matrices (not norms, biases or embeddings)",
    "optim.decay": "the LR after the warmup: rsqrt or constant (open-ended), cosine or linear (fixed-horizon "
    "baselines, to optim.horizon)",
    "optim.impl": "the AdamW step: auto = the Triton kernel on CUDA, the torch version elsewhere",
    "model.activation_checkpointing": "recompute activations in the backward to save memory: none, every block "
    "(full) or selective (docs/scaling.md)",
    "train.dtype": "autocast dtype on GPU; float32 = no autocast",
    "train.device": "auto = this rank's GPU when CUDA is available, else the CPU",
    "engine.name": "auto follows the launcher: python = single, deepspeed = DeepSpeed ZeRO, torchrun = FSDP2",
    "logging.mlflow": "log metrics to MLflow (where: logging.mlflow_uri)",
    "train.log_every": "steps between metrics records (and console lines)",
    "train.seed": "seeds the initial weights and the data order",
    "checkpoint.keep_last": "the newest N checkpoints are kept (pinned ones too, while a fork reads them)",
    "checkpoint.async_save": "write checkpoints in a background thread while training goes on",
    "eval.batches": "validation batches per eval",
    "engine.zero_stage": "DeepSpeed ZeRO stage 0-3",
}

# What each section is for, above its table.
SECTIONS = {
    "model": "The network. All fields but `init_from` and the runtime knobs fix the parameters' shapes: a run "
    "dir resumes and forks only with the same ones.",
    "data": "Where the tokens come from.",
    "optim": "AdamW and the learning-rate schedule (docs/design.md).",
    "train": "Batch, precision, device, logging and what a non-finite step does.",
    "checkpoint": "When checkpoints are written, which are kept, and how they are checked on load "
    "(docs/checkpoints.md).",
    "eval": "Periodic validation loss.",
    "engine": "Which engine trains: one process, DeepSpeed ZeRO or FSDP2 (docs/scaling.md).",
    "logging": "Experiment trackers beside metrics.jsonl (docs/training.md).",
}


def comments(cls) -> dict[str, str]:
    """The trailing comment of each field in the dataclass's source."""
    source = inspect.getsource(cls)
    found = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M))
    # a long one the formatter wrapped: `name: type = (\n    default  # comment\n)`
    found.update(re.findall(r"^\s+(\w+):[^#\n]*= \(\n\s+[^#\n]*#\s*(.*)$", source, re.M))
    return found


def type_name(tp, key: str) -> str:
    choices = config._CHOICES.get(key)
    if choices:
        return " \\| ".join(f"`{c}`" for c in choices)
    text = str(tp) if typing.get_origin(tp) else tp.__name__
    return "`" + text.replace("typing.", "").replace("NoneType", "None").replace("|", "\\|") + "`"


def default_text(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if value is None:
        return "`null`"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def rows() -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default, meaning) of every key, in the dataclasses' order."""
    hints = typing.get_type_hints(config.Config)
    out = []
    for section in dataclasses.fields(config.Config):
        cls = hints[section.name]
        notes = comments(cls)
        field_types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            meaning = MEANINGS.get(key) or notes.get(f.name, "")
            out.append((section.name, key, type_name(field_types[f.name], key), default_text(f), meaning))
    return out


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "<!-- generated by `python -m evertrain.launch.config_reference > docs/config.md`; do not edit -->",
        "",
        "Every key a config can set: in the YAML file under its section, or on the command line as "
        "`section.key=value` after `pretrain.py --config FILE` (`python pretrain.py --config FILE --print-config` "
        "shows the result). Unknown keys and impossible values are one-line errors that name the key. "
        "`null` is YAML for none.",
    ]
    for section, group in itertools.groupby(rows(), key=lambda row: row[0]):
        lines += [
            "",
            f"## {section}",
            "",
            SECTIONS.get(section, ""),
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{key}` | {tp} | {default} | {meaning.replace('|', '/')} |"
            for _, key, tp, default, meaning in group
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
