"""Our Transformer <-> Hugging Face Llama: the one place that knows how the two name and describe a model.

Used both ways: `evertrain export hf` (launch/export.py) writes our weights as a LlamaForCausalLM
checkpoint, and `model.init_from: hf:PATH` reads such a checkpoint back as a run's starting weights.
The mapping is a rename only (model.py names its parameters like HF and uses HF's RoPE layout):
HF prefixes every tensor but the head with `model.`, and a tied checkpoint stores the embedding once.

Import refuses, with one line naming the key, any Llama that our model cannot compute exactly:
another activation, biases, RoPE scaling, a head_dim that is not hidden/heads, and any shape that
disagrees with the run's `model` section (the config stays the description of the run's model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evertrain.errors import EvertrainError
from evertrain.pretrain.config import ModelConfig
from evertrain.pretrain.model.transformer import Transformer, ffn_hidden_size

HF_SCHEME = "hf:"
HF_PREFIX = "model."
HEAD = "lm_head.weight"
EMBEDDING = "embed_tokens.weight"


class HFCheckpointError(EvertrainError, ValueError):
    """A Hugging Face checkpoint that cannot be read into our model; the message names the key or file."""


def hf_name(name: str) -> str:
    """Our parameter name -> HF Llama's."""
    return name if name == HEAD else HF_PREFIX + name


def our_name(name: str) -> str | None:
    """HF Llama's tensor name -> ours, or None for a name that is not one of our parameters."""
    if name == HEAD:
        return name
    return name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else None


def expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of our Transformer for this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def llama_config(model_cfg: ModelConfig, bos_id: int | None, eos_id: int | None, dtype: torch.dtype) -> dict:
    """The config.json of a LlamaForCausalLM that computes what our model computes."""
    head_dim = model_cfg.d_model // model_cfg.n_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": ffn_hidden_size(model_cfg),
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_kv_heads or model_cfg.n_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.seq_len,
        "initializer_range": model_cfg.init_std,
        "rms_norm_eps": model_cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; older readers (and vLLM) read rope_theta.
        "rope_theta": model_cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# -- import --------------------------------------------------------------------------------------


def parse_init_from(value: str) -> Path:
    """`hf:PATH` -> PATH (the only scheme so far)."""
    if not value.startswith(HF_SCHEME) or len(value) == len(HF_SCHEME):
        raise HFCheckpointError(
            f"model.init_from: expected hf:PATH (a Hugging Face Llama directory), got {value!r}"
        )
    return Path(value[len(HF_SCHEME) :]).expanduser()


def read_llama_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFCheckpointError(
            f"model.init_from: {hf_dir} has no config.json (not a Hugging Face checkpoint)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HFCheckpointError(f"model.init_from: {path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise HFCheckpointError(
            f"model.init_from: {path} holds a JSON {type(config).__name__}, not an object"
        )
    return config


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def check_llama_config(hf: dict, model_cfg: ModelConfig, source: Path) -> None:
    """Refuse a Llama our model cannot compute exactly, or one the run's `model` section does not describe."""
    where = f"model.init_from: {source / 'config.json'}"
    if hf.get("model_type") != "llama":
        raise HFCheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not 'llama'")
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key) or {}, dict):
            raise HFCheckpointError(f"{where}: {key} is a JSON {type(hf[key]).__name__}, not an object")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    hidden, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    unsupported = [
        ("hidden_act", hf.get("hidden_act", "silu"), "silu"),
        ("attention_bias", bool(hf.get("attention_bias", False)), False),
        ("mlp_bias", bool(hf.get("mlp_bias", False)), False),
        ("rope type", rope_type, "default"),
        ("pretraining_tp", hf.get("pretraining_tp", 1), 1),
    ]
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        unsupported.append(("head_dim", hf.get("head_dim") or hidden // heads, hidden // heads))
    for key, value, needed in unsupported:
        if value != needed:
            raise HFCheckpointError(
                f"{where}: {key} {value!r} cannot be represented (evertrain models need {needed!r})"
            )
    n_kv = model_cfg.n_kv_heads or model_cfg.n_heads
    pairs = [
        ("vocab_size", "vocab_size", model_cfg.vocab_size),
        ("d_model", "hidden_size", model_cfg.d_model),
        ("n_layers", "num_hidden_layers", model_cfg.n_layers),
        ("n_heads", "num_attention_heads", model_cfg.n_heads),
        ("n_kv_heads", "num_key_value_heads", n_kv),
        ("ffn_hidden", "intermediate_size", ffn_hidden_size(model_cfg)),
        ("rope_theta", "rope_theta", model_cfg.rope_theta),
        ("norm_eps", "rms_norm_eps", model_cfg.norm_eps),
        ("tie_embeddings", "tie_word_embeddings", model_cfg.tie_embeddings),
    ]
    theirs = {
        **hf,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "rope_theta": _rope_theta(hf),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    for ours, key, value in pairs:
        if theirs.get(key) != value:
            raise HFCheckpointError(
                f"{where}: {key}={theirs.get(key)!r} but the config has "
                f"model.{ours}={value!r}; set model.{ours} to match"
            )


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise HFCheckpointError(f"model.init_from: {index} has no weight_map") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and name and Path(name).name == name for name in weight_map.values()
        ):
            raise HFCheckpointError(
                f"model.init_from: {index}: weight_map is not a table of tensor -> shard "
                "file name (in this directory)"
            )
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    else:
        raise HFCheckpointError(
            f"model.init_from: {hf_dir} has no model.safetensors (nor an index of shards)"
        )
    state = {}
    for path in files:
        if not path.is_file():
            raise HFCheckpointError(f"model.init_from: shard {path} is missing")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:  # a cut file, a malformed header
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HFCheckpointError(
                f"model.init_from: {path}: not a readable safetensors file ({reason})"
            ) from None
    return state


def from_hf_state_dict(
    hf_state: dict[str, torch.Tensor], model_cfg: ModelConfig, source: Path
) -> dict[str, torch.Tensor]:
    """HF tensors -> our names, every one checked against the config's shapes; a tied head is re-added."""
    expected = expected_shapes(model_cfg)
    state = {}
    for name, tensor in hf_state.items():
        ours = our_name(name)
        if ours is None or ours not in expected:
            if name.endswith("rotary_emb.inv_freq"):  # old checkpoints stored the RoPE table; ours is derived
                continue
            raise HFCheckpointError(
                f"model.init_from: {source}: tensor {name} has no counterpart in evertrain's model"
            )
        if not tensor.is_floating_point():  # a cast would silently turn codes or flags into weights
            raise HFCheckpointError(
                f"model.init_from: {source}: {name} has dtype "
                f"{str(tensor.dtype).removeprefix('torch.')}, not floating point (a quantized "
                "checkpoint? export it unquantized)"
            )
        if tuple(tensor.shape) != expected[ours]:
            raise HFCheckpointError(
                f"model.init_from: {source}: {name} has shape {tuple(tensor.shape)}, "
                f"the config needs {expected[ours]}"
            )
        state[ours] = tensor
    if model_cfg.tie_embeddings:
        head = state.pop(HEAD, None)
        if head is not None and EMBEDDING in state and not torch.equal(head, state[EMBEDDING]):
            raise HFCheckpointError(
                f"model.init_from: {source}: lm_head.weight differs from the embedding, "
                "but the checkpoint says its embeddings are tied"
            )
        if EMBEDDING in state:
            state[HEAD] = state[EMBEDDING]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise HFCheckpointError(
            f"model.init_from: {source}: {hf_name(missing[0])} is missing ({len(missing)} tensors missing)"
        )
    return state


def check_tokenizer(init_from: str, data_tokenizer: Path, data_path: str) -> None:
    """The embedding's rows mean the tokens of the tokenizer the checkpoint was trained with: the run's
    data must be tokenized with the same pieces at the same ids, or every row trains on the wrong token.
    A checkpoint without its tokenizer cannot show that, so it is refused too."""
    from evertrain.pretrain.data.tokenizer import pieces

    hf_dir = parse_init_from(init_from)
    files = [hf_dir / name for name in ("tokenizer.model", "tokenizer.json") if (hf_dir / name).is_file()]
    if not files:
        raise HFCheckpointError(
            f"model.init_from: {hf_dir} has no tokenizer.model or tokenizer.json, so nothing shows "
            f"that its embedding rows are the tokens of data.path={data_path}; copy the "
            "checkpoint's tokenizer into it"
        )
    ours = data_tokenizer.read_bytes()
    if any(path.read_bytes() == ours for path in files):
        return
    wanted = pieces(ours, str(data_tokenizer))
    for path in files:
        theirs = pieces(path.read_bytes(), f"model.init_from: {path}")
        if theirs == wanted:
            return
    differ = next(
        (i for i, (a, b) in enumerate(zip(theirs, wanted)) if a != b), min(len(theirs), len(wanted))
    )
    raise HFCheckpointError(
        f"model.init_from: {files[-1]} is not the tokenizer of data.path={data_path} "
        f"({len(theirs)} vs {len(wanted)} pieces, first difference at id {differ}): the "
        "embedding rows would train on the wrong tokens; use a data dir prepared with "
        "the checkpoint's tokenizer (evertrain data prepare --tokenizer)"
    )


def load_llama(init_from: str, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`hf:PATH` -> our state dict (tensors in the checkpoint's dtype), after every check above."""
    hf_dir = parse_init_from(init_from)
    if not hf_dir.is_dir():
        raise HFCheckpointError(f"model.init_from: {hf_dir} is not a directory")
    check_llama_config(read_llama_config(hf_dir), model_cfg, hf_dir)
    return from_hf_state_dict(read_safetensors(hf_dir), model_cfg, hf_dir)


@torch.no_grad()
def init_from_llama(model: Transformer, init_from: str) -> None:
    """Overwrite a freshly built model's weights with the checkpoint's (cast to the model's dtype)."""
    state = load_llama(init_from, model.cfg)
    model.load_state_dict(state, strict=True)
    model.tie_weights()  # load_state_dict copies into the shared tensor; re-tie in case a caller untied it
