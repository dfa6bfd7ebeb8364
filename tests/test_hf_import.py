"""`model.init_from: hf:PATH`: a local Hugging Face Llama checkpoint becomes a run's starting weights.

Our logits equal transformers' on the same tokens, export -> import -> export is bit-exact, a run
started from it trains, resumes without it, and shapes we cannot represent are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evertrain.launch.export import export_hf
from evertrain.pretrain import engines
from evertrain.pretrain.config import ConfigError, load_config
from evertrain.pretrain.data.stream import TokenStream
from evertrain.pretrain.engines.base import build_model
from evertrain.pretrain.model.hf_llama import HFCheckpointError, load_llama
from evertrain.pretrain.run.preflight import preflight

from conftest import load_pretrain

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SHAPE = [
    "model.vocab_size=512",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=64",
    "model.seq_len=32",
    "model.rope_theta=500000.0",
    "model.norm_eps=1e-6",
]


def save_llama(out: Path, tie: bool = False, seed: int = 0, **config) -> Path:
    """A tiny random LlamaForCausalLM saved with save_pretrained (safetensors), ~50K parameters."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=tie,
        **config,
    )
    model = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():  # HF initialises norms to 1: make them random too, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    return out


def config_for(hf_dir: Path, data: Path | None = None, *extra: str, tie: bool = False):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            *SHAPE,
            f"model.tie_embeddings={str(tie).lower()}",
            f"model.init_from=hf:{hf_dir}",
            *([f"data.path={data}"] if data else []),
            *extra,
        ],
    )


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers(tmp_path, tie):
    hf_dir = save_llama(tmp_path / "llama", tie=tie)
    cfg = config_for(hf_dir, tie=tie)
    ours = build_model(cfg, torch.device("cpu"))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tie


def test_export_import_export_is_bit_exact(tmp_path, tiny_data):
    cfg = config_for(save_llama(tmp_path / "llama"), tiny_data)
    first = export_hf(
        build_model(cfg, torch.device("cpu")).state_dict(),
        cfg.model,
        tiny_data / "tokenizer.model",
        tmp_path / "first",
    )
    again = config_for(first, tiny_data)
    second = export_hf(
        load_llama(again.model.init_from, again.model),
        again.model,
        tiny_data / "tokenizer.model",
        tmp_path / "second",
    )
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    original = load_file(str(tmp_path / "llama" / "model.safetensors"))
    exported = load_file(str(first / "model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)

    bf16 = export_hf(
        load_llama(again.model.init_from, again.model),
        again.model,
        tiny_data / "tokenizer.model",
        tmp_path / "bf16",
        dtype=torch.bfloat16,
    )
    from_bf16 = config_for(bf16, tiny_data)
    bf16_again = export_hf(
        load_llama(from_bf16.model.init_from, from_bf16.model),
        from_bf16.model,
        tiny_data / "tokenizer.model",
        tmp_path / "bf16_again",
        dtype=torch.bfloat16,
    )
    assert (bf16 / "model.safetensors").read_bytes() == (bf16_again / "model.safetensors").read_bytes()


def test_a_run_starts_from_the_checkpoint_trains_and_resumes_without_it(tmp_path, tiny_data):
    hf_dir = shutil.copytree(save_llama(tmp_path / "llama"), tmp_path / "llama_copy")
    shutil.copyfile(
        tiny_data / "tokenizer.model", hf_dir / "tokenizer.model"
    )  # trained with the data's tokenizer
    cfg = config_for(hf_dir, tiny_data)
    engine = engines.create(cfg)
    try:
        state = load_file(str(hf_dir / "model.safetensors"))
        ours = engine.raw_model.state_dict()
        assert all(torch.equal(ours[name.removeprefix("model.")], tensor) for name, tensor in state.items())
    finally:
        engine.close()

    pretrain = load_pretrain()
    run_dir = tmp_path / "run"
    argv = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--run-dir",
        str(run_dir),
        "--engine",
        "single",
        *SHAPE,
        "model.tie_embeddings=false",
        f"model.init_from=hf:{hf_dir}",
        f"data.path={tiny_data}",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "eval.every_steps=0",
        "checkpoint.every_steps=2",
    ]
    assert pretrain.main([*argv, "train.max_steps=2"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", local_files_only=True)
    windows = TokenStream(tiny_data, 32, cfg.train.seed).next_batch(2, 0, 1)
    with torch.no_grad():  # step 1's loss is the HF model's loss on step 1's batch
        hf_loss = torch.nn.functional.cross_entropy(
            hf(windows[:, :-1]).logits.flatten(0, 1), windows[:, 1:].flatten()
        ).item()
    assert records[0]["step"] == 1 and records[0]["loss"] == pytest.approx(hf_loss, abs=1e-5)
    shutil.rmtree(hf_dir)  # the run has a checkpoint now: it no longer needs the HF directory
    assert pretrain.main([*argv, "train.max_steps=4"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_checkpoint_of_another_tokenizer_is_refused(tmp_path, tiny_data):
    """The embedding rows are the tokens of the checkpoint's tokenizer: data tokenized with another one
    (or a checkpoint that ships none) is refused before the run starts, with one line."""
    import sentencepiece as spm

    hf_dir = save_llama(tmp_path / "llama")
    cfg = config_for(hf_dir, tiny_data, "eval.every_steps=0")
    with pytest.raises(HFCheckpointError, match="has no tokenizer.model or tokenizer.json"):
        preflight(cfg, verify_checksums=False)
    text = tmp_path / "other.txt"
    text.write_text("\n".join(f"another corpus line {i} with words {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "other"), vocab_size=100, minloglevel=2
    )
    shutil.copyfile(tmp_path / "other.model", hf_dir / "tokenizer.model")
    with pytest.raises(HFCheckpointError, match="tokenizer.model is not the tokenizer of data.path=") as err:
        preflight(cfg, verify_checksums=False)
    assert "\n" not in str(err.value)
    shutil.copyfile(tiny_data / "tokenizer.model", hf_dir / "tokenizer.model")
    preflight(cfg, verify_checksums=False)  # its own tokenizer: fine


def rewrite_config(hf_dir: Path, **changes) -> Path:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))
    return hf_dir


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' cannot be represented"),
        ({"attention_bias": True}, "attention_bias True cannot be represented"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
            "rope type 'llama3' cannot be represented",
        ),
        ({"num_hidden_layers": 3}, "num_hidden_layers=3 but the config has model.n_layers=2"),
        ({"num_key_value_heads": 4}, "num_key_value_heads=4 but the config has model.n_kv_heads=2"),
        ({"intermediate_size": 96}, "intermediate_size=96 but the config has model.ffn_hidden=64"),
        ({"model_type": "mistral"}, "model_type 'mistral' is not 'llama'"),
    ],
)
def test_unrepresentable_checkpoints_are_refused(tmp_path, change, message):
    hf_dir = rewrite_config(save_llama(tmp_path / "llama"), **change)
    cfg = config_for(hf_dir)
    with pytest.raises(HFCheckpointError, match=message.replace("(", r"\(")) as err:
        build_model(cfg, torch.device("cpu"))
    assert "\n" not in str(err.value)


# Every config.json field that describes the model's computation, changed so that nothing but its own
# check can notice (the weights keep their shapes where the field allows it), and the model.<key> it
# must match. A field left unchecked would import the weights into a model that computes something else.
CONFIG_FIELDS = [
    ({"vocab_size": 1000}, "vocab_size=1000 but the config has model.vocab_size=512"),
    ({"hidden_size": 64, "head_dim": 16}, "hidden_size=64 but the config has model.d_model=32"),
    ({"num_hidden_layers": 3}, "num_hidden_layers=3 but the config has model.n_layers=2"),
    ({"num_attention_heads": 8, "head_dim": 4}, "num_attention_heads=8 but the config has model.n_heads=4"),
    ({"num_key_value_heads": 4}, "num_key_value_heads=4 but the config has model.n_kv_heads=2"),
    ({"intermediate_size": 96}, "intermediate_size=96 but the config has model.ffn_hidden=64"),
    (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        "rope_theta=10000.0 but the config has model.rope_theta=500000.0",
    ),
    ({"rms_norm_eps": 0.05}, "rms_norm_eps=0.05 but the config has model.norm_eps=1e-06"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True but the config has model.tie_embeddings=False"),
]


@pytest.mark.parametrize("change, message", CONFIG_FIELDS, ids=[next(iter(c)) for c, _ in CONFIG_FIELDS])
def test_every_config_field_must_match_the_run(tmp_path, change, message):
    hf_dir = rewrite_config(save_llama(tmp_path / "llama"), **change)
    try:
        build_model(config_for(hf_dir), torch.device("cpu"))
    except HFCheckpointError as exc:
        assert message in str(exc) and "\n" not in str(exc)
    else:
        pytest.fail(f"{change} was imported into a model that does not compute it: the field is not checked")


def test_missing_files_and_tensors_are_refused(tmp_path):
    hf_dir = save_llama(tmp_path / "llama")
    state = load_file(str(hf_dir / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(hf_dir / "model.safetensors"))
    with pytest.raises(HFCheckpointError, match="model.layers.1.mlp.up_proj.weight is missing"):
        build_model(config_for(hf_dir), torch.device("cpu"))
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="has no model.safetensors"):
        build_model(config_for(hf_dir), torch.device("cpu"))
    with pytest.raises(HFCheckpointError, match="is not a directory"):
        build_model(config_for(tmp_path / "nowhere"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.init_from: expected hf:PATH"):
        load_config(None, ["model.init_from=/some/dir"])


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _index(hf_dir: Path, weight_map) -> None:
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _retype(hf_dir: Path, dtype) -> None:
    state = load_file(str(hf_dir / "model.safetensors"))
    name = "model.layers.0.input_layernorm.weight"
    state[name] = state[name].to(dtype)
    save_file(state, str(hf_dir / "model.safetensors"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json holds a JSON list, not an object"),
        (lambda d: rewrite_config(d, rope_parameters=[1]), "rope_parameters is a JSON list, not an object"),
        (lambda d: _cut(d / "model.safetensors"), "model.safetensors: not a readable safetensors file"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json}xxxxxx"),
            "model.safetensors: not a readable safetensors file",
        ),
        (lambda d: _index(d, ["model-1.safetensors"]), "weight_map is not a table"),
        (lambda d: _index(d, {"lm_head.weight": "../other/model.safetensors"}), "weight_map is not a table"),
        (lambda d: _retype(d, torch.int8), "input_layernorm.weight has dtype int8, not floating point"),
        (lambda d: _retype(d, torch.bool), "input_layernorm.weight has dtype bool, not floating point"),
    ],
)
def test_malformed_hf_files_are_one_line(tmp_path, damage, message):
    hf_dir = save_llama(tmp_path / "llama")
    damage(hf_dir)
    with pytest.raises(HFCheckpointError, match=message) as err:
        build_model(config_for(hf_dir), torch.device("cpu"))
    assert "\n" not in str(err.value)
