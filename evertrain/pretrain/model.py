"""A Llama-style decoder-only transformer.

Parameter names and the RoPE convention (rotate_half on split halves) follow Hugging Face's
LlamaForCausalLM, so exporting a checkpoint (evertrain/launch/export.py) is a rename, not a permutation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evertrain.pretrain.config import ModelConfig


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """SwiGLU width: explicit, or Llama's 8/3 * d_model rounded up to a multiple of `multiple_of`."""
    if cfg.ffn_hidden is not None:
        return cfg.ffn_hidden
    hidden = int(8 * cfg.d_model / 3)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


def flops_per_token(cfg: ModelConfig) -> float:
    """Model FLOPs of one trained token (forward + backward), the count MFU divides by (PaLM, app. B):
    6 per weight of every matmul (the projections, the SwiGLU MLP, the LM head; an embedding lookup is
    not a matmul, a tied head still is) plus causal attention's QK^T and AV: 12 * n_layers * seq_len *
    d_model halved by the mask. Norms, RoPE and softmax are left out, as is activation recomputation
    (that is hardware FLOPs, not model FLOPs)."""
    d, head_dim = cfg.d_model, cfg.d_model // cfg.n_heads
    kv = (cfg.n_kv_heads or cfg.n_heads) * head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ffn_hidden_size(cfg)  # q, o; k, v; gate, up, down
    matmul_weights = cfg.n_layers * per_layer + cfg.vocab_size * d
    return 6.0 * matmul_weights + 6.0 * cfg.n_layers * cfg.seq_len * d


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim], computed in fp32 the way HF Llama does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, expand_kv: bool | None = None) -> torch.Tensor:
    """Causal SDPA over [B, heads, T, head_dim]; query head h reads K/V head h // (q heads / kv heads)."""
    n_rep = q.shape[1] // k.shape[1]
    if expand_kv is None:
        # SDPA's own GQA broadcast never materialises repeated K/V, and flash attention runs it on CPU
        # and on CUDA in half precision. CUDA fp32 has no fused GQA kernel (it would silently take the
        # unfused math kernel), so only there K/V are expanded first.
        expand_kv = q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16)
    if expand_kv and n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1 and not expand_kv)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, model_cfg: ModelConfig):
        super().__init__()
        self.cfg = model_cfg
        self.embed_tokens = nn.Embedding(model_cfg.vocab_size, model_cfg.d_model)
        self.layers = nn.ModuleList(Block(model_cfg) for _ in range(model_cfg.n_layers))
        self.norm = nn.RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps)
        self.lm_head = nn.Linear(model_cfg.d_model, model_cfg.vocab_size, bias=False)
        self.tie_weights()
        # Derived from the config, so kept out of the state_dict (and rebuilt by init_weights).
        self.register_buffer("rope_cos", torch.empty(model_cfg.seq_len, model_cfg.d_model // model_cfg.n_heads),
                             persistent=False)
        self.register_buffer("rope_sin", torch.empty_like(self.rope_cos), persistent=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding table with the head; `to_empty()` unties them, so init_weights re-ties."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic given the torch seed; also after `to_empty()` from the meta device."""
        cfg = self.cfg
        self.tie_weights()
        cos, sin = rope_cos_sin(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        # GPT-2 style: projections that write into the residual stream are scaled down by depth.
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():  # tied lm_head appears once, as embed_tokens
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, vocab] in fp32."""
        T = tokens.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len={self.cfg.seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x)).float()

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [B, T+1] -> mean next-token cross entropy over all B*T positions."""
        logits = self(windows[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # shared (tied) tensors count once
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n
