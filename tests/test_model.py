"""The Llama-style Transformer: shapes, causality, GQA, tying, init, and the shipped configs."""

import json
import math
from pathlib import Path

import pytest
import torch

from evertrain.pretrain.config import ModelConfig, load_config
from evertrain.pretrain.model.transformer import Transformer, causal_attention, ffn_hidden_size

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=32)
    return ModelConfig(**{**fields, **overrides})


def build(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_cfg(**overrides))


def test_forward_shape_and_fp32_logits():
    model = build()
    tokens = torch.randint(0, 256, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, 256) and logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(tokens).dtype == torch.float32


def test_longer_than_seq_len_is_refused():
    with pytest.raises(ValueError, match="seq_len=32"):
        build()(torch.zeros(1, 33, dtype=torch.long))


def test_future_tokens_do_not_change_past_logits():
    model = build()
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_gqa_equals_mha_with_shared_kv_heads():
    """Query head h reads kv head h // (n_heads / n_kv_heads): expanding K/V weights gives an MHA twin."""
    gqa = build(n_heads=4, n_kv_heads=2)
    mha = build(n_heads=4, n_kv_heads=None)
    head_dim = 16
    state = {}
    for name, w in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = w.view(2, head_dim, 64).repeat_interleave(2, dim=0).reshape(4 * head_dim, 64)
        state[name] = w
    mha.load_state_dict(state)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (2 * head_dim, 64)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_sdpa_gqa_broadcast_matches_expanded_kv():
    """SDPA's enable_gqa (CPU, CUDA half) groups heads like the expanded-K/V path (CUDA fp32)."""
    q, k, v = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    torch.testing.assert_close(
        causal_attention(q, k, v, expand_kv=False), causal_attention(q, k, v, expand_kv=True)
    )


def test_tied_and_untied_embeddings():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 256 * 64
    tied.loss(torch.randint(0, 256, (2, 9))).backward()
    assert tied.embed_tokens.weight.grad is not None  # the head's gradient lands in the shared table


def test_param_count_matches_the_formula():
    cfg = tiny_cfg(tie_embeddings=False)
    d, kv_dim, hidden = 64, 2 * 16, ffn_hidden_size(cfg)
    assert hidden == 192  # int(8/3 * 64) = 170, rounded up to a multiple of 32
    per_layer = d * d * 2 + d * kv_dim * 2 + 3 * d * hidden + 2 * d
    expected = 2 * 256 * d + cfg.n_layers * per_layer + d
    model = Transformer(cfg)
    assert model.num_params() == expected
    assert model.num_params(exclude_embeddings=True) == expected - 256 * d


def test_param_count_and_decay_groups_of_zero3_placeholders():
    """deepspeed.zero.Init replaces every parameter by an empty 1-D placeholder and keeps its real
    shape in ds_shape / ds_numel (the optimizer is built then): counts and groups read those."""
    from evertrain.pretrain.optim import param_groups

    model = build(tie_embeddings=False)
    counts = model.num_params(), model.num_params(exclude_embeddings=True)
    groups = [[tuple(p.shape) for p in g["params"]] for g in param_groups(model, 0.1)]
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    assert (model.num_params(), model.num_params(exclude_embeddings=True)) == counts
    assert [[tuple(p.ds_shape) for p in g["params"]] for g in param_groups(model, 0.1)] == groups


def test_loss_at_init_is_log_vocab():
    model = build(vocab_size=512)
    loss = model.loss(torch.randint(0, 512, (4, 33)))
    assert abs(loss.item() - math.log(512)) < 0.1


def test_loss_is_mean_next_token_cross_entropy():
    model = build()
    windows = torch.randint(0, 256, (2, 11))
    logits = model(windows[:, :-1])
    expected = -logits.log_softmax(-1).gather(-1, windows[:, 1:, None]).mean()
    torch.testing.assert_close(model.loss(windows), expected)


def test_a_few_steps_fit_a_fixed_batch():
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    windows = torch.randint(0, 256, (4, 33))
    first = model.loss(windows).item()
    for _ in range(15):
        opt.zero_grad()
        model.loss(windows).backward()
        opt.step()
    assert model.loss(windows).item() < first - 1.0


def test_init_is_deterministic_and_works_from_meta():
    cfg = tiny_cfg(d_model=256, n_heads=4, n_kv_heads=None, n_layers=8)
    reference = Transformer(cfg)
    torch.manual_seed(99)  # the global RNG plays no part: weights are a function of the seed argument
    reference.init_weights(7)
    with torch.device("meta"):
        from_meta = Transformer(cfg, init=False)
    from_meta.to_empty(device="cpu")
    from_meta.init_weights(7)
    for (name, a), (_, b) in zip(reference.state_dict().items(), from_meta.state_dict().items()):
        assert torch.equal(a, b), name
    other = Transformer(cfg, seed=8)
    assert not torch.equal(other.layers[0].mlp.up_proj.weight, reference.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(from_meta.rope_cos, reference.rope_cos)
    assert from_meta.lm_head.weight is from_meta.embed_tokens.weight  # to_empty() untied them
    assert "rope_cos" not in reference.state_dict()
    # GPT-2 style depth scaling of the residual-stream output projections
    std = reference.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.0005
    assert abs(reference.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.001
    assert torch.equal(reference.norm.weight, torch.ones(256))


@pytest.mark.parametrize(
    "name, low, high",
    [("tiny", 0.5e6, 0.9e6), ("small", 5e6, 10e6), ("1b", 0.9e9, 1.3e9), ("8b", 7e9, 8.5e9)],
)
def test_shipped_configs_load_and_have_their_size(name, low, high):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    with torch.device("meta"):  # no memory even for 8B
        model = Transformer(cfg.model)
    assert low <= model.num_params() <= high
    if cfg.engine.deepspeed_config:
        assert (REPO / cfg.engine.deepspeed_config).is_file()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_keys_are_valid_zero_settings(stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # rejects unknown keys

    settings = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert set(settings) == {"zero_optimization"}  # only tuning knobs; batch/optimizer are generated
    DeepSpeedZeroConfig(stage=stage, **settings["zero_optimization"])


@pytest.mark.parametrize("name", ["1b", "8b"])
def test_gpu_configs_merge_into_the_deepspeed_engine_settings(name, monkeypatch):
    from evertrain.pretrain.engines.deepspeed import deepspeed_config

    monkeypatch.chdir(REPO)  # engine.deepspeed_config is relative to the repo root, where runs start
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    merged = deepspeed_config(cfg, world_size=8, bf16=True)
    assert merged["zero_optimization"]["stage"] == cfg.engine.zero_stage
    assert merged["zero_optimization"]["overlap_comm"] is True  # the JSON's tuning knobs arrive
    assert merged["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 8
