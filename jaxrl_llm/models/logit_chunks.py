"""Vocabulary projections a few positions at a time, so that the [B, T, V] fp32 logits never exist whole.

A loss needs, per position, a few numbers that depend on the whole vocabulary row (the target's log-prob, a
logsumexp, an entropy), never the row itself. `over_positions` computes such numbers `chunk` positions at a time
under `lax.scan`, with each chunk rematerialised in the backward pass: the live logits shrink from
B x T x V x 4 bytes (plus as much again for their gradient) to B x chunk x V x 4, at the price of one more
vocabulary matmul per position in training. `ModelConfig.logits_chunk` sets the size (0: all positions at once).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def over_positions(fn: Callable[..., tuple[jax.Array, ...]], chunk: int, h_BKD: jax.Array, *per_position: jax.Array
                   ) -> tuple[jax.Array, ...]:
    """fn(h [B, c, D], *xs [B, c, ...]) -> tuple of [B, c, ...] arrays, applied to `chunk` positions at a time.

    Returns what fn(h_BKD, *per_position) returns (same values: each position's outputs depend on that position's
    inputs alone). chunk <= 0, or K <= chunk: one call. Otherwise K is padded with zeros to a multiple of `chunk`
    (the padding's outputs are dropped), the chunks run under lax.scan and each is recomputed in the backward pass
    (jax.checkpoint), so neither pass keeps more than one chunk's logits.
    """
    K = h_BKD.shape[1]
    if chunk <= 0 or K <= chunk:
        return fn(h_BKD, *per_position)
    n = -(-K // chunk)
    pad = n * chunk - K

    def split(x):  # [B, K, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def body(_, xs):
        return None, fn(*xs)

    _, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, tuple(split(x) for x in (h_BKD,
                                                                                                 *per_position)))
    # [n, B, chunk, ...] -> [B, K, ...]
    return tuple(jnp.moveaxis(o, 0, 1).reshape(o.shape[1], n * chunk, *o.shape[3:])[:, :K] for o in out)
