"""`evertrain export hf`: a checkpoint or cooldown result as a standard Hugging Face Llama checkpoint.

The output directory loads offline with `LlamaForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`:
  model.safetensors       our parameters under HF Llama names (model.py names them so; a rename only);
                          over --max-shard-size, model-00001-of-0000N.safetensors ... and
                          model.safetensors.index.json (Hugging Face's sharded layout and greedy split)
  config.json             LlamaConfig: GQA heads, RoPE theta, tied embeddings, RMSNorm eps, bos/eos ids
  generation_config.json  bos/eos ids
  tokenizer.model         our SentencePiece model, unchanged
  tokenizer_config.json   PreTrainedTokenizerFast, no BOS/EOS added: encodes exactly like our data prep
  tokenizer.json          the same tokenizer for the `tokenizers` library (when transformers is installed)
or, for a data dir prepared with a Hugging Face tokenizer.json:
  tokenizer.json          that file, less a post-processor template that adds special tokens (Llama 3's
                          BOS): data prep encodes with add_special_tokens=False; unchanged when it has none
  tokenizer_config.json   PreTrainedTokenizerFast naming its bos/eos
It is written into a temporary sibling directory and renamed into place when complete. The weights
are read and written one shard at a time (a checkpoint through checkpoint/slices.py: its fp32 weights
only, never the Adam moments), so memory is bounded by the largest shard, not the model. The command
itself (which checkpoint, which tokenizer) is export_cmd.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from evertrain.errors import EvertrainError
from evertrain.pretrain.config import NOT_SHAPE, ModelConfig
from evertrain.pretrain.data import tokenizer as tok
from evertrain.pretrain.data.stream import file_sha256
from evertrain.pretrain.model.hf_llama import expected_shapes, hf_name, llama_config


class ExportError(EvertrainError, ValueError):
    """A checkpoint that cannot be exported as asked; the message names the key, file or argument."""


# Every ModelConfig field has a Llama equivalent. A field added later must be mapped here first,
# so that a model Llama cannot express is refused instead of exported wrong.
LLAMA_EXPRESSIBLE = {
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "multiple_of",
    "seq_len",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "init_std",
}


def check_llama_expressible(model_cfg: ModelConfig) -> None:
    for field in dataclasses.fields(model_cfg):
        if field.name not in LLAMA_EXPRESSIBLE and field.name not in NOT_SHAPE:
            raise ExportError(f"model.{field.name}: has no Llama equivalent, so the model cannot be exported")


DEFAULT_MAX_SHARD_SIZE = "5GB"  # Hugging Face's default
SAFETENSORS_INDEX = "model.safetensors.index.json"
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes, '500MiB', '1000000'; as Hugging Face reads --max-shard-size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS or not float(match.group(1)) > 0:
        raise ExportError(f"--max-shard-size {text}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Hugging Face's split (huggingface_hub split_state_dict_into_shards_factory): tensors in order,
    a new shard when the next would tip this one over `max_bytes`, a larger tensor alone."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        if size > max_bytes:
            shards.append([name])
            continue
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + ([current] if current else [])


def shard_files(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def check_shapes(shapes: dict[str, tuple[int, ...]], model_cfg: ModelConfig) -> list[str]:
    """Check every tensor's shape against the config; the names to write (a tied head is the table)."""
    expected = expected_shapes(model_cfg)
    if model_cfg.tie_embeddings:  # HF ties lm_head to embed_tokens itself; store the table once
        expected.pop("lm_head.weight")
    names = [n for n in shapes if not (model_cfg.tie_embeddings and n == "lm_head.weight")]
    for name in names:
        if name not in expected:
            raise ExportError(f"{name}: checkpoint tensor has no Llama equivalent")
        if tuple(shapes[name]) != expected[name]:
            raise ExportError(
                f"{name}: shape {tuple(shapes[name])} does not match the config's {expected[name]}"
            )
    missing = sorted(set(expected) - set(names))
    if missing:
        raise ExportError(f"{missing[0]}: missing from the checkpoint ({len(missing)} tensors missing)")
    return names


class StateReader:
    """A model state dict in memory, read like a checkpoint (checkpoint/slices.py's SliceReader)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.shapes = {name: tuple(t.shape) for name, t in state.items()}

    def weights(self, names: list[str]) -> list[torch.Tensor]:
        return [self.state[name].detach() for name in names]


class CheckpointReader:
    """A checkpoint's fp32 weights, whole tensors, only those asked for (no optimizer moments)."""

    def __init__(self, step_dir: Path, meta: dict):
        from evertrain.pretrain.checkpoint import dcp as _dcp  # noqa: F401  (silences DCP's no_dist warning)
        from evertrain.pretrain.checkpoint.slices import open_reader

        self.reader = open_reader(Path(step_dir), meta)
        self.shapes = {name: tuple(shape) for name, shape in self.reader.shapes.items()}

    def weights(self, names: list[str]) -> list[torch.Tensor]:
        from evertrain.pretrain.checkpoint.slices import WEIGHT, Slice

        flat = self.reader.read([Slice(name, WEIGHT, 0, math.prod(self.shapes[name])) for name in names])
        return [t.view(self.shapes[name]) for name, t in zip(names, flat)]


def write_weights(reader, model_cfg: ModelConfig, out_dir: Path, dtype: torch.dtype, max_bytes: int) -> None:
    """The weights as safetensors shards (and their index when there are several), one shard in memory
    at a time: each is read, renamed to HF Llama (hf_llama.hf_name), written and dropped."""
    names = check_shapes(reader.shapes, model_cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: math.prod(reader.shapes[name]) * itemsize for name in names}
    shards = plan_shards(sizes, max_bytes)
    tied_head = model_cfg.tie_embeddings and "lm_head.weight" in reader.shapes
    weight_map = {}
    for shard, filename in zip(shards, shard_files(len(shards))):
        extra = ["lm_head.weight"] if tied_head and "embed_tokens.weight" in shard else []
        tensors = dict(zip(shard + extra, reader.weights(shard + extra)))
        if extra and not torch.equal(tensors.pop("lm_head.weight"), tensors["embed_tokens.weight"]):
            raise ExportError(
                "lm_head.weight: differs from embed_tokens.weight but model.tie_embeddings is true"
            )
        hf_state = {hf_name(name): t.to("cpu", dtype).contiguous() for name, t in tensors.items()}
        del tensors
        save_file(hf_state, str(out_dir / filename), metadata={"format": "pt"})
        os.chmod(out_dir / filename, 0o644)  # safetensors creates it owner-only, unlike the rest
        weight_map.update({name: filename for name in hf_state})
        del hf_state
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def special_token_ids(sp: spm.SentencePieceProcessor) -> tuple[int | None, int | None]:
    """(bos, eos) ids of the SentencePiece model; SentencePiece says -1 for a disabled one."""
    return (sp.bos_id() if sp.bos_id() >= 0 else None), (sp.eos_id() if sp.eos_id() >= 0 else None)


def write_tokenizer(
    tokenizer_model: Path,
    out_dir: Path,
    model_max_length: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> None:
    """The tokenizer files; bos_id/eos_id (those of config.json) name a tokenizer.json's specials."""
    if is_json_tokenizer(tokenizer_model):
        write_json_tokenizer(tokenizer_model, out_dir, model_max_length, bos_id, eos_id)
        return
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")

    def piece(token_id: int) -> str | None:
        return sp.id_to_piece(token_id) if token_id >= 0 else None

    # The generic fast tokenizer follows the SentencePiece model's own normalizer spec, pieces and model
    # type. LlamaTokenizer would not: transformers 5 rebuilds it as its own BPE pipeline, prepending a
    # space, which changes the ids. Our data has no BOS, so none is added.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    try:
        from transformers import AutoTokenizer
    except ImportError:  # transformers >= 5 converts tokenizer.model when it loads the directory
        return
    # Older transformers and the bare `tokenizers` library need the converted form on disk.
    AutoTokenizer.from_pretrained(out_dir).backend_tokenizer.save(str(out_dir / "tokenizer.json"))


# post-processors that insert special tokens (the rest, e.g. ByteLevel, only adjust offsets)
ADDS_SPECIAL_TOKENS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def without_special_tokens(processor: dict | None) -> dict | None:
    """A tokenizer.json `post_processor` less the parts that insert special tokens."""
    if processor is None or processor.get("type") in ADDS_SPECIAL_TOKENS:
        return None
    if processor.get("type") == "Sequence":
        kept = [p for p in map(without_special_tokens, processor["processors"]) if p is not None]
        return {**processor, "processors": kept} if kept else None
    return processor


def write_json_tokenizer(
    path: Path, out_dir: Path, model_max_length: int, bos_id: int | None, eos_id: int | None
) -> None:
    """The data dir's tokenizer.json, and a tokenizer_config.json that loads it as
    PreTrainedTokenizerFast. Our data has no BOS: data prep encodes with add_special_tokens=False. A
    template that adds special tokens (Llama 3's BOS) is dropped from the copy, because transformers
    applies the file's template whatever tokenizer_config.json says; a file without one ships as it is."""
    hf = load_json_tokenizer(path)
    model = json.loads(path.read_bytes())
    processor = without_special_tokens(model.get("post_processor"))
    if processor == model.get("post_processor"):
        shutil.copyfile(path, out_dir / "tokenizer.json")
    else:
        (out_dir / "tokenizer.json").write_text(
            json.dumps({**model, "post_processor": processor}, ensure_ascii=False, indent=2) + "\n",
            encoding="utf-8",
        )

    def token(token_id: int | None) -> str | None:
        return hf.id_to_token(token_id) if token_id is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(bos_id),
        "eos_token": token(eos_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def export_hf(
    model_state: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    tokenizer_model_path: str | Path,
    out_dir: str | Path,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write an HF Llama checkpoint of `model_state` (in memory) to `out_dir` (which must not exist yet).

    bos_id/eos_id default to the tokenizer's own; pass the data manifest's when it names them.
    """
    return write_hf(
        StateReader(model_state),
        model_cfg,
        tokenizer_model_path,
        out_dir,
        bos_id=bos_id,
        eos_id=eos_id,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )


def export_hf_checkpoint(
    step_dir: str | Path,
    meta: dict,
    model_cfg: ModelConfig,
    tokenizer_model_path: str | Path,
    out_dir: str | Path,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """The same for a checkpoint step dir of any engine and world size, read shard by shard: its weights
    only, so memory is bounded by the largest shard, not by the model and its optimizer state."""
    return write_hf(
        CheckpointReader(step_dir, meta),
        model_cfg,
        tokenizer_model_path,
        out_dir,
        bos_id=bos_id,
        eos_id=eos_id,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )


def write_hf(
    reader,
    model_cfg: ModelConfig,
    tokenizer_model_path: str | Path,
    out_dir: str | Path,
    *,
    bos_id: int | None,
    eos_id: int | None,
    dtype: torch.dtype,
    max_shard_size: str | int,
) -> Path:
    out_dir, tokenizer_model_path = Path(out_dir), Path(tokenizer_model_path)
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    if out_dir.exists():
        raise ExportError(f"--out {out_dir}: already exists; choose a new directory")
    if not tokenizer_model_path.is_file():
        raise ExportError(f"{tokenizer_model_path}: tokenizer model not found")
    check_llama_expressible(model_cfg)
    vocab_size, own_bos, own_eos = tokenizer_facts(tokenizer_model_path)
    if vocab_size > model_cfg.vocab_size:
        raise ExportError(
            f"{tokenizer_model_path}: {vocab_size} tokens do not fit model.vocab_size={model_cfg.vocab_size}"
        )
    bos_id = own_bos if bos_id is None else bos_id
    eos_id = own_eos if eos_id is None else eos_id
    check_shapes(reader.shapes, model_cfg)  # before anything is written

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_weights(reader, model_cfg, tmp, dtype, max_bytes)
        config = llama_config(model_cfg, bos_id, eos_id, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": eos_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer(tokenizer_model_path, tmp, model_cfg.seq_len, bos_id, eos_id)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):  # sentencepiece's multi-line parse error for any other file
        raise ExportError(f"{path}: not a sentencepiece tokenizer model") from None


def is_json_tokenizer(path: Path) -> bool:
    return tok.kind_of(path.read_bytes()) == tok.HF_JSON


def load_json_tokenizer(path: Path):
    try:
        return tok.hf_tokenizer(path.read_bytes(), str(path))
    except tok.TokenizerError as exc:
        raise ExportError(str(exc)) from None


def tokenizer_facts(path: Path) -> tuple[int, int | None, int | None]:
    """(vocab size, bos id, eos id) of a sentencepiece model or a tokenizer.json; bos/eos as data prep
    finds them (tokenizer.py), None where there is none."""
    if not is_json_tokenizer(path):
        sp = load_tokenizer(path)
        return (sp.vocab_size(), *special_token_ids(sp))
    hf = load_json_tokenizer(path)
    config = path.with_name(tok.HF_CONFIG)
    try:
        bos, eos = tok.hf_special_ids(hf, config.read_bytes() if config.is_file() else None, str(path))
    except tok.TokenizerError as exc:
        raise ExportError(str(exc)) from None
    return hf.get_vocab_size(with_added_tokens=True), bos, eos


def check_tokenizer(tokenizer: Path, meta: dict, step_dir: Path) -> None:
    """The tokenizer must be the one the checkpoint trained with (checkpoints record its sha256):
    a tokenizer of another vocabulary would export a model that reads the wrong tokens."""
    trained = (meta.get("data") or {}).get("tokenizer_sha256") if isinstance(meta.get("data"), dict) else None
    tokenizer_facts(tokenizer)  # a sentencepiece model or a tokenizer.json, else one line
    if trained is not None and file_sha256(tokenizer) != trained:
        raise ExportError(
            f"{tokenizer}: not the tokenizer {step_dir} trained with (sha256 {file_sha256(tokenizer)[:12]} "
            f"vs {trained[:12]}); pass that one, or omit --tokenizer to use the run's data dir"
        )
