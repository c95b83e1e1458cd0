"""Pure loss functions. Each returns (sum, count) pieces so that accumulation over microbatches, divided
by the global count, equals the full-batch loss exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per position, fp32 log-softmax. [B, T]."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def next_token_nll_sum(logits_BTV: jax.Array, input_ids_BT: jax.Array, loss_mask_BT: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(x_{t+1} | x_<=t) over positions whose target has loss_mask 1, number of such tokens)."""
    lp = token_logprobs(logits_BTV[:, :-1], input_ids_BT[:, 1:])
    m = loss_mask_BT[:, 1:].astype(jnp.float32)
    return -(lp * m).sum(), m.sum()
