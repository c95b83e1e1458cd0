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
TIS_TYPES = ("tis", "icepop", "seq-mask-tis")
KL_INPUT_CLAMP = 20.0  # |log r| and each token's KL term are clamped like NeMo RL's defaults
KL_OUTPUT_CLAMP = 10.0
# The log-prob of a token outside the top-k/top-p set in the trainer's recomputation (rounding can put a sampled token
# at the set's edge outside it: 0.1-0.5% of tokens with SmolLM2 in bf16): finite, so masked sums stay finite; such a
# token has no gradient and is left out of the metrics that average log-probs (approx_entropy, the positive NLL).
LOGP_FLOOR = -1e4
# |log ratio| bound before exp. Log-probs of tokens outside the top-k/top-p set are the -1e4 floor (LOGP_FLOOR):
# once an update brings such a token back, exp(lp - old) would be inf, and inf x mask 0, or the gradient of the
# branch jnp.maximum did not take, NaN. e^20 (~5e8) is far beyond any clip range, so no real ratio is changed.
LOG_RATIO_CLAMP = 20.0


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


def _exp_or_zero(x: jax.Array) -> jax.Array:
    """exp(x) where it is finite, else 0 (NeMo RL zeroes non-finite weights), with a finite gradient everywhere:
    the inner where keeps exp's argument finite in the branch that is not taken."""
    ok = jnp.isfinite(jnp.exp(jax.lax.stop_gradient(x)))
    return jnp.where(ok, jnp.exp(jnp.where(ok, x, 0.0)), 0.0)


def _check_options(*, kl_type, dual_clip, token_level, sequence_level_ratio, sampler_logprobs, tis_cap, reinforce,
                   cispo, tis_type, tis_min, on_policy_kl, positive_nll_weight, positive_rows) -> None:
    """ValueError for an impossible combination of loss options, naming the options."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type={kl_type!r}; expected one of {KL_TYPES}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip}: must be > 1")
    if sequence_level_ratio and token_level:
        raise ValueError("sequence_level_ratio (GSPO) needs token_level=False (a per-sequence mean loss)")
    if tis_cap is not None and (sampler_logprobs is None or tis_cap <= 0):
        raise ValueError(f"tis_cap={tis_cap} needs sampler_logprobs and must be > 0")
    if tis_type not in TIS_TYPES:
        raise ValueError(f"tis_type={tis_type!r}; expected one of {TIS_TYPES}")
    if tis_min is not None and (tis_min < 0 or (tis_cap is not None and tis_min > tis_cap)):
        raise ValueError(f"tis_min={tis_min}: must be in [0, tis_cap={tis_cap}]")
    if tis_cap is not None and tis_type != "tis" and tis_min is None:
        raise ValueError(f"tis_type={tis_type!r} needs tis_min (the lower bound of the kept weights)")
    if tis_type == "seq-mask-tis" and sequence_level_ratio:
        raise ValueError("tis_type='seq-mask-tis' keeps the raw weights of the sequences it does not mask: with "
                         "sequence_level_ratio (GSPO) that is each sequence's exp(sum of log-weights), untruncated")
    if cispo and (not token_level or dual_clip is not None or reinforce or sequence_level_ratio):
        raise ValueError("cispo needs token_level=True and excludes dual_clip, reinforce and sequence_level_ratio")
    if on_policy_kl and sampler_logprobs is None:
        raise ValueError("on_policy_kl needs sampler_logprobs")
    if positive_nll_weight < 0:
        raise ValueError(f"positive_nll_weight={positive_nll_weight}: must be >= 0")
    if positive_nll_weight and positive_rows is None:
        raise ValueError("positive_nll_weight > 0 needs positive_rows (the samples with reward > 0)")


def _truncate_is_weight(w: jax.Array, log_w_RT: jax.Array, m_RT: jax.Array, tis_type: str,
                        tis_min: float | None, tis_cap: float) -> jax.Array:
    """Truncated importance weights: "tis" clips w to [tis_min or 0, tis_cap]; "icepop" zeroes weights outside
    [tis_min, tis_cap]; "seq-mask-tis" zeroes every weight of a sequence whose geometric-mean weight
    exp(mean_t log w) lies outside [tis_min, tis_cap] and keeps the others raw. w: [R, T] or [R, 1] (GSPO)."""
    if tis_type == "tis":
        return jnp.clip(w, 0.0 if tis_min is None else tis_min, tis_cap)
    if tis_type == "icepop":
        return jnp.where((w >= tis_min) & (w <= tis_cap), w, 0.0)
    seq_w = jnp.exp(_masked_seq_mean(log_w_RT, m_RT))[:, None]
    return jnp.where((seq_w >= tis_min) & (seq_w <= tis_cap), w, 0.0)


def policy_gradient_loss_sum(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, clip_low: float = 0.2,
                             clip_high: float = 0.2, dual_clip: float | None = None, kl_coef: float = 0.0,
                             kl_type: str = "k3", token_level: bool = True, sequence_level_ratio: bool = False,
                             sampler_logprobs=None, tis_cap: float | None = None, reinforce: bool = False,
                             kl_logprobs=None, cispo: bool = False, tis_type: str = "tis",
                             tis_min: float | None = None, on_policy_kl: bool = False,
                             positive_nll_weight: float = 0.0, positive_rows=None, nll_scale=None
                             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The (sum, count, metrics) form of `policy_gradient_loss`: loss summed over tokens (token_level) or over
    per-sequence token means (sequence level), the matching count (valid tokens or valid sequences) and
    metric sums normalised the same way, plus `ratio_min`/`ratio_max` (reduce those with min/max).

    Summing over microbatches and dividing by the summed count is the full batch's `policy_gradient_loss`.
    kl_logprobs: the current policy's log-probs for the KL term when they differ from `logprobs` (the sampler's
    top-k/top-p filter applies to the ratio, not to the KL: NeMo RL's convention); default `logprobs`.
    nll_scale: the factor on the positive-example NLL sum, so that after dividing by the global count the term is
    positive_nll_weight x the mean NLL over positive tokens: global count / global positive-token count; default
    this batch's count / its positive-token count.
    """
    _check_options(kl_type=kl_type, dual_clip=dual_clip, token_level=token_level,
                   sequence_level_ratio=sequence_level_ratio, sampler_logprobs=sampler_logprobs, tis_cap=tis_cap,
                   reinforce=reinforce, cispo=cispo, tis_type=tis_type, tis_min=tis_min, on_policy_kl=on_policy_kl,
                   positive_nll_weight=positive_nll_weight, positive_rows=positive_rows)
    lp = logprobs.astype(_F32)
    m = mask.astype(_F32)
    old = jax.lax.stop_gradient(old_logprobs.astype(_F32))
    adv = jnp.asarray(advantages, _F32)
    adv = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, lp.shape)
    # Log-ratios: 0 at masked positions (padding, observations), bounded elsewhere (LOG_RATIO_CLAMP).
    bounded = lambda x: jnp.clip(jnp.where(m > 0, x, 0.0), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_ratio = bounded(lp - old)

    if reinforce:  # plain policy gradient: -A * log p, no ratio (REINFORCE / RLOO)
        ratio = jnp.exp(lp - jax.lax.stop_gradient(lp))  # value 1, for the metrics only
        per_tok = -adv * lp
        clipped = jnp.zeros_like(lp)
    elif cispo:  # CISPO: the clipped ratio as a fixed weight on -A log p; clipped tokens keep their gradient
        ratio = jnp.exp(log_ratio)
        ratio_c = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
        per_tok = -adv * jax.lax.stop_gradient(ratio_c) * lp
        clipped = (ratio_c != ratio).astype(_F32)
    else:
        if sequence_level_ratio:  # GSPO: exp of the mean per-token log-ratio over each sequence
            # Tokens outside the trainer's top-k/top-p set (the LOGP_FLOOR) are left out of the mean, as NeMo RL's
            # actor_token_mask does: their log-ratio (the -20 bound) would drag the whole sequence's ratio down; and
            # so are those outside the old policy's set (a recomputed old log-prob at the floor, the token back in the
            # set after an update), whose +20 bound pushed it up (e^5 for 4 tokens: a negative advantage's gradient
            # on every other token of the sequence x148).
            keep = m * (lp > LOGP_FLOOR) * (old > LOGP_FLOOR)
            ratio = jnp.broadcast_to(jnp.exp(_masked_seq_mean(log_ratio, keep))[:, None], lp.shape)
        else:
            ratio = jnp.exp(log_ratio)
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
        log_w = jnp.where(m > 0, old - gen, 0.0)
        # A sequence's weight leaves out the tokens outside the trainer's top-k/top-p set (old at the floor: NeMo RL
        # masks its -inf out): their -1e4 zeroed the whole sequence's weight (GSPO) or its geometric mean.
        m_in = m * (old > LOGP_FLOOR)
        w = _exp_or_zero((log_w * m_in).sum(-1))[:, None] if sequence_level_ratio else _exp_or_zero(log_w)
        if tis_cap is not None:
            w = _truncate_is_weight(w, log_w, m_in, tis_type, tis_min, tis_cap)
        weight = jnp.broadcast_to(w, lp.shape)

    kl_tok = jnp.zeros_like(lp)
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    lpk = lp if kl_logprobs is None else kl_logprobs.astype(_F32)
    if kl_coef:
        ref = jax.lax.stop_gradient(ref_logprobs.astype(_F32))
        # exp(lp - sg(lp)) == 1 in value; it carries the score-function term of the KL gradient (NeMo RL).
        if on_policy_kl:  # importance weight towards the sampler: an estimate of KL under the current policy
            v = _exp_or_zero(jnp.where(m > 0, lpk - jax.lax.stop_gradient(sampler_logprobs.astype(_F32)), 0.0))
        else:
            v = jnp.exp(lpk - jax.lax.stop_gradient(lpk))
        # NeMo RL's calculate_kl: the weight has no gradient where the input clamp binds, and the output clamp
        # bounds the weighted estimator v * k, before the coefficient: kl_coef * clip(v * k, +-10).
        v = jnp.where(jnp.abs(ref - lpk) <= KL_INPUT_CLAMP, v, jax.lax.stop_gradient(v))
        kl_tok = kl_coef * jnp.clip(v * kl_penalty(ref - lpk, kl_type), -KL_OUTPUT_CLAMP, KL_OUTPUT_CLAMP)

    actor_tok = weight * per_tok
    kl_raw = (jax.lax.stop_gradient(kl_penalty(ref_logprobs.astype(_F32) - lpk, kl_type))
              if ref_logprobs is not None else jnp.zeros_like(lp))
    # Sample-based entropy estimate E[-log p] (importance-weighted towards the sampler when its log-probs exist).
    ent_w = jax.lax.stop_gradient(_exp_or_zero(jnp.where(m > 0, lp - sampler_logprobs.astype(_F32), 0.0))) \
        if sampler_logprobs is not None else 1.0
    lp_in = jnp.where(lp > LOGP_FLOOR, lp, 0.0)  # tokens outside the top-k/top-p set count 0, not -1e4
    sg = jax.lax.stop_gradient
    per_token = {"actor_loss": actor_tok, "kl_loss": kl_tok, "kl": kl_raw, "clip_fraction": clipped,
                 "ratio_mean": sg(ratio), "is_weight_mean": weight, "approx_entropy": sg(-ent_w * lp_in),
                 "advantage_mean": adv}
    if token_level:
        agg = {k: jnp.where(m > 0, v * m, 0.0).sum() for k, v in per_token.items()}
        count = m.sum()
    else:
        valid = (m.sum(-1) > 0).astype(_F32)
        agg = {k: (_masked_seq_mean(jnp.where(m > 0, v, 0.0), m) * valid).sum() for k, v in per_token.items()}
        count = valid.sum()
    nll_term = jnp.zeros((), _F32)
    if positive_nll_weight:
        pos_m = m * jnp.asarray(positive_rows, _F32).reshape(-1, 1)
        n_pos = pos_m.sum()
        scale = count / jnp.maximum(n_pos, 1.0) if nll_scale is None else jnp.asarray(nll_scale, _F32)
        nll_term = positive_nll_weight * scale * (-(lp_in * pos_m)).sum()
    loss_sum = agg["actor_loss"] + agg["kl_loss"] + nll_term
    big = jnp.finfo(_F32).max
    metrics = {k: sg(v) for k, v in agg.items()}
    metrics["positive_nll_loss"] = sg(nll_term)
    metrics["ratio_min"] = sg(jnp.where(m > 0, ratio, big).min())
    metrics["ratio_max"] = sg(jnp.where(m > 0, ratio, -big).max())
    return loss_sum, count, metrics


def policy_gradient_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, clip_low: float = 0.2,
                         clip_high: float = 0.2, dual_clip: float | None = None, kl_coef: float = 0.0,
                         kl_type: str = "k3", token_level: bool = True, sequence_level_ratio: bool = False,
                         sampler_logprobs=None, tis_cap: float | None = None, normalizer=None,
                         reinforce: bool = False, kl_logprobs=None, cispo: bool = False, tis_type: str = "tis",
                         tis_min: float | None = None, on_policy_kl: bool = False,
                         positive_nll_weight: float = 0.0, positive_rows=None
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss (PPO/GRPO surrogate) plus a KL penalty; [R, T] inputs, advantages [R] or
    [R, T]. Returns (loss, metrics).

    Per token: ratio r = exp(logp - old_logp) (GSPO, sequence_level_ratio: exp of its mean over the sequence),
    clipped r_c = clip(r, 1 - clip_low, 1 + clip_high), loss l = max(-A r, -A r_c); dual_clip c (> 1) caps the
    loss of negative-advantage tokens at -A c; reinforce=True uses l = -A logp (no ratio). KL to the reference
    (if kl_coef): kl_coef * clip(v k(log ref - logp), +-10) with kl_type k1 | k2 | k3 (|log ref - logp| clamped to
    20 first; NeMo RL's clamps), v = 1 in value (see on_policy_kl). With sampler_logprobs, each
    token's loss is weighted by w = exp(old_logp - sampler_logp) (the correction between the sampler and the
    trainer; per sequence, exp of the summed difference, under GSPO, over the tokens inside the trainer's top-k/top-p
    set), truncated to [0, tis_cap] when tis_cap is given (TIS; tis_type "icepop" zeroes the weights outside
    [tis_min, tis_cap] instead, "seq-mask-tis" zeroes whole sequences whose geometric-mean weight lies outside it).
    Aggregation: token_level divides the sum over valid tokens by their count; otherwise each sequence's token mean
    is averaged over valid sequences.
    normalizer: the global count (tokens or sequences) over all microbatches of the step; None uses this
    batch's own count.
    cispo: l = -A sg(r_c) logp (CISPO: tokens outside the clip range keep a bounded-weight gradient).
    on_policy_kl: each token's KL term is weighted by exp(logp - sampler_logp) instead of 1 (NeMo RL's on-policy
    KL approximation: the samples came from the sampler, not from the current policy).
    positive_nll_weight: adds that weight x the mean of -logp over the tokens of `positive_rows` ([R], the
    samples with reward > 0; VAPO's positive-example NLL).
    metrics: actor_loss, kl_loss, kl (the unscaled estimator), clip_fraction, ratio_mean/min/max,
    is_weight_mean, approx_entropy (sample estimate of the policy's entropy), advantage_mean, positive_nll_loss.
    """
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type,
              token_level=token_level, sequence_level_ratio=sequence_level_ratio, sampler_logprobs=sampler_logprobs,
              tis_cap=tis_cap, reinforce=reinforce, kl_logprobs=kl_logprobs, cispo=cispo, tis_type=tis_type,
              tis_min=tis_min, on_policy_kl=on_policy_kl, positive_nll_weight=positive_nll_weight,
              positive_rows=positive_rows)
    norm = None if normalizer is None else jnp.maximum(jnp.asarray(normalizer, _F32), 1e-8)
    nll_scale = None  # the sum form's default (this batch's count / positive tokens) fits its own count
    if norm is not None and positive_nll_weight > 0 and positive_rows is not None:
        pos_tokens = (jnp.asarray(mask, _F32) * jnp.asarray(positive_rows, _F32).reshape(-1, 1)).sum()
        nll_scale = norm / jnp.maximum(pos_tokens, 1.0)  # a mean over positive tokens, whatever the normaliser
    s, n, sums = policy_gradient_loss_sum(logprobs, old_logprobs, ref_logprobs, advantages, mask,
                                          nll_scale=nll_scale, **kw)
    norm = jnp.maximum(n, 1e-8) if norm is None else norm
    metrics = {k: (v if k in ("ratio_min", "ratio_max") else v / norm) for k, v in sums.items()}
    return s / norm, metrics
