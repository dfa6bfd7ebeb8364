"""A Llama-style decoder-only transformer.

Parameter names and the RoPE convention (rotate_half on split halves) follow Hugging Face's
LlamaForCausalLM, so exporting a checkpoint (evertrain/launch/export.py) is a rename, not a permutation.

Initial weights are a function of (seed, parameter name) alone: each parameter is drawn from its own
generator, so a model built on the meta device and sharded (FSDP2 DTensors, DeepSpeed ZeRO-3) fills
each rank's shard with exactly the slice of the weights a single process would have, for any world
size, while holding at most one full parameter at a time.

Scaling knobs that do not change the parameters (model.activation_checkpointing, model.loss_chunk_tokens):
- activation checkpointing is per block (`Block.forward`), so FSDP2's hooks stay outside the
  recomputed region (as torchtitan wraps blocks before `fully_shard`);
- the loss runs the head and the cross entropy in chunks of positions, recomputed in backward, so
  the full [tokens, vocab] fp32 logits never exist at once.
"""

from __future__ import annotations

import hashlib
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from evertrain import torch_compat
from evertrain.pretrain.config import ModelConfig

# Op-level selective checkpointing keeps the outputs of these (the expensive ops) and recomputes the
# rest of a block (norms, RoPE, SwiGLU pointwise) in backward, as torchtitan's "op" policy does.
# The SDPA kernels are private aten ops: a torch build without one of them simply has nothing to save.
_SAVE_OPS = torch_compat.aten_ops(
    [
        "mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ]
)


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


def flops_per_token_torchtitan(cfg: ModelConfig) -> float:
    """The same count by torchtitan's convention (get_nparams_and_flops), for comparing MFU figures:
    6 per parameter except the embedding's (norm weights included; a tied head, being the embedding,
    is left out) plus 12 * n_layers * seq_len * d_model for attention, *not* halved for the causal
    mask. Ours is lower on attention and counts a tied head, so for one measured step the two MFUs
    differ: report which one a number is."""
    d, head_dim = cfg.d_model, cfg.d_model // cfg.n_heads
    kv = (cfg.n_kv_heads or cfg.n_heads) * head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ffn_hidden_size(cfg) + 2 * d  # + the two norm weights
    non_embedding = cfg.n_layers * per_layer + d + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
    return 6.0 * non_embedding + 12.0 * cfg.n_layers * cfg.seq_len * d


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim], computed in fp32 the way HF Llama does."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    )
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, expand_kv: bool | None = None
) -> torch.Tensor:
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


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's real shape. DeepSpeed ZeRO-3 replaces each parameter by an empty 1-D
    placeholder (its rank's piece lives in `p.ds_tensor`) and keeps the real shape in `p.ds_shape`;
    FSDP2's DTensors report their global shape themselves."""
    return torch.Size(p.ds_shape) if hasattr(p, "ds_shape") else p.shape


def full_numel(p: torch.Tensor) -> int:
    return full_shape(p).numel()


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


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def block_checkpointing(mode: str, every: int, index: int) -> str:
    """What block `index` saves for backward: "none" (everything), "full" (only its input) or "op"
    (matmul and attention outputs). selective with every=k>0 fully checkpoints every k-th block."""
    if mode == "selective":
        if every == 0:
            return "op"
        return "full" if index % every == 0 else "none"
    return mode


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, checkpointing: str = "none"):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.checkpointing = checkpointing  # none | full | op (see block_checkpointing)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            return self.compute(x, cos, sin)
        context = (
            partial(create_selective_checkpoint_contexts, _save_matmuls)
            if self.checkpointing == "op"
            else None
        )
        kwargs = {"context_fn": context} if context is not None else {}
        # non-reentrant: works with FSDP2, torch.compile and inputs that need no grad
        return checkpoint(self.compute, x, cos, sin, use_reentrant=False, **kwargs)

    def compute(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _summed_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def chunked_cross_entropy(
    head: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Mean cross entropy of head(h) [N, vocab] against targets [N], `chunk` positions at a time.

    Each chunk's logits are dropped after its forward and recomputed in backward (checkpointed), so
    the peak is one chunk's logits, not N x vocab fp32. The head is called as a module so that
    DeepSpeed ZeRO-3 gathers its weight. chunk <= 0, or N <= chunk, is the plain unchunked loss.
    """
    n = h.shape[0]
    if chunk <= 0 or n <= chunk:
        return F.cross_entropy(head(h).float(), targets)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(
                _summed_cross_entropy, head, h[part], targets[part], use_reentrant=False
            )
        else:
            total = total + _summed_cross_entropy(head, h[part], targets[part])
    return total / n


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter: a hash of (run seed, parameter name)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Transformer(nn.Module):
    def __init__(self, model_cfg: ModelConfig, seed: int = 0, init: bool = True):
        """`init=False` leaves parameters and buffers unset: the caller builds on the meta device (or
        under deepspeed.zero.Init), shards, and then calls init_weights / init_parameter."""
        super().__init__()
        self.cfg = model_cfg
        self.embed_tokens = nn.Embedding(model_cfg.vocab_size, model_cfg.d_model)
        self.layers = nn.ModuleList(
            Block(
                model_cfg,
                block_checkpointing(
                    model_cfg.activation_checkpointing, model_cfg.activation_checkpointing_every, i
                ),
            )
            for i in range(model_cfg.n_layers)
        )
        self.norm = nn.RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps)
        self.lm_head = nn.Linear(model_cfg.d_model, model_cfg.vocab_size, bias=False)
        self.tie_weights()
        # Derived from the config, so kept out of the state_dict (and rebuilt by init_weights).
        self.register_buffer(
            "rope_cos",
            torch.empty(model_cfg.seq_len, model_cfg.d_model // model_cfg.n_heads),
            persistent=False,
        )
        self.register_buffer("rope_sin", torch.empty_like(self.rope_cos), persistent=False)
        if init:
            self.init_weights(seed)

    def tie_weights(self) -> None:
        """Share the embedding table with the head; `to_empty()` unties them, so init_weights re-ties."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int, source: dict[str, torch.Tensor] | None = None) -> None:
        """Weights as a function of `seed` alone (or copied from `source`, full tensors by our names:
        model.init_from); also after `to_empty()` from the meta device, and on sharded (DTensor)
        parameters, where each rank fills only its own shard."""
        self.tie_weights()
        self.init_buffers()
        for name, p in self.named_parameters():  # tied lm_head appears once, as embed_tokens
            self.init_parameter(name, p, seed, None if source is None else source[name])

    @torch.no_grad()
    def init_buffers(self) -> None:
        cfg = self.cfg
        cos, sin = rope_cos_sin(
            cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta, device=self.rope_cos.device
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_parameter(
        self, name: str, p: torch.Tensor, seed: int, value: torch.Tensor | None = None
    ) -> None:
        """Fill `p` (full, or a DTensor shard of it) with parameter `name`'s initial values.

        The full tensor is drawn on p's device from a generator seeded by (seed, name) and this rank
        keeps its slice: peak memory is one full parameter, and the values do not depend on how the
        parameter is sharded (they do depend on the device type: CPU and CUDA generators differ).
        `value`: the full tensor to use instead of drawing one (a Hugging Face start)."""
        if p.device.type == "meta":
            return  # a structure-only model (parameter counts, plans) has no values to fill
        cfg = self.cfg
        full = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        if value is not None:
            full.copy_(value)
        elif name.endswith("layernorm.weight") or name == "norm.weight":
            full.fill_(1.0)
        else:
            # GPT-2 style: projections that write into the residual stream are scaled down by depth.
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if residual else cfg.init_std
            generator = torch.Generator(device=p.device).manual_seed(parameter_seed(seed, name))
            full.normal_(0.0, std, generator=generator)
        local = p
        if isinstance(p, DTensor):
            shape, offset = torch_compat.local_shape_and_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            full = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        local.copy_(full)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> final-norm hidden states [B, T, d_model] (the head's input)."""
        T = tokens.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len={self.cfg.seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, vocab] in fp32; with targets [B, T], the mean
        next-token cross entropy instead (chunked: the full logits are never built)."""
        h = self.hidden(tokens)
        if targets is None:
            return self.lm_head(h).float()
        return chunked_cross_entropy(
            self.lm_head, h.flatten(0, 1), targets.flatten(), self.cfg.loss_chunk_tokens
        )

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [B, T+1] -> mean next-token cross entropy over all B*T positions."""
        return self(windows[:, :-1], windows[:, 1:])

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each block's forward (as torchtitan compiles per block): the blocks are
        identical, so one compiled graph serves all; module hooks (FSDP2's) stay outside the graph
        and parameter names do not change."""
        for block in self.layers:
            block.forward = torch.compile(block.forward, fullgraph=True, backend=backend)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(full_numel(p) for p in self.parameters())  # shared (tied) tensors count once
        if exclude_embeddings:
            n -= full_numel(self.embed_tokens.weight)
        return n
