"""Vocabulary projections a few positions at a time, so that the [B, T, V] fp32 logits never exist whole.

A loss needs, per position, a few numbers that depend on the whole vocabulary row (the target's log-prob, a
logsumexp, an entropy), never the row itself. `over_positions` computes such numbers `chunk` positions at a time
under `lax.scan`, with each chunk rematerialised in the backward pass: the live logits shrink from
B x T x V x 4 bytes (plus as much again for their gradient) to B x chunk x V x 4, at the price of one more
vocabulary matmul per position in training. `ModelConfig.logits_chunk` sets the size (0: all positions at once).
A body that projects onto the vocabulary reads the head through `fp32_head`, so that its gradient is summed over the
chunks in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# The vocabulary-projection weights of models/params.py (tied: the embedding; `lm_head_t`: the decode layout's).
_HEAD = ("embed", "lm_head", "lm_head_t")


def fp32_head(params: dict[str, Any], chunk: int) -> dict[str, Any]:
    """`params` for a body that `over_positions` runs `chunk` positions at a time, with the vocabulary weights stored
    in a low-precision dtype upcast to fp32 (others, and all of them when chunk <= 0, as they are).

    The body closes over the head, and the backward scan sums the gradient of what its body closes over in that
    value's dtype: bf16 weights took each chunk's share rounded into a bf16 running sum (a tied head's gradient over
    512 chunks of one position was 5% off the fp32 one, 0.2% unchunked; an 8192-token row in chunks of 32: 2%). Upcast
    here, the sum is fp32 and rounded to the weights' dtype once. The body's cast to the compute dtype (`lm_logits`)
    gives back the same values; XLA folds the two casts, so the cost is the fp32 sum (the head's bf16 size again)."""
    if chunk <= 0:
        return params
    return {k: v.astype(jnp.float32) if k in _HEAD and v.dtype != jnp.float32 else v for k, v in params.items()}


def over_positions(fn: Callable[..., tuple[jax.Array, ...]], chunk: int, h_BKD: jax.Array, *per_position: jax.Array,
                   save: tuple[str, ...] = ()) -> tuple[jax.Array, ...]:
    """fn(h [B, c, D], *xs [B, c, ...]) -> tuple of [B, c, ...] arrays, applied to `chunk` positions at a time.

    Returns what fn(h_BKD, *per_position) returns (same values: each position's outputs depend on that position's
    inputs alone). chunk <= 0, or K <= chunk: one call. Otherwise the K positions run as n = ceil(K / chunk) equal
    chunks of ceil(K / n) <= chunk positions (K padded with fewer than n zero positions, whose outputs are dropped;
    padded to a multiple of `chunk` instead, K = 1.1 x chunk would project 1.8 x K positions) under lax.scan, each
    chunk recomputed in the backward pass (jax.checkpoint), so neither pass keeps more than one chunk's logits.
    save: names (`jax.ad_checkpoint.checkpoint_name`) of values inside fn kept from the forward pass instead of
    recomputed (small per-position values whose computation is costly, as the bisection behind a top-k/top-p threshold).
    """
    K = h_BKD.shape[1]
    if chunk <= 0 or K <= chunk:
        return fn(h_BKD, *per_position)
    n = -(-K // chunk)
    chunk = -(-K // n)
    pad = n * chunk - K

    def split(x):  # [B, K, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def body(_, xs):
        return None, fn(*xs)

    policy = jax.checkpoint_policies.save_only_these_names(*save) if save else None
    _, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False, policy=policy), None,
                          tuple(split(x) for x in (h_BKD, *per_position)))
    # [n, B, chunk, ...] -> [B, K, ...]
    return tuple(jnp.moveaxis(o, 0, 1).reshape(o.shape[1], n * chunk, *o.shape[3:])[:, :K] for o in out)
