"""The clipped policy-gradient loss (GRPO / DAPO / GSPO / REINFORCE) against an independent float64 reference
written from NeMo RL's behaviour (reference/nemo_rl.md §1.0, §1.4.3): values, metrics, clamps, aggregation,
importance correction (TIS), gradients, microbatch additivity and bad input; random batches of every option.
The newer variants' hand values and gradients (CISPO, ICE-POP, seq-mask-TIS, on-policy KL, positive NLL) are in
test_pg_variants.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pg_reference import (
    ATOL,
    central_differences,
    check_all,
    close,
    f32,
    f64,
    hand_ratio_batch,
    loss_grad,
    pgl,
    pgl_sum,
    ragged_batch,
    random_batch,
    ref_k,
    ref_loss,
    run_both,
)

from jaxrl_llm.losses import policy_gradient_loss, policy_gradient_loss_sum

# ----------------------------------------------------------------------------------------------------------------
# Loss values
# ----------------------------------------------------------------------------------------------------------------


def test_ratio_clipping_both_sides_hand_values():
    lp, old, A, mask, ratios = hand_ratio_batch()
    loss, m = pgl(f32(lp), f32(old), None, f32(A), f32(mask), clip_low=0.2, clip_high=0.28)
    per_tok = [
        -1.0 * 1.28,   # A>0, r=1.5 > 1+0.28: clipped at 1.28
        -1.0 * 0.5,    # A>0, r=0.5 < 0.8: the unclipped branch is the larger loss
        +1.0 * 0.8,    # A<0, r=0.5 < 0.8: clipped at 0.8
        +1.0 * 1.5,    # A<0, r=1.5 > 1.28: unclipped branch wins
        -2.0 * 1.1,    # inside the trust region
        +0.5 * 0.9,
    ]
    close(loss, np.mean(per_tok))
    close(m["actor_loss"], np.mean(per_tok))
    close(m["clip_fraction"], 2 / 6)
    close(m["ratio_mean"], ratios.mean())
    close(m["ratio_min"], 0.5)
    close(m["ratio_max"], 1.5)
    close(m["advantage_mean"], A.mean())
    close(m["kl_loss"], 0.0)
    check_all(*run_both(lp, old, None, A, mask, clip_low=0.2, clip_high=0.28))


def test_dual_clip_caps_negative_advantage_loss():
    ratios = np.array([5.0, 2.0, 5.0, 0.3, 4.0])
    A = np.array([[-1.0, -1.0, 1.0, -2.0, -0.5]])
    old = np.full((1, 5), -1.0)
    lp = old + np.log(ratios)[None]
    mask = np.ones((1, 5))
    loss, m = pgl(f32(lp), f32(old), None, f32(A), f32(mask), dual_clip=3.0)
    per_tok = [
        3.0,          # A=-1, r=5: unclipped loss 5 capped at -A*c = 3
        2.0,          # A=-1, r=2: 2 < 3, untouched
        -1.2,         # A=+1, r=5: ordinary clip, no dual clip for positive advantages
        2.0 * 0.8,    # A=-2, r=0.3: PPO clip to 0.8 -> 1.6 < 6
        0.5 * 3.0,    # A=-0.5, r=4: unclipped 2.0 capped at 1.5
    ]
    close(loss, np.mean(per_tok))
    # tokens 0, 2, 3, 4 do not take the plain unclipped loss
    close(m["clip_fraction"], 4 / 5)
    check_all(*run_both(lp, old, None, A, mask, dual_clip=3.0))
    # without the dual clip the first token costs 5
    loss_nc, _ = pgl(f32(lp), f32(old), None, f32(A), f32(mask))
    close(loss_nc, np.mean([5.0, 2.0, -1.2, 1.6, 2.0]))


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_term_values(kl_type):
    lp = np.array([[-1.0, -2.0, -0.3, -4.0], [-0.5, -1.5, -2.5, -0.1]])
    ref = np.array([[-1.4, -1.0, -0.3, -3.0], [-0.9, -1.0, -2.0, -0.6]])
    old = lp.copy()  # ratio 1
    A = np.array([0.0, 0.0])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1.0]])
    loss, m = pgl(f32(lp), f32(old), f32(ref), f32(A), f32(mask), kl_coef=0.05, kl_type=kl_type)
    ks = [ref_k(ref[i, t] - lp[i, t], kl_type) for i in range(2) for t in range(4) if mask[i, t]]
    close(loss, 0.05 * np.mean(ks))
    close(m["kl_loss"], 0.05 * np.mean(ks))
    close(m["kl"], np.mean(ks))
    close(m["actor_loss"], 0.0)
    check_all(*run_both(lp, old, ref, A, mask, kl_coef=0.05, kl_type=kl_type))


def test_kl_clamps():
    # NeMo RL's calculate_kl: |log r| <= 20, then the estimator clamped to +-10, then times kl_coef
    # input clamp: logr = ref - lp = -25 -> k1 = 20 (not 25) -> output clamp 10; kl_coef 0.1 -> 1.0 per token
    lp, ref = np.array([[-0.5]]), np.array([[-25.5]])
    one = np.ones((1, 1))
    loss, m = pgl(f32(lp), f32(lp), f32(ref), f32([0.0]), f32(one), kl_coef=0.1, kl_type="k1")
    close(loss, 1.0)
    close(m["kl"], 20.0)
    # output clamp |k| <= 10 before the coefficient: logr = -15 -> k2 = 112.5 -> 10, kl_coef 0.2 -> 2.0
    ref2 = np.array([[-15.5]])
    loss, m = pgl(f32(lp), f32(lp), f32(ref2), f32([0.0]), f32(one), kl_coef=0.2, kl_type="k2")
    close(loss, 2.0)
    close(m["kl"], 112.5)
    # k1 can be negative: logr = +15 -> k1 = -15 -> clamped at -10, kl_coef 1 -> -10
    ref3 = np.array([[14.5]])
    loss, _ = pgl(f32(lp), f32(lp), f32(ref3), f32([0.0]), f32(one), kl_coef=1.0, kl_type="k1")
    close(loss, -10.0)


def _per_tok_ppo(lp, old, adv, cl=0.2, ch=0.2):
    r = np.exp(lp - old)
    A = adv[:, None]
    return np.maximum(-A * r, -A * np.clip(r, 1 - cl, 1 + ch))


def test_token_level_vs_sequence_level_aggregation():
    lp, old, adv, mask = ragged_batch()
    ell = _per_tok_ppo(lp, old, adv)
    tok_expected = (ell * mask).sum() / mask.sum()  # sum over 7 valid tokens / 7
    seq_means = [(ell[i] * mask[i]).sum() / mask[i].sum() for i in range(3)]  # row 3 excluded
    seq_expected = sum(seq_means) / 3
    assert abs(tok_expected - seq_expected) > 1e-2  # the two aggregations really differ on this batch
    loss_tok, _ = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=True)
    loss_seq, _ = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=False)
    close(loss_tok, tok_expected)
    close(loss_seq, seq_expected)
    for token_level in (True, False):
        check_all(*run_both(lp, old, None, adv, mask, token_level=token_level))
    s, n, _ = pgl_sum(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=False)
    close(n, 3.0)
    s, n, _ = pgl_sum(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=True)
    close(n, 7.0)


def test_masked_tokens_do_not_count():
    lp, old, adv, mask = ragged_batch()
    loss, m = pgl(f32(lp), f32(old), None, f32(adv), f32(mask))
    lp2, old2 = lp.copy(), old.copy()
    lp2[mask == 0] = -7.0   # wildly different values on masked positions
    old2[mask == 0] = -0.01
    loss2, m2 = pgl(f32(lp2), f32(old2), None, f32(adv), f32(mask))
    close(loss2, loss)
    close(m2["ratio_max"], m["ratio_max"])
    close(m2["ratio_min"], m["ratio_min"])


@pytest.mark.parametrize("variant", [dict(), dict(dual_clip=3.0), dict(cispo=True), dict(token_level=False),
                                     dict(token_level=False, sequence_level_ratio=True), dict(on_policy_kl=True),
                                     dict(tis_cap=2.0)], ids=str)
def test_floor_logprobs_keep_loss_and_gradient_finite(variant):
    """Tokens outside the top-k/top-p set have the -1e4 log-prob floor (grpo.LOGP_FLOOR) in the recomputed old
    log-probs; a later update that brings one back in gave exp(~1e4) = inf: NaN loss at masked positions (inf x 0)
    and NaN gradients (the branch jnp.maximum did not take). Masked positions must not count at all, and a valid
    token's ratio is bounded."""
    import jax
    import jax.numpy as jnp

    from jaxrl_llm.algorithms import grpo

    floor = grpo.LOGP_FLOOR
    lp = jnp.array([[-1.0, -3.0, -2.0], [-0.5, -2.0, -1.0]])
    old = jnp.array([[-1.1, floor, -2.2], [-0.4, floor, floor]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # row 0: a valid token at the floor; row 1: padding
    kw = dict(kl_coef=0.1, ref_logprobs=lp - 0.3, sampler_logprobs=jnp.where(mask > 0, lp - 0.05, 0.0), **variant)
    if variant.get("on_policy_kl") is None and variant.get("tis_cap") is None:
        kw.pop("sampler_logprobs")
    for adv in (jnp.array([-1.0, -1.0]), jnp.array([1.0, 1.0])):
        f = lambda x, adv=adv: policy_gradient_loss(x, old, kw["ref_logprobs"], adv, mask,
                                                    **{k: v for k, v in kw.items() if k != "ref_logprobs"})
        (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(lp)
        assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all(), (adv, loss, g)
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
        assert float(g[1, 1]) == 0.0 and float(g[1, 2]) == 0.0  # padding: no gradient
        # Row 1's padding changes nothing: the same loss as with ordinary values there.
        old_plain = old.at[1, 1:].set(-1.0)
        close(loss, policy_gradient_loss(
            lp, old_plain, kw["ref_logprobs"], adv, mask, **{k: v for k, v in kw.items() if k != "ref_logprobs"})[0])


@pytest.mark.parametrize("token_level", [True, False])
def test_normalizer_overrides_batch_count(token_level):
    lp, old, adv, mask = ragged_batch()
    ref = lp - 0.2
    kw = dict(token_level=token_level, kl_coef=0.1)
    s, n, sums = pgl_sum(f32(lp), f32(old), f32(ref), f32(adv), f32(mask), **kw)
    exp_sum, exp_n, exp_sums = ref_loss(f64(lp), f64(old), f64(ref), f64(adv), mask, sums=True, **kw)
    close(s, exp_sum)
    close(n, exp_n)
    loss, m = pgl(f32(lp), f32(old), f32(ref), f32(adv), f32(mask), normalizer=20.0, **kw)
    close(loss, exp_sum / 20.0)
    close(m["kl_loss"], exp_sums["kl_loss"] / 20.0)
    close(m["clip_fraction"], exp_sums["clip_fraction"] / 20.0)
    check_all(*run_both(lp, old, ref, adv, mask, normalizer=20.0, **kw))


def test_gspo_sequence_level_ratio():
    lp, old, adv, mask = ragged_batch()
    got, m = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=False,
                                  sequence_level_ratio=True)
    # hand formula: s_i = exp(mean over valid tokens of (lp - old)); the per-sequence loss is
    # max(-A s_i, -A clip(s_i)) (constant over the tokens, so its token mean is itself); mean over 3 valid rows.
    per_seq = []
    for i in range(3):
        v = mask[i] > 0
        s_i = math.exp(float(np.mean(f64(lp)[i, v] - f64(old)[i, v])))
        per_seq.append(max(-adv[i] * s_i, -adv[i] * min(max(s_i, 0.8), 1.2)))
    close(got, np.mean(per_seq))
    check_all(got, m, *ref_loss(f64(lp), f64(old), None, adv, mask, token_level=False, sequence_level_ratio=True))
    # a sequence ratio really differs from per-token ratios here
    per_tok, _ = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=False)
    assert abs(float(per_tok) - float(got)) > 1e-3


def test_importance_correction_and_tis():
    lp, old, adv, mask = ragged_batch()
    sampler = old - np.array([[0.5, -0.4, 0.0, 0.0], [0.1, 0.9, -1.0, 0.2], [1.2, 0.0, 0.0, 0.0], [0, 0, 0, 0.0]])
    ell = _per_tok_ppo(f64(lp), f64(old), adv)
    w = np.exp(f64(old) - f64(sampler))
    got, m = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), sampler_logprobs=f32(sampler))
    close(got, (w * ell * mask).sum() / mask.sum())
    close(m["is_weight_mean"], (w * mask).sum() / mask.sum())
    # TIS: weights truncated to [0, 2]
    got, m = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), sampler_logprobs=f32(sampler),
                                  tis_cap=2.0)
    wc = np.minimum(w, 2.0)
    assert (w * mask).max() > 2.0  # the cap binds on a valid token
    close(got, (wc * ell * mask).sum() / mask.sum())
    close(m["is_weight_mean"], (wc * mask).sum() / mask.sum())
    for kw in (dict(), dict(tis_cap=2.0), dict(tis_cap=1.5, token_level=False),
               dict(token_level=False, sequence_level_ratio=True),
               dict(token_level=False, sequence_level_ratio=True, tis_cap=1.3)):
        check_all(*run_both(lp, old, None, adv, mask, sampler=sampler, **kw))


def test_importance_weight_is_not_applied_to_kl():
    lp, old, adv, mask = ragged_batch()
    ref = lp + 0.3
    sampler = old - 0.7  # w = exp(0.7) everywhere
    kw = dict(kl_coef=0.2, kl_type="k2")
    _, m_w = pgl(f32(lp), f32(old), f32(ref), f32(adv), f32(mask), sampler_logprobs=f32(sampler), **kw)
    _, m_0 = pgl(f32(lp), f32(old), f32(ref), f32(adv), f32(mask), **kw)
    close(m_w["kl_loss"], m_0["kl_loss"])
    close(m_w["actor_loss"], math.exp(0.7) * float(m_0["actor_loss"]), rtol=1e-5)


def test_gspo_importance_weight_is_per_sequence():
    lp, old, adv, mask = ragged_batch()
    d = np.array([[0.1, -0.3, 5.0, 5.0], [0.2, 0.2, -0.1, 0.0], [0.4, 9.0, 9.0, 9.0], [0, 0, 0, 0.0]])
    sampler = old - d  # old - sampler = d; masked entries must not count
    got, _ = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), sampler_logprobs=f32(sampler),
                                  token_level=False, sequence_level_ratio=True)
    per_seq = []
    for i in range(3):
        v = mask[i] > 0
        s_i = math.exp(float(np.mean(f64(lp)[i, v] - f64(old)[i, v])))
        w_i = math.exp(float(np.sum(f64(old)[i, v] - f64(sampler)[i, v])))
        per_seq.append(w_i * max(-adv[i] * s_i, -adv[i] * min(max(s_i, 0.8), 1.2)))
    close(got, np.mean(per_seq))


def test_reinforce_loss():
    lp, old, adv, mask = ragged_batch()
    got, m = pgl(f32(lp), f32(old + 1.0), None, f32(adv), f32(mask), reinforce=True)
    close(got, (-adv[:, None] * f64(lp) * mask).sum() / mask.sum())
    close(m["clip_fraction"], 0.0)
    check_all(got, m, *ref_loss(f64(lp), f64(old + 1.0), None, adv, mask, reinforce=True))
    check_all(*run_both(lp, old, None, adv, mask, reinforce=True, token_level=False))


def test_per_row_and_per_token_advantages_agree():
    lp, old, adv, mask = ragged_batch()
    adv_RT = np.repeat(adv[:, None], 4, 1)
    a, ma = pgl(f32(lp), f32(old), None, f32(adv), f32(mask))
    b, mb = pgl(f32(lp), f32(old), None, f32(adv_RT), f32(mask))
    close(a, b)
    for k in ma:
        close(ma[k], mb[k])
    # genuinely per-token advantages change the result and match the reference
    adv_RT[1, 2] = -4.0
    c, _ = pgl(f32(lp), f32(old), None, f32(adv_RT), f32(mask))
    assert abs(float(c) - float(a)) > 1e-3
    check_all(*run_both(lp, old, None, adv_RT, mask))


def test_kl_uses_kl_logprobs_and_ratio_uses_logprobs():
    # the ratio sees the sampler-filtered log-probs, the KL an unfiltered copy (NeMo RL's convention)
    lp, old, adv, mask = ragged_batch()
    kl_lp = lp - np.linspace(0.1, 0.6, 16).reshape(4, 4)
    ref = lp + 0.25
    got, m = pgl(lp, old, ref, adv, mask, kl_logprobs=kl_lp, kl_coef=0.1, kl_type="k3")
    actor, _ = ref_loss(f64(lp), f64(old), None, f64(adv), mask)
    kl, kl_m = ref_loss(f64(kl_lp), f64(kl_lp), f64(ref), np.zeros(4), mask, kl_coef=0.1, kl_type="k3")
    close(got, actor + kl)
    close(m["kl"], kl_m["kl"])
    close(m["kl_loss"], kl_m["kl_loss"])


def test_entropy_metric():
    lp, old, adv, mask = ragged_batch()
    _, m = pgl(f32(lp), f32(old), None, f32(adv), f32(mask))
    close(m["approx_entropy"], (-f64(lp) * mask).sum() / mask.sum())


# ----------------------------------------------------------------------------------------------------------------
# CISPO, TIS variants (icepop, seq-mask-tis, tis_min), on-policy KL, positive-example NLL
# ----------------------------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(clip_low=0.1, clip_high=0.28, dual_clip=3.0),
    dict(kl_coef=0.05, kl_type="k1", token_level=False),
    dict(kl_coef=0.3, kl_type="k2", dual_clip=2.0, use_sampler=True),
    dict(kl_coef=0.1, kl_type="k3", use_sampler=True, tis_cap=1.2),
    dict(token_level=False, sequence_level_ratio=True, kl_coef=0.02, use_sampler=True, tis_cap=2.0),
    dict(reinforce=True, kl_coef=0.05, use_sampler=True),
    dict(cispo=True, clip_low=0.1, clip_high=0.28),
    dict(cispo=True, kl_coef=0.05, kl_type="k2", use_sampler=True, tis_cap=1.3, tis_min=0.8),
    dict(kl_coef=0.1, use_sampler=True, tis_type="icepop", tis_cap=1.5, tis_min=0.6),
    dict(token_level=False, use_sampler=True, tis_type="seq-mask-tis", tis_cap=1.2, tis_min=0.85),
    dict(token_level=False, sequence_level_ratio=True, use_sampler=True, tis_type="icepop", tis_cap=2.0, tis_min=0.5),
    dict(kl_coef=0.2, kl_type="k3", use_sampler=True, on_policy_kl=True, use_kl_logprobs=True, token_level=False),
    dict(cispo=True, kl_coef=0.1, use_sampler=True, on_policy_kl=True, positive_nll_weight=0.5, use_positive=True),
    dict(token_level=False, positive_nll_weight=0.3, use_positive=True, normalizer=9.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("seed", [0, 1])
def test_random_batches_match_reference(cfg, seed):
    cfg = dict(cfg)
    use_sampler = cfg.pop("use_sampler", False)
    lp, old, ref, sampler, adv, mask = random_batch(seed, spread=0.4)
    if cfg.pop("use_kl_logprobs", False):
        cfg["kl_logprobs"] = lp - 0.2 * np.cos(np.arange(lp.size)).reshape(lp.shape) ** 2
    if cfg.pop("use_positive", False):
        cfg["positive_rows"] = (adv > 0).astype(np.float64)
    check_all(*run_both(lp, old, ref, adv, mask, sampler=sampler if use_sampler else None, **cfg))


# ----------------------------------------------------------------------------------------------------------------
# Gradients w.r.t. the current log-probs
# ----------------------------------------------------------------------------------------------------------------


def test_grad_unclipped_region():
    lp, old, adv, mask = ragged_batch()
    old = lp + 0.05 * np.sign(np.arange(16).reshape(4, 4) % 3 - 1)  # ratios within [0.95, 1.05]
    g = loss_grad(lp, f32(old), None, f32(adv), f32(mask))
    r = np.exp(f64(lp) - f64(old))
    close(g, -adv[:, None] * r * mask / mask.sum())


def test_grad_clipped_tokens_are_zero():
    lp, old, A, mask, ratios = hand_ratio_batch()
    g = loss_grad(lp, f32(old), None, f32(A), f32(mask), clip_low=0.2, clip_high=0.28)
    clipped = np.array([True, False, True, False, False, False])
    expected = np.where(clipped, 0.0, -A[0] * ratios / 6)
    close(g[0], expected)
    # a dual-clipped token has no gradient either
    g = loss_grad(lp, f32(old), None, f32(A), f32(mask), dual_clip=1.2, clip_low=0.2, clip_high=0.28)
    # token 3 (A=-1, r=1.5): unclipped loss 1.5 > c=1.2 -> capped (constant); token 5 (A=-.5, r=.9): 0.45 < 0.6
    expected = np.where(clipped | (np.arange(6) == 3), 0.0, -A[0] * ratios / 6)
    close(g[0], expected)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_grad_kl_term(kl_type):
    lp = np.array([[-1.0, -2.0, -0.3, -4.0], [-0.5, -1.5, -2.5, -0.1]])
    ref = np.array([[-1.4, -1.0, -0.3, -3.0], [-0.9, -1.0, -2.0, -0.6]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1.0]])
    beta = 0.07
    g = loss_grad(lp, f32(lp), f32(ref), f32([0.0, 0.0]), f32(mask), kl_coef=beta, kl_type=kl_type)
    # loss term beta * v * k(ref - lp) with v = exp(lp - sg(lp)) (value 1): d/dlp = beta * (k + dk/dlp)
    x = f64(ref) - f64(lp)
    k = {"k1": -x, "k2": 0.5 * x**2, "k3": np.exp(x) - 1 - x}[kl_type]
    dk = {"k1": np.ones_like(x), "k2": -x, "k3": 1 - np.exp(x)}[kl_type]  # d/dlp, x = ref - lp
    close(g, beta * (k + dk) * mask / mask.sum())


def test_grad_kl_output_clamp_blocks_gradient():
    lp, ref = np.array([[-0.5, -0.5]]), np.array([[-15.5, -1.0]])
    g = loss_grad(lp, f32(lp), f32(ref), f32([0.0]), f32(np.ones((1, 2))), kl_coef=0.2, kl_type="k2")
    x = -0.5
    close(g[0], [0.0, 0.2 * (0.5 * x**2 - x) / 2])


def test_grad_gspo():
    lp, old, adv, mask = ragged_batch()
    old = lp - 0.03 * (np.arange(16).reshape(4, 4) % 3)  # sequence ratios inside [0.8, 1.2]
    g = loss_grad(lp, f32(old), None, f32(adv), f32(mask), token_level=False, sequence_level_ratio=True)
    expected = np.zeros((4, 4))
    for i in range(3):
        v = mask[i] > 0
        s_i = math.exp(float(np.mean(f64(lp)[i, v] - f64(old)[i, v])))
        expected[i, v] = -adv[i] * s_i / v.sum() / 3  # -A s_i / |y_i| / N_seq
    close(g, expected)


def test_grad_with_importance_weights_and_reinforce():
    lp, old, adv, mask = ragged_batch()
    old = lp + 0.02
    sampler = old - 0.4
    g = loss_grad(lp, f32(old), None, f32(adv), f32(mask), sampler_logprobs=f32(sampler))
    w, r = np.exp(f64(old) - f64(sampler)), np.exp(f64(lp) - f64(old))
    close(g, -adv[:, None] * w * r * mask / mask.sum())
    g = loss_grad(lp, f32(old), None, f32(adv), f32(mask), reinforce=True)
    close(g, -adv[:, None] * mask / mask.sum())


def test_grad_finite_difference_of_reference():
    """All features but the KL's score-function term: jax.grad against central differences of the reference."""
    lp, old, ref, sampler, adv, mask = random_batch(3, spread=0.4)
    lp = f64(lp)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=2.5, kl_coef=0.1, kl_type="k3", sampler_logprobs=sampler,
              tis_cap=1.5, token_level=False)
    g = loss_grad(lp, f32(old), f32(ref), f32(adv), f32(mask), **{**kw, "sampler_logprobs": f32(sampler)})
    kw64 = {**kw, "sampler_logprobs": f64(sampler)}
    fd = central_differences(lambda x: ref_loss(x, f64(old), f64(ref), f64(adv), mask, **kw64)[0], lp)
    # add the score-function term beta * k per valid token, sequence-mean aggregated
    x = f64(ref) - lp
    k3 = np.exp(x) - 1 - x
    n_seq = (mask.sum(1) > 0).sum()
    fd += 0.1 * k3 * mask / np.maximum(mask.sum(1, keepdims=True), 1) / n_seq
    close(g, fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [dict(token_level=True, kl_coef=0.1, dual_clip=3.0, tis_cap=2.0),
                                 dict(token_level=False, kl_coef=0.05, kl_type="k2"),
                                 dict(token_level=False, sequence_level_ratio=True, tis_cap=1.5)])
def test_microbatch_sums_add_up_to_full_batch(cfg):
    lp, old, ref, sampler, adv, mask = random_batch(5, R=4, T=6, spread=0.4)
    mask[2] = 0.0  # one row without valid tokens (excluded at sequence level)
    args = [f32(x) for x in (lp, old, ref, adv, mask, sampler)]
    full_loss, full_m = pgl(*args[:5], sampler_logprobs=args[5], **cfg)
    parts = [slice(0, 1), slice(1, 4)]
    tot_s, tot_n, tot_m = 0.0, 0.0, {}
    for sl in parts:
        s, n, m = pgl_sum(*(a[sl] for a in args[:5]), sampler_logprobs=args[5][sl], **cfg)
        tot_s, tot_n = tot_s + float(s), tot_n + float(n)
        for k, v in m.items():
            v = float(v)
            if k == "ratio_min":
                tot_m[k] = min(tot_m.get(k, np.inf), v)
            elif k == "ratio_max":
                tot_m[k] = max(tot_m.get(k, -np.inf), v)
            else:
                tot_m[k] = tot_m.get(k, 0.0) + v
    close(tot_s / tot_n, full_loss)
    for k, v in full_m.items():
        expected = tot_m[k] if k in ("ratio_min", "ratio_max") else tot_m[k] / tot_n
        close(expected, v, atol=1e-5 if k == "approx_entropy" else ATOL, what=k)
    # and each part normalised by the global count sums to the full loss
    parts_loss = sum(float(pgl(*(a[sl] for a in args[:5]), sampler_logprobs=args[5][sl],
                                                normalizer=tot_n, **cfg)[0]) for sl in parts)
    close(parts_loss, full_loss)
    check_all(*run_both(lp, old, ref, adv, mask, sampler=sampler, **cfg))


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(kl_type="k4"), "kl_type"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(sequence_level_ratio=True, token_level=True), "sequence_level_ratio"),
    (dict(tis_cap=2.0), "tis_cap"),
    (dict(kl_coef=0.1, no_ref=True), "ref_logprobs"),
    (dict(cispo=True, token_level=False), "cispo"),
    (dict(cispo=True, dual_clip=3.0), "cispo"),
    (dict(cispo=True, reinforce=True), "cispo"),
    (dict(cispo=True, token_level=False, sequence_level_ratio=True), "cispo"),
    (dict(use_sampler=True, tis_cap=2.0, tis_type="bogus"), "tis_type"),
    (dict(use_sampler=True, tis_cap=2.0, tis_type="icepop"), "tis_min"),
    (dict(use_sampler=True, tis_cap=2.0, tis_type="seq-mask-tis"), "tis_min"),
    (dict(use_sampler=True, tis_cap=2.0, tis_min=-0.1), "tis_min"),
    (dict(use_sampler=True, tis_cap=2.0, tis_min=2.5), "tis_min"),
    (dict(use_sampler=True, tis_cap=2.0, tis_min=2.5, tis_type="icepop", token_level=False,
          sequence_level_ratio=True), "tis_min"),
    (dict(on_policy_kl=True, kl_coef=0.1), "on_policy_kl|sampler_logprobs"),
    (dict(positive_nll_weight=-0.1), "positive_nll_weight"),
    (dict(positive_nll_weight=-0.1, use_positive=True), "positive_nll_weight"),
    (dict(positive_nll_weight=0.5), "positive_rows"),
])
def test_bad_options_raise(kw, match):
    kw = dict(kw)
    lp, old, ref, sampler, adv, mask = random_batch(0)
    ref_arg = None if kw.pop("no_ref", False) else f32(ref)
    if kw.pop("use_sampler", False):
        kw["sampler_logprobs"] = f32(sampler)
    if kw.pop("use_positive", False):
        kw["positive_rows"] = f32(adv > 0)
    with pytest.raises(ValueError, match=match):
        policy_gradient_loss(f32(lp), f32(old), ref_arg, f32(adv), f32(mask), **kw)
    with pytest.raises(ValueError, match=match):
        policy_gradient_loss_sum(f32(lp), f32(old), ref_arg, f32(adv), f32(mask), **kw)
