"""Optimizer from config: AdamW, warmup then cosine/linear/constant decay, grad-norm clipping,
no weight decay on norms and biases."""

from __future__ import annotations

import re

import jax
import optax


def learning_rate_schedule(lr: float, max_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                           final_lr_fraction: float = 0.0) -> optax.Schedule:
    warmup_steps = max(0, min(warmup_steps, max_steps))
    decay_steps = max(1, max_steps - warmup_steps)
    end = lr * final_lr_fraction
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=final_lr_fraction)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optimizer.schedule={schedule!r}; expected cosine | linear | constant")
    if not warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


# The bias leaves of models/params.py. They are matched by name: the q/k/v biases are [L, heads, head_dim], as
# many axes as a stacked matrix.
_BIAS = re.compile(r"b[qkvo]|b_\w+")


def decay_mask(params: dict) -> dict:
    """True for matrices (weight decay), False for norms, biases and other vectors."""
    def leaf(path, x):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        stacked = len(path) > 1 and getattr(path[0], "key", None) == "layers"
        return (x.ndim - int(stacked)) >= 2 and "norm" not in name and not _BIAS.fullmatch(name)
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(lr: float, max_steps: int, *, warmup_steps: int = 0, schedule: str = "cosine",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float = 1.0, final_lr_fraction: float = 0.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    sched = learning_rate_schedule(lr, max_steps, warmup_steps, schedule, final_lr_fraction)
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), sched
