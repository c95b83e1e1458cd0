"""Supervised fine-tuning: token-level NLL on assistant tokens, microbatch accumulation with global
(sum, count) normalisation, one jitted step with donated state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm.algorithms.losses import next_token_nll_sum
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.transformer import forward
from jaxrl_llm.parallel.rules import ShardingRules


def microbatch_grads(loss_sum_fn: Callable, params: Any, batch: dict[str, jax.Array], num_micro: int
                     ) -> tuple[Any, jax.Array, jax.Array]:
    """Sum of gradients and of (loss sum, count) over `num_micro` equal microbatches (lax.scan)."""
    def split(x):
        return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])

    micro = jax.tree.map(split, batch)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(carry, mb):
        g_acc, l_acc, n_acc = carry
        (l, n), g = jax.value_and_grad(loss_sum_fn, has_aux=True)(params, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, l_acc + l, n_acc + n), None

    (g, l, n), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
    return g, l, n


def make_sft_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, num_micro: int = 1,
                  rules: ShardingRules | None = None) -> Callable:
    """step(state, batch) -> (state, metrics); batch: input_ids, attention_mask, loss_mask [B, T]."""

    def loss_sum(params, mb):
        logits = forward(cfg, params, mb["input_ids"], mb["attention_mask"], rules=rules)
        return next_token_nll_sum(logits, mb["input_ids"], mb["loss_mask"])

    def step(state, batch):
        params = state["params"]
        g_sum, l_sum, n = microbatch_grads(loss_sum, params, batch, num_micro)
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), g_sum, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": l_sum / n, "tokens": n, "grad_norm": optax.global_norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step

