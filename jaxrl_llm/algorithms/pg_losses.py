"""Policy-gradient pieces for GRPO and its variants (DAPO, GSPO, REINFORCE): group advantages and the clipped
surrogate loss with a KL penalty and sampler/trainer importance correction. Pure functions of arrays.

Shapes: R rollouts (N prompts x G generations, each group of G consecutive), T tokens. Log-prob arrays are
aligned with their targets: logprobs_RT[i, t] is log p(token t of row i); `mask_RT` marks the generated tokens
that count (completion tokens of kept samples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32
KL_TYPES = ("k1", "k2", "k3")
KL_INPUT_CLAMP = 20.0  # |log r| and each token's KL term are clamped like NeMo RL's defaults
KL_OUTPUT_CLAMP = 10.0


def grpo_advantages(rewards, group_size: int, leave_one_out: bool = True, normalize_std: bool = True,
                    eps: float = 1e-6) -> jax.Array:
    """Group-relative advantages [N*G] from rewards [N*G] (groups of `group_size` consecutive rewards).

    Baseline b_i: the group mean, or with leave_one_out the mean of the other G-1 rewards. With normalize_std
    the advantage r_i - b_i is divided by (s_i + eps), where s_i is the unbiased group std, or under
    leave_one_out the unbiased std of the other G-1 rewards; where s_i is 0 (e.g. all rewards equal) the
    advantage is left unnormalised. G == 1 gives advantage 0 (the baseline is the reward itself).
    """
    r = jnp.asarray(rewards, _F32)
    G = int(group_size)
    if G < 1 or r.ndim != 1 or r.shape[0] % G:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of group_size={group_size}")
    r_NG = r.reshape(-1, G)
    if G == 1:
        return jnp.zeros_like(r)
    # Deviations about the group mean (not E[r^2] - E[r]^2, which loses the spread to fp32 round-off).
    d = r_NG - r_NG.mean(-1, keepdims=True)
    ss = (d**2).sum(-1, keepdims=True)
    if leave_one_out:
        m = G - 1
        # r_i - mean of the others = d_i * G / m. The others' spread is computed from their own deviations
        # ([N, G, G] with the diagonal masked), never as a difference of sums, so peers that agree give ~0.
        others = ~jnp.eye(G, dtype=bool)
        mean_o = jnp.sum(jnp.where(others, r_NG[:, None, :], 0.0), -1, keepdims=True) / m
        dev_o = jnp.where(others, r_NG[:, None, :] - mean_o, 0.0)
        std = jnp.sqrt((dev_o**2).sum(-1) / (m - 1)) if m > 1 else jnp.zeros_like(r_NG)
    else:
        std = jnp.broadcast_to(jnp.sqrt(ss / (G - 1)), r_NG.shape)
    adv = d * G / (G - 1) if leave_one_out else d
    if normalize_std:
        # Round-off leaves ~1e-8 of spread in groups of equal rewards: treat spread below 1e-6 as none.
        adv = jnp.where(std > 1e-6, adv / (std + eps), adv)
    return adv.reshape(-1)


def kl_penalty(logr_RT: jax.Array, kl_type: str) -> jax.Array:
    """Per-token estimators of KL(pi || ref) with log r = log ref - log pi (Schulman's k1, k2, k3)."""
    logr = jnp.clip(logr_RT, -KL_INPUT_CLAMP, KL_INPUT_CLAMP)
    if kl_type == "k1":
        return -logr
    if kl_type == "k2":
        return 0.5 * logr**2
    if kl_type == "k3":
        return jnp.exp(logr) - 1.0 - logr
    raise ValueError(f"kl_type={kl_type!r}; expected one of {KL_TYPES}")


def _masked_seq_mean(x_RT: jax.Array, m_RT: jax.Array) -> jax.Array:
    return (x_RT * m_RT).sum(-1) / jnp.maximum(m_RT.sum(-1), 1.0)


def policy_gradient_loss_sum(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, clip_low: float = 0.2,
                             clip_high: float = 0.2, dual_clip: float | None = None, kl_coef: float = 0.0,
                             kl_type: str = "k3", token_level: bool = True, sequence_level_ratio: bool = False,
                             sampler_logprobs=None, tis_cap: float | None = None, reinforce: bool = False,
                             kl_logprobs=None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The (sum, count, metrics) form of `policy_gradient_loss`: loss summed over tokens (token_level) or over
    per-sequence token means (sequence level), the matching count (valid tokens or valid sequences) and
    metric sums normalised the same way, plus `ratio_min`/`ratio_max` (reduce those with min/max).

    Summing over microbatches and dividing by the summed count is the full batch's `policy_gradient_loss`.
    kl_logprobs: the current policy's log-probs for the KL term when they differ from `logprobs` (the sampler's
    top-k/top-p filter applies to the ratio, not to the KL: NeMo RL's convention); default `logprobs`.
    """
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type={kl_type!r}; expected one of {KL_TYPES}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip}: must be > 1")
    if sequence_level_ratio and token_level:
        raise ValueError("sequence_level_ratio (GSPO) needs token_level=False (a per-sequence mean loss)")
    if tis_cap is not None and (sampler_logprobs is None or tis_cap <= 0):
        raise ValueError(f"tis_cap={tis_cap} needs sampler_logprobs and must be > 0")
    lp = logprobs.astype(_F32)
    m = mask.astype(_F32)
    old = jax.lax.stop_gradient(old_logprobs.astype(_F32))
    adv = jnp.asarray(advantages, _F32)
    adv = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, lp.shape)

    if reinforce:  # plain policy gradient: -A * log p, no ratio (REINFORCE / RLOO)
        ratio = jnp.exp(lp - jax.lax.stop_gradient(lp))  # value 1, for the metrics only
        per_tok = -adv * lp
        clipped = jnp.zeros_like(lp)
    else:
        if sequence_level_ratio:  # GSPO: exp of the mean per-token log-ratio over each sequence
            ratio = jnp.broadcast_to(jnp.exp(_masked_seq_mean(lp - old, m))[:, None], lp.shape)
        else:
            ratio = jnp.exp(lp - old)
        ratio_c = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
        unclipped_loss, clipped_loss = -adv * ratio, -adv * ratio_c
        per_tok = jnp.maximum(unclipped_loss, clipped_loss)
        clipped = (clipped_loss > unclipped_loss).astype(_F32)
        if dual_clip is not None:
            dual = (adv < 0) & (per_tok > -adv * dual_clip)
            per_tok = jnp.where(adv < 0, jnp.minimum(per_tok, -adv * dual_clip), per_tok)
            clipped = jnp.maximum(clipped, dual.astype(_F32))

    weight = jnp.ones_like(lp)
    if sampler_logprobs is not None:  # importance weight between the trainer's old policy and the sampler's
        gen = jax.lax.stop_gradient(sampler_logprobs.astype(_F32))
        w = jnp.exp(((old - gen) * m).sum(-1))[:, None] if sequence_level_ratio else jnp.exp(old - gen)
        w = jnp.where(jnp.isfinite(w), w, 0.0)
        if tis_cap is not None:
            w = jnp.clip(w, 0.0, tis_cap)
        weight = jnp.broadcast_to(w, lp.shape)

    kl_tok = jnp.zeros_like(lp)
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    lpk = lp if kl_logprobs is None else kl_logprobs.astype(_F32)
    if kl_coef:
        ref = jax.lax.stop_gradient(ref_logprobs.astype(_F32))
        # exp(lp - sg(lp)) == 1 in value; it carries the score-function term of the KL gradient (NeMo RL).
        kl_tok = jnp.clip(kl_coef * jnp.exp(lpk - jax.lax.stop_gradient(lpk)) * kl_penalty(ref - lpk, kl_type),
                          -KL_OUTPUT_CLAMP, KL_OUTPUT_CLAMP)

    actor_tok = weight * per_tok
    kl_raw = (jax.lax.stop_gradient(kl_penalty(ref_logprobs.astype(_F32) - lpk, kl_type))
              if ref_logprobs is not None else jnp.zeros_like(lp))
    # Sample-based entropy estimate E[-log p] (importance-weighted towards the sampler when its log-probs exist).
    ent_w = jax.lax.stop_gradient(jnp.exp(lp - sampler_logprobs.astype(_F32))) if sampler_logprobs is not None \
        else 1.0
    sg = jax.lax.stop_gradient
    per_token = {"actor_loss": actor_tok, "kl_loss": kl_tok, "kl": kl_raw, "clip_fraction": clipped,
                 "ratio_mean": sg(ratio), "is_weight_mean": weight, "approx_entropy": sg(-ent_w * lp),
                 "advantage_mean": adv}
    if token_level:
        agg = {k: (v * m).sum() for k, v in per_token.items()}
        count = m.sum()
    else:
        valid = (m.sum(-1) > 0).astype(_F32)
        agg = {k: (_masked_seq_mean(v, m) * valid).sum() for k, v in per_token.items()}
        count = valid.sum()
    loss_sum = agg["actor_loss"] + agg["kl_loss"]
    big = jnp.finfo(_F32).max
    metrics = {k: sg(v) for k, v in agg.items()}
    metrics["ratio_min"] = sg(jnp.where(m > 0, ratio, big).min())
    metrics["ratio_max"] = sg(jnp.where(m > 0, ratio, -big).max())
    return loss_sum, count, metrics


def policy_gradient_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, clip_low: float = 0.2,
                         clip_high: float = 0.2, dual_clip: float | None = None, kl_coef: float = 0.0,
                         kl_type: str = "k3", token_level: bool = True, sequence_level_ratio: bool = False,
                         sampler_logprobs=None, tis_cap: float | None = None, normalizer=None,
                         reinforce: bool = False, kl_logprobs=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss (PPO/GRPO surrogate) plus a KL penalty; [R, T] inputs, advantages [R] or
    [R, T]. Returns (loss, metrics).

    Per token: ratio r = exp(logp - old_logp) (GSPO, sequence_level_ratio: exp of its mean over the sequence),
    clipped r_c = clip(r, 1 - clip_low, 1 + clip_high), loss l = max(-A r, -A r_c); dual_clip c (> 1) caps the
    loss of negative-advantage tokens at -A c; reinforce=True uses l = -A logp (no ratio). KL to the reference
    (if kl_coef): kl_coef * k(log ref - logp) with kl_type k1 | k2 | k3. With sampler_logprobs, each
    token's loss is weighted by w = exp(old_logp - sampler_logp) (the correction between the sampler and the
    trainer; per sequence, exp of the summed difference, under GSPO), truncated to [0, tis_cap] when tis_cap
    is given (TIS). Aggregation: token_level divides the sum over valid tokens by their count; otherwise
    each sequence's token mean is averaged over valid sequences. normalizer: the global count (tokens or
    sequences) over all microbatches of the step; None uses this batch's own count.
    metrics: actor_loss, kl_loss, kl (the unscaled estimator), clip_fraction, ratio_mean/min/max,
    is_weight_mean, approx_entropy (sample estimate of the policy's entropy), advantage_mean.
    """
    s, n, sums = policy_gradient_loss_sum(
        logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type, token_level=token_level,
        sequence_level_ratio=sequence_level_ratio, sampler_logprobs=sampler_logprobs, tis_cap=tis_cap,
        reinforce=reinforce, kl_logprobs=kl_logprobs)
    norm = jnp.maximum(n if normalizer is None else jnp.asarray(normalizer, _F32), 1e-8)
    metrics = {k: (v if k in ("ratio_min", "ratio_max") else v / norm) for k, v in sums.items()}
    return s / norm, metrics
