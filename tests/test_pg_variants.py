"""The newer policy-gradient variants against the float64 reference of pg_reference.py (NeMo RL's behaviour,
reference/nemo_rl.md §1.4.3): CISPO, the truncated importance-weight types (tis with a floor, ICE-POP,
seq-mask-TIS), the on-policy KL approximation and the positive-example NLL: hand values and gradients."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from pg_reference import (
    central_differences,
    check_all,
    close,
    f32,
    f64,
    hand_ratio_batch,
    loss_grad,
    padded,
    pgl,
    pgl_sum,
    ragged_batch,
    random_batch,
    ref_k,
    ref_loss,
    run_both,
)

from jaxrl_llm.losses import policy_gradient_loss


def test_cispo_hand_values():
    lp, old, A, mask, ratios = hand_ratio_batch()
    loss, m = pgl(f32(lp), f32(old), None, f32(A), f32(mask), clip_low=0.2, clip_high=0.28, cispo=True)
    rc = np.array([1.28, 0.8, 0.8, 1.28, 1.1, 0.9])  # r clipped to [0.8, 1.28]
    per_tok = -A[0] * rc * f64(lp)[0]  # -A * sg(r_c) * log p
    close(loss, per_tok.mean())
    close(m["actor_loss"], per_tok.mean())
    close(m["clip_fraction"], 4 / 6)  # every token with r outside [0.8, 1.28], whatever the advantage's sign
    close(m["ratio_mean"], ratios.mean())
    close(m["ratio_min"], 0.5)
    close(m["ratio_max"], 1.5)
    check_all(loss, m, *ref_loss(f64(lp), f64(old), None, A, mask, clip_low=0.2, clip_high=0.28, cispo=True))
    # the PPO surrogate on the same batch is a different number
    ppo, _ = pgl(f32(lp), f32(old), None, f32(A), f32(mask), clip_low=0.2, clip_high=0.28)
    assert abs(float(ppo) - float(loss)) > 1e-2
    # sum form, with sampler importance weights (TIS) on top
    sampler = old - np.array([[0.3, -0.2, 0.9, 0.0, -1.0, 0.1]])
    kw = dict(clip_low=0.2, clip_high=0.28, cispo=True, tis_cap=2.0)
    s_, n_, sums = pgl_sum(f32(lp), f32(old), None, f32(A), f32(mask), sampler_logprobs=f32(sampler), **kw)
    w = np.minimum(np.exp(f64(old) - f64(sampler))[0], 2.0)
    close(s_, (w * per_tok).sum())
    close(n_, 6.0)
    close(sums["clip_fraction"], 4.0)
    check_all(*run_both(lp, old, None, A, mask, sampler=sampler, **kw))


def _tis_batch():
    """old == lp (ratio 1, so each token's PPO loss is -A) and known sampler weights w = exp(old - sampler)."""
    lp = np.array([[-1.0, -0.5, -2.0, -0.2], [-0.3, -0.9, -1.1, -0.4], [-2.0, -0.1, -0.6, -1.3]])
    old = lp.copy()
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0.0]])
    w = np.array([[3.0, 0.6, 1.0, math.exp(5.0)],  # geo-mean 1.8**(1/3) = 1.216 (e^5 is masked: must not count)
                  [4.0, 1.5, 1.0, 1.0],             # geo-mean sqrt(6) = 2.449
                  [0.2, 0.7, 1.0, 1.0]])            # geo-mean sqrt(0.14) = 0.374
    sampler = old - np.log(w)
    A = np.array([[1.0, 2.0, -3.0, 0.0], [-1.0, 0.5, 0.0, 0.0], [2.0, -3.0, 0.0, 0.0]])
    return lp, old, A, mask, sampler


@pytest.mark.parametrize("kw,w_exp", [
    (dict(), [[3, 0.6, 1], [4, 1.5], [0.2, 0.7]]),  # no cap: raw weights
    (dict(tis_type="icepop", tis_min=0.9), [[3, 0.6, 1], [4, 1.5], [0.2, 0.7]]),  # no cap: type/min ignored
    (dict(tis_cap=2.0), [[2, 0.6, 1], [2, 1.5], [0.2, 0.7]]),  # TIS: truncate to [0, 2]
    (dict(tis_cap=2.0, tis_min=0.5), [[2, 0.6, 1], [2, 1.5], [0.5, 0.7]]),  # TIS with a floor
    (dict(tis_cap=2.0, tis_min=0.5, tis_type="icepop"), [[0, 0.6, 1], [0, 1.5], [0, 0.7]]),  # zero outside
    (dict(tis_cap=2.0, tis_min=0.5, tis_type="seq-mask-tis"), [[3, 0.6, 1], [0, 0], [0, 0]]),  # whole rows, raw
    (dict(tis_cap=2.5, tis_min=0.3, tis_type="seq-mask-tis"), [[3, 0.6, 1], [4, 1.5], [0.2, 0.7]]),
    (dict(tis_cap=2.5, tis_min=0.38, tis_type="seq-mask-tis"), [[3, 0.6, 1], [4, 1.5], [0, 0]]),
])
def test_tis_types_hand_values(kw, w_exp):
    lp, old, A, mask, sampler = _tis_batch()
    W = np.zeros((3, 4))
    for i, row in enumerate(w_exp):
        W[i, :len(row)] = row
    for token_level in (True, False):
        loss, m = pgl(f32(lp), f32(old), None, f32(A), f32(mask), sampler_logprobs=f32(sampler),
                      token_level=token_level, **kw)
        if token_level:  # masked-out rows still count in the normaliser (7 tokens)
            close(loss, (W * -A * mask).sum() / 7, what="loss")
            close(m["is_weight_mean"], (W * mask).sum() / 7, what="is_weight_mean")
        else:
            close(loss, sum((W[i] * -A[i] * mask[i]).sum() / mask[i].sum() for i in range(3)) / 3, what="loss")
        check_all(loss, m, *ref_loss(f64(lp), f64(old), None, A, mask, sampler_logprobs=f64(sampler),
                                     token_level=token_level, **kw))


@pytest.mark.parametrize("kw,w_exp", [
    (dict(tis_cap=1.5, tis_min=0.5), [1.5, 1.5, 0.5]),                         # per-sequence products clipped
    (dict(tis_cap=1.5, tis_min=0.5, tis_type="icepop"), [0.0, 0.0, 0.0]),      # products 1.8, 6, 0.14: all out
    (dict(tis_cap=2.0, tis_min=0.5, tis_type="icepop"), [1.8, 0.0, 0.0]),
])
def test_tis_types_gspo_per_sequence(kw, w_exp):
    lp, old, A, mask, sampler = _tis_batch()
    loss, m = pgl(f32(lp), f32(old), None, f32(A), f32(mask), sampler_logprobs=f32(sampler), token_level=False,
                  sequence_level_ratio=True, **kw)
    # sequence ratio 1: each sequence's loss is w_i * mean over its tokens of -A
    close(loss, sum(w_exp[i] * (-A[i] * mask[i]).sum() / mask[i].sum() for i in range(3)) / 3)
    close(m["is_weight_mean"], sum(w_exp) / 3)
    check_all(loss, m, *ref_loss(f64(lp), f64(old), None, A, mask, sampler_logprobs=f64(sampler), token_level=False,
                                 sequence_level_ratio=True, **kw))


def _kl_batch():
    lp = np.array([[-1.0, -2.0, -0.3, -4.0], [-0.5, -1.5, -2.5, -0.1]])
    ref = np.array([[-1.4, -1.0, -0.3, -3.0], [-0.9, -1.0, -2.0, -0.6]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1.0]])
    delta = np.array([[0.3, -0.5, 0.2, 9.0], [-0.1, 0.7, 0.0, -0.4]])  # log p - log p_sampler
    return lp, ref, mask, lp - delta


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
def test_on_policy_kl_hand_values(kl_type):
    lp, ref, mask, sampler = _kl_batch()
    beta = 0.05
    kw = dict(kl_coef=beta, kl_type=kl_type)
    zeros = f32([0.0, 0.0])
    loss, m = pgl(f32(lp), f32(lp), f32(ref), zeros, f32(mask), sampler_logprobs=f32(sampler), on_policy_kl=True,
                  **kw)
    k = np.array([[ref_k(ref[i, t] - lp[i, t], kl_type) for t in range(4)] for i in range(2)])
    v = np.exp(f64(lp) - f64(sampler))
    close(loss, (beta * v * k * mask).sum() / 7)
    close(m["kl_loss"], (beta * v * k * mask).sum() / 7)
    close(m["kl"], (k * mask).sum() / 7)  # the unscaled estimator carries no sampler weight
    check_all(loss, m, *ref_loss(f64(lp), f64(lp), f64(ref), [0.0, 0.0], mask, sampler_logprobs=f64(sampler),
                                 on_policy_kl=True, **kw))
    off, m_off = pgl(f32(lp), f32(lp), f32(ref), zeros, f32(mask), sampler_logprobs=f32(sampler), **kw)
    close(off, beta * (k * mask).sum() / 7)
    close(m_off["kl"], m["kl"])


def test_on_policy_kl_clamp_nonfinite_and_kl_logprobs():
    # the output clamp applies after the sampler weight, before the coefficient (NeMo RL's calculate_kl):
    # k2(-4) = 8 < 10, times e^0.5 -> 13.2 -> 10, times 0.25 -> 2.5
    lp, ref, one = np.array([[-0.5, -1.0]]), np.array([[-4.5, -1.0]]), np.ones((1, 2))
    sampler = np.array([[-1.0, -np.inf]])  # second token: v = exp(inf) is not finite -> 0 (its KL is 0 anyway)
    kw = dict(kl_coef=0.25, kl_type="k2", sampler_logprobs=f32(sampler))
    loss, m = pgl(f32(lp), f32(lp), f32(ref), f32([0.0]), f32(one), on_policy_kl=True, **kw)
    close(loss, 0.25 * 10.0 / 2)
    loss_off, _ = pgl(f32(lp), f32(lp), f32(ref), f32([0.0]), f32(one), **kw)
    close(loss_off, 0.25 * 8.0 / 2)
    # a non-finite weight on a token with a nonzero KL term
    ref2 = np.array([[-0.5, -2.0]])
    loss, m = pgl(f32(lp), f32(lp), f32(ref2), f32([0.0]), f32(one), on_policy_kl=True, **{**kw, "kl_coef": 0.1})
    assert np.isfinite(float(loss))
    close(loss, 0.0)
    close(m["kl"], ref_k(-1.0, "k2") / 2)
    # with kl_logprobs the weight is exp(kl_logprobs - sampler)
    lp, ref, mask, sampler = _kl_batch()
    kl_lp = lp - np.linspace(0.05, 0.4, 8).reshape(2, 4)
    kw = dict(kl_coef=0.1, kl_type="k3", on_policy_kl=True)
    loss, m = pgl(f32(lp), f32(lp), f32(ref), f32([0.0, 0.0]), f32(mask), sampler_logprobs=f32(sampler),
                  kl_logprobs=f32(kl_lp), **kw)
    x = f64(ref) - f64(kl_lp)
    close(loss, (0.1 * np.exp(f64(kl_lp) - f64(sampler)) * (np.exp(x) - 1 - x) * mask).sum() / 7)
    check_all(*run_both(lp, lp, ref, [0.0, 0.0], mask, sampler=sampler, kl_logprobs=kl_lp, **kw))


def test_positive_nll_hand_values():
    lp, old, adv, mask = ragged_batch()  # valid tokens: row 0 two, row 1 four, row 2 one, row 3 none
    pos = np.array([1.0, 0.0, 1.0, 1.0])  # row 3 is positive but has no valid token
    nll = -(f64(lp)[0, 0] + f64(lp)[0, 1] + f64(lp)[2, 0])
    n_pos = 3
    lam = 0.7
    for token_level, count in ((True, 7.0), (False, 3.0)):
        base, m0 = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=token_level)
        close(m0["positive_nll_loss"], 0.0)  # always present
        loss, m = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=token_level,
                      positive_nll_weight=lam, positive_rows=pos)
        close(loss, float(base) + lam * nll / n_pos)
        close(m["positive_nll_loss"], lam * nll / n_pos)
        close(m["actor_loss"], m0["actor_loss"])
        # a normaliser rescales the PG terms but not the NLL mean
        loss20, m20 = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=token_level,
                          positive_nll_weight=lam, positive_rows=pos, normalizer=20.0)
        close(loss20, float(base) * count / 20.0 + lam * nll / n_pos)
        close(m20["positive_nll_loss"], lam * nll / n_pos)
        # bool rows give the same
        rows_bool = jax.numpy.asarray(np.array([True, False, True, True]))
        loss_b, _ = policy_gradient_loss(*padded(lp, old, None, adv, mask, None)[:5], token_level=token_level,
                                         positive_nll_weight=lam, positive_rows=rows_bool)
        close(loss_b, loss)
        # sum form: + lam * count / N_pos * nll by default, + lam * nll_scale * nll when given
        s0, n0, _ = pgl_sum(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=token_level)
        s, n, sums = pgl_sum(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=token_level,
                             positive_nll_weight=lam, positive_rows=pos)
        close(n, count)
        close(s, float(s0) + lam * count / n_pos * nll)
        close(sums["positive_nll_loss"], lam * count / n_pos * nll)
        s, _, sums = pgl_sum(f32(lp), f32(old), None, f32(adv), f32(mask), token_level=token_level,
                             positive_nll_weight=lam, positive_rows=pos, nll_scale=2.5)
        close(s, float(s0) + lam * 2.5 * nll)
        close(sums["positive_nll_loss"], lam * 2.5 * nll)
    # no positive row: no NLL term (and no division by zero)
    loss, m = pgl(f32(lp), f32(old), None, f32(adv), f32(mask), positive_nll_weight=lam, positive_rows=np.zeros(4))
    close(loss, pgl(f32(lp), f32(old), None, f32(adv), f32(mask))[0])
    close(m["positive_nll_loss"], 0.0)
    check_all(*run_both(lp, old, None, adv, mask, positive_nll_weight=lam, positive_rows=pos, token_level=False))


def test_positive_nll_microbatches_with_global_scale():
    lp, old, ref, sampler, adv, mask = random_batch(7, spread=0.3)
    pos = (adv > 0).astype(np.float64)
    pos[0] = 1.0
    args = [f32(x) for x in (lp, old, ref, adv, mask)]
    for token_level in (True, False):
        cfg = dict(token_level=token_level, kl_coef=0.05, positive_nll_weight=0.4)
        full, full_m = pgl(*args, positive_rows=pos, **cfg)
        exp_full, _ = ref_loss(f64(lp), f64(old), f64(ref), f64(adv), mask, positive_rows=pos, **cfg)
        close(full, exp_full)
        n_tot = mask.sum() if token_level else float((mask.sum(1) > 0).sum())
        n_pos = mask[pos > 0].sum()
        tot_s, tot_nll = 0.0, 0.0
        for sl in (slice(0, 1), slice(1, 4)):
            s, _, m = pgl_sum(*(a[sl] for a in args), positive_rows=pos[sl], nll_scale=n_tot / n_pos, **cfg)
            tot_s, tot_nll = tot_s + float(s), tot_nll + float(m["positive_nll_loss"])
        close(tot_s / n_tot, full)
        close(tot_nll / n_tot, full_m["positive_nll_loss"])


@pytest.mark.parametrize("token_level", [True, False])
def test_grad_finite_difference_on_policy_kl_icepop_nll(token_level):
    """With on_policy_kl the KL weight exp(lp - sampler) makes the score-function term part of the loss's value,
    so the whole gradient (PPO + icepop weights + on-policy KL + positive NLL) is the reference's derivative."""
    lp, old, ref, sampler, adv, mask = random_batch(4, spread=0.4)
    lp = f64(lp)
    pos = (adv > 0).astype(np.float64)
    pos[1] = 1.0
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_type="k3", tis_type="icepop", tis_cap=1.5,
              tis_min=0.6, on_policy_kl=True, positive_nll_weight=0.5, positive_rows=pos, token_level=token_level)
    g = loss_grad(lp, f32(old), f32(ref), f32(adv), f32(mask), sampler_logprobs=f32(sampler), **kw)
    fd = central_differences(
        lambda x: ref_loss(x, f64(old), f64(ref), f64(adv), mask, sampler_logprobs=f64(sampler), **kw)[0], lp)
    close(g, fd, rtol=1e-4, atol=1e-5)


def test_grad_cispo():
    # CISPO: d/dlp = -A * w * sg(r_c) / count on every valid token, clipped ones included (PPO gives them 0)
    lp, old, A, mask, ratios = hand_ratio_batch()
    g = loss_grad(lp, f32(old), None, f32(A), f32(mask), clip_low=0.2, clip_high=0.28, cispo=True)
    rc = np.clip(ratios, 0.8, 1.28)
    close(g[0], -A[0] * rc / 6)
    assert np.all(g[0] != 0)
    sampler = old - np.array([[0.3, -0.2, 0.9, 0.0, -1.0, 0.1]])
    g = loss_grad(lp, f32(old), None, f32(A), f32(mask), sampler_logprobs=f32(sampler), clip_low=0.2, clip_high=0.28,
              cispo=True, tis_cap=2.0)
    w = np.minimum(np.exp(f64(old) - f64(sampler))[0], 2.0)
    close(g[0], -A[0] * w * rc / 6)
    # ragged batch: masked tokens get nothing, valid ones -A r_c / 7
    lp, old, adv, mask = ragged_batch()
    g = loss_grad(lp, f32(old), None, f32(adv), f32(mask), cispo=True)
    r = np.exp(f64(lp) - f64(old))
    close(g, -adv[:, None] * np.clip(r, 0.8, 1.2) * mask / 7)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_grad_on_policy_kl(kl_type):
    lp, ref, mask, sampler = _kl_batch()
    beta = 0.07
    g = loss_grad(lp, f32(lp), f32(ref), f32([0.0, 0.0]), f32(mask), sampler_logprobs=f32(sampler), kl_coef=beta,
              kl_type=kl_type, on_policy_kl=True)
    # loss term beta * v * k(ref - lp), v = exp(lp - sg(sampler)): d/dlp = beta * v * (k + dk/dlp)
    x = f64(ref) - f64(lp)
    v = np.exp(f64(lp) - f64(sampler))
    k = {"k1": -x, "k2": 0.5 * x**2, "k3": np.exp(x) - 1 - x}[kl_type]
    dk = {"k1": np.ones_like(x), "k2": -x, "k3": 1 - np.exp(x)}[kl_type]
    close(g, beta * v * (k + dk) * mask / mask.sum())


def test_grad_positive_nll():
    lp, old, adv, mask = ragged_batch()
    old = lp + 0.02  # every ratio inside the clip range
    pos = np.array([1.0, 0.0, 1.0, 0.0])
    lam = 0.6
    g = loss_grad(lp, f32(old), None, f32(adv), f32(mask), token_level=False, positive_nll_weight=lam,
                  positive_rows=pos)
    r = np.exp(f64(lp) - f64(old))
    actor = -adv[:, None] * r * mask / np.maximum(mask.sum(1, keepdims=True), 1) / 3
    nll = -lam * pos[:, None] * mask / 3  # 3 valid tokens in the positive rows
    close(g, actor + nll)


# ----------------------------------------------------------------------------------------------------------------
# Microbatch additivity
# ----------------------------------------------------------------------------------------------------------------
