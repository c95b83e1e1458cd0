"""Advantage estimators beyond GRPO's group baseline, and the reward transforms applied before them.

Pure functions of arrays (jax.numpy; the RL loop calls them on host values). R rollouts = N prompts x G
generations, each group of G consecutive; T token columns; `mask_RT` marks the completion tokens that count.

- `reinforce_pp_advantages`: REINFORCE++ (baseline variant): r_i - group mean (or r_i), optionally minus a
  per-token KL penalty (KL in the reward instead of the loss), then whitened over all valid tokens of the batch.
- `gdpo_advantages`: GDPO for several reward components: a GRPO advantage per component, their weighted sum,
  then whitened over the batch's samples.
- `scale_rewards`: clamp to [source_min, source_max] and map affinely onto [target_min, target_max].
- `stop_properly_penalty`: truncated samples' rewards times a coefficient (ProRL v2).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxrl_llm.algorithms.pg_losses import grpo_advantages

_F32 = jnp.float32
ADV_ESTIMATORS = ("grpo", "reinforce_plus_plus", "gdpo")


def _groups(rewards, group_size: int) -> jax.Array:
    r = jnp.asarray(rewards, _F32)
    if group_size < 1 or r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of group_size={group_size}")
    return r.reshape(-1, group_size)


def reinforce_pp_advantages(rewards, group_size: int, mask_RT, *, minus_baseline: bool = True, kl_RT=None,
                            kl_coef: float = 0.0) -> jax.Array:
    """REINFORCE++ advantages [R, T].

    a_i = r_i - mean of its group (minus_baseline; plain mean, no leave-one-out) or r_i; per token
    A_it = a_i - kl_coef * kl_it when a per-token KL estimate kl_RT (old policy vs reference) is given; then
    A = (A - mu) / sqrt(max(var, 1e-8)) with mu and var (biased) over the valid tokens of the whole batch.
    """
    r_NG = _groups(rewards, group_size)
    a = (r_NG - r_NG.mean(-1, keepdims=True)) if minus_baseline else r_NG
    m = jnp.asarray(mask_RT, _F32)
    if m.ndim != 2 or m.shape[0] != a.size:
        raise ValueError(f"mask of shape {m.shape} does not match {a.size} rewards")
    adv = jnp.broadcast_to(a.reshape(-1, 1), m.shape)
    if kl_RT is not None and kl_coef:
        adv = adv - kl_coef * jnp.asarray(kl_RT, _F32)
    n = jnp.maximum(m.sum(), 1.0)
    mu = (adv * m).sum() / n
    var = (((adv - mu) ** 2) * m).sum() / n
    return (adv - mu) * jax.lax.rsqrt(jnp.maximum(var, 1e-8))


def gdpo_advantages(components: Sequence, group_size: int, weights: Sequence[float] | None = None, *,
                    leave_one_out: bool = True, normalize_std: bool = True) -> jax.Array:
    """GDPO advantages [R] from K >= 2 reward components (each [R]; order = the order of `weights`).

    A = sum_k w_k * grpo_advantages(r_k) (each component's own group baseline and std), then whitened over the
    batch: (A - mean) / std with the unbiased std, or only centred when that std is 0. weights default to 1.
    """
    if len(components) < 2:
        raise ValueError(f"GDPO needs at least 2 reward components, got {len(components)}")
    w = [1.0] * len(components) if weights is None else [float(x) for x in weights]
    if len(w) != len(components):
        raise ValueError(f"{len(w)} reward weights for {len(components)} reward components")
    adv = sum(wk * grpo_advantages(rk, group_size, leave_one_out, normalize_std)
              for wk, rk in zip(w, components, strict=True))
    mu = adv.mean()
    std = jnp.sqrt(((adv - mu) ** 2).sum() / max(adv.shape[0] - 1, 1))
    return jnp.where(std > 0, (adv - mu) / jnp.where(std > 0, std, 1.0), adv - mu)


def scale_rewards(rewards, source_min: float, source_max: float, target_min: float, target_max: float) -> jax.Array:
    """r' = target_min + (clip(r, source_min, source_max) - source_min) / (source_max - source_min) x
    (target_max - target_min)."""
    if not source_max > source_min:
        raise ValueError(f"reward scaling: source_max={source_max} must exceed source_min={source_min}")
    r = jnp.clip(jnp.asarray(rewards, _F32), source_min, source_max)
    return target_min + (r - source_min) / (source_max - source_min) * (target_max - target_min)


def stop_properly_penalty(rewards, truncated, coef: float) -> jax.Array:
    """Rewards of samples that ran out of tokens without a stop token, times `coef` (others unchanged)."""
    r = jnp.asarray(rewards, _F32)
    return jnp.where(jnp.asarray(truncated, bool), coef * r, r)
