"""Optimizer from config: AdamW, warmup then cosine/linear/constant decay, grad-norm clipping,
no weight decay on norms and biases. Its state is fp32 whatever the parameters' dtype (bf16(0.999) is 1.0: a
bf16 second moment would never decay), and so are the updates it returns; `apply_updates` adds them to
low-precision parameters with stochastic rounding."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

_F32 = jnp.float32


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


def _f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(_F32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def fp32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on fp32 views of the gradients and parameters: fp32 state and fp32 updates."""
    def init(params):
        return inner.init(_f32(params))

    def update(updates, state, params=None):
        return inner.update(_f32(updates), state, None if params is None else _f32(params))

    return optax.GradientTransformation(init, update)


def _mix32(h: jax.Array) -> jax.Array:
    """lowbias32: an integer hash whose output bits each depend on every input bit."""
    for m in (0x7FEB352D, 0x846CA68B):
        h = (h ^ (h >> 16)) * jnp.uint32(m)
    return h ^ (h >> 16)


def _noise16(shape: tuple[int, ...], seed: jax.Array, flat_limit: int = 2**32) -> jax.Array:
    """16 noise bits per element [shape] (uint32 < 2**16): a hash of the element's index and `seed`. A leaf of
    `flat_limit` (2**32) elements or more (a stacked 70B MLP weight) hashes its leading index apart, as a uint32 flat
    index would repeat every 2**32 elements (the same noise, step after step, for elements that far apart)."""
    size = math.prod(shape)
    if size < flat_limit or len(shape) < 2:
        h = jax.lax.iota(jnp.uint32, size).reshape(shape) ^ seed
    else:
        lead = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
        rest = jnp.broadcast_to(jax.lax.iota(jnp.uint32, math.prod(shape[1:])).reshape(shape[1:]), shape)
        h = rest ^ _mix32(lead ^ seed)
    return _mix32(h) & jnp.uint32(0xFFFF)


def _stochastic_round_bf16(x_f32: jax.Array, key: jax.Array) -> jax.Array:
    """x rounded to bf16 up or down with probabilities in proportion to its distance from each (unbiased, so
    updates far below a bf16 step still move the weights on average); non-finite values round to nearest.

    The 16 noise bits of each element are an integer hash (lowbias32) of its index and a seed drawn from `key`
    (`_noise16`): elementwise, so the rounding fuses into the update. jax.random.bits over the whole leaf
    materialised its threefry counters and output, 16 bytes of temporaries per parameter."""
    noise = _noise16(x_f32.shape, jax.random.bits(key, (), jnp.uint32))
    bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
    up = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), _F32)
    return jnp.where(jnp.isfinite(x_f32), up, x_f32).astype(jnp.bfloat16)


def apply_updates(params: Any, updates: Any, step: jax.Array) -> Any:
    """params + updates, computed in fp32. fp32 parameters take the sum; bf16 parameters take it stochastically
    rounded (round-to-nearest would drop every update under half a bf16 step: at lr 2e-5, nearly all of a
    SmolLM2's weights would never move), from a key that depends only on `step` and the leaf, so a resumed run
    rounds as the uninterrupted one; other dtypes round to nearest."""
    key = jax.random.fold_in(jax.random.key(0x5EED), step)
    leaves, treedef = jax.tree.flatten(params)
    ups = treedef.flatten_up_to(updates)
    out = []
    for i, (p, u) in enumerate(zip(leaves, ups, strict=True)):
        total = p.astype(_F32) + u.astype(_F32)
        if p.dtype == _F32:
            out.append(total)
        elif p.dtype == jnp.bfloat16:
            out.append(_stochastic_round_bf16(total, jax.random.fold_in(key, i)))
        else:
            out.append(total.astype(p.dtype))
    return jax.tree.unflatten(treedef, out)


def make_optimizer(lr: float, max_steps: int, *, warmup_steps: int = 0, schedule: str = "cosine",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float = 1.0, final_lr_fraction: float = 0.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    sched = learning_rate_schedule(lr, max_steps, warmup_steps, schedule, final_lr_fraction)
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return fp32_state(optax.chain(*parts)), sched
