"""Our AdamW over the model's parameters, in two groups: with and without weight decay.

No decay on 1-D parameters (RMSNorm gains, biases): decay pulls a gain toward 0, which means
"switch this channel off", not "be simpler". No decay on embeddings either, as in common practice
(Llama/OLMo-style recipes): a token's row gets a gradient only when the token occurs, but decoupled
decay shrinks every row at every step, so rare tokens' embeddings would decay toward 0 between
occurrences. With tied embeddings the output head is that same tensor and is left undecayed too; an
untied head is an ordinary matrix and is decayed.

A parameter's rank is read from its real shape (model.full_shape): under DeepSpeed ZeRO-3 the
optimizer is built after partitioning, when every parameter is an empty 1-D placeholder.
"""

from __future__ import annotations

from torch import nn

from evertrain.kernels.adamw import AdamW
from evertrain.pretrain.config import OptimConfig
from evertrain.pretrain.model.transformer import full_shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed matrices, undecayed rest], dropping an empty group. Shared (tied) tensors appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates tied parameters
        if not p.requires_grad:
            continue
        (decay if len(full_shape(p)) >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, schedule) -> AdamW:
    return AdamW(
        param_groups(model, optim_cfg.weight_decay),
        schedule,
        betas=optim_cfg.betas,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        impl=optim_cfg.impl,
    )
