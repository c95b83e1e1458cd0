"""REINFORCE++ / GDPO advantages, reward scaling and the stop-properly penalty (jaxrl_llm.algorithms.advantages),
and the host-side reward pieces of the GRPO loop (rl_train: shaped_rewards, compute_advantages,
mask_logprob_errors, reward_components, prepare_batch), each against an independent float64 reference written
out below as plain loops (NeMo RL's semantics)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm.algorithms import advantages as adv_lib
from jaxrl_llm.rl_batch import (
    Rollouts,
    compute_advantages,
    mask_logprob_errors,
    prepare_batch,
    reward_components,
    shaped_rewards,
)

ATOL = 2e-5


def _config(**over):
    return recipe("grpo_tiny", over)


def _rollouts(rewards, lengths, finish, prompt_len=3, components=None):
    R = len(rewards)
    return Rollouts(task_idx=list(range(R)), prompts=[[5] * prompt_len for _ in range(R)],
                    tokens=[[7] * n for n in lengths], logprobs=[[-0.5] * n for n in lengths], finish=list(finish),
                    rewards=np.asarray(rewards, np.float32), accuracy=np.asarray(rewards, np.float32) >= 1,
                    counts={"timeouts": 1},
                    components={k: np.asarray(v, np.float32) for k, v in (components or {}).items()})


# ------------------------------------------------------------------------------- float64 references (plain loops)


def _mean(xs):
    return sum(xs) / len(xs)


def _std_unbiased(xs):
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ref_reinforce_pp(rewards, G, mask, minus_baseline=True, kl=None, kl_coef=0.0):
    rewards = [float(x) for x in rewards]
    R = len(rewards)
    T = len(mask[0])
    a = []
    for g in range(R // G):
        grp = rewards[g * G:(g + 1) * G]
        b = _mean(grp)
        for r in grp:
            a.append(r - b if minus_baseline else r)
    A = [[a[i] - (kl_coef * float(kl[i][t]) if (kl is not None and kl_coef != 0) else 0.0) for t in range(T)]
         for i in range(R)]
    n = s = 0.0
    for i in range(R):
        for t in range(T):
            if mask[i][t] > 0:
                n += 1.0
                s += A[i][t]
    mu = s / n
    v = 0.0
    for i in range(R):
        for t in range(T):
            if mask[i][t] > 0:
                v += (A[i][t] - mu) ** 2
    var = v / n
    d = math.sqrt(max(var, 1e-8))
    return np.array([[(A[i][t] - mu) / d for t in range(T)] for i in range(R)])


def ref_grpo(rewards, G, leave_one_out=True, normalize_std=True, eps=1e-6):
    rewards = [float(x) for x in rewards]
    out = []
    for g in range(len(rewards) // G):
        grp = rewards[g * G:(g + 1) * G]
        for i, r in enumerate(grp):
            base = [x for j, x in enumerate(grp) if j != i] if leave_one_out else grp
            a = r - _mean(base)
            s = _std_unbiased(base)
            if normalize_std and s > 0:
                a = a / (s + eps)
            out.append(a)
    return out


def ref_gdpo(components, G, weights=None, leave_one_out=True, normalize_std=True):
    K = len(components)
    w = [1.0] * K if weights is None else [float(x) for x in weights]
    R = len(components[0])
    per = [ref_grpo(c, G, leave_one_out, normalize_std) for c in components]
    A = [sum(w[k] * per[k][i] for k in range(K)) for i in range(R)]
    m = _mean(A)
    s = _std_unbiased(A)
    return np.array([(x - m) / s if s > 0 else x - m for x in A])


def ref_scale(r, smin, smax, tmin, tmax):
    return [tmin + (min(max(float(x), smin), smax) - smin) / (smax - smin) * (tmax - tmin) for x in r]


def ref_overlong(rewards, lengths, max_new, buf, pen):
    if buf <= 0:
        return [float(r) for r in rewards]
    return [float(r) + min(-(n - (max_new - buf)) / buf * pen, 0.0) for r, n in zip(rewards, lengths, strict=True)]


# ------------------------------------------------------------------------------------------------ REINFORCE++


def test_reinforce_pp_hand_values():
    mask = np.ones((4, 3), np.float32)
    got = np.asarray(adv_lib.reinforce_pp_advantages(np.array([1.0, 0.0, 3.0, 1.0]), 2, mask))
    # baseline: a = [0.5, -0.5, 1, -1]; mu = 0; var (biased, over 12 tokens) = 0.625
    expected = np.array([0.5, -0.5, 1.0, -1.0]) / math.sqrt(0.625)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, np.repeat(expected[:, None], 3, 1), atol=ATOL)
    # no baseline: a = r; mu = 1.25, var = 1.1875
    got = np.asarray(adv_lib.reinforce_pp_advantages(np.array([1.0, 0.0, 3.0, 1.0]), 2, mask, minus_baseline=False))
    expected = (np.array([1.0, 0.0, 3.0, 1.0]) - 1.25) / math.sqrt(1.1875)
    np.testing.assert_allclose(got, np.repeat(expected[:, None], 3, 1), atol=ATOL)


def test_reinforce_pp_plain_group_mean_not_leave_one_out():
    # G=3: the plain mean and the leave-one-out mean give advantages that are not proportional, so whitening
    # cannot hide the difference
    r = np.array([1.0, 0.0, 0.0, 2.0, 1.0, 3.0])
    mask = np.array([[1, 1, 0, 0]] * 3 + [[1, 1, 1, 1]] * 3, np.float32)
    got = np.asarray(adv_lib.reinforce_pp_advantages(r, 3, mask))
    ref = ref_reinforce_pp(r, 3, mask)
    np.testing.assert_allclose(got[mask > 0], ref[mask > 0], atol=ATOL)


def test_reinforce_pp_whitening_over_valid_tokens_only():
    # rows of different lengths: mu/var weight each sample by its number of valid tokens
    rng = np.random.default_rng(0)
    r = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    mask = np.zeros((8, 6), np.float32)
    for i, n in enumerate([1, 6, 2, 5, 3, 6, 4, 1]):
        mask[i, :n] = 1
    kl = rng.uniform(0, 0.5, (8, 6))
    for kw in (dict(), dict(minus_baseline=False), dict(kl_RT=kl, kl_coef=0.3)):
        got = np.asarray(adv_lib.reinforce_pp_advantages(r, 4, mask, **kw))
        ref = ref_reinforce_pp(r, 4, mask, kw.get("minus_baseline", True), kw.get("kl_RT"), kw.get("kl_coef", 0.0))
        np.testing.assert_allclose(got[mask > 0], ref[mask > 0], atol=ATOL)
        # the valid tokens are whitened: mean 0 and (biased) variance 1 over them
        assert abs(got[mask > 0].mean()) < 1e-5 and got[mask > 0].var() == pytest.approx(1.0, abs=1e-4)
    # what lies under masked tokens (here: a huge KL) does not move the valid tokens' values
    kl2 = np.where(mask > 0, kl, 1e3)
    a = np.asarray(adv_lib.reinforce_pp_advantages(r, 4, mask, kl_RT=kl, kl_coef=0.3))
    b = np.asarray(adv_lib.reinforce_pp_advantages(r, 4, mask, kl_RT=kl2, kl_coef=0.3))
    np.testing.assert_allclose(a[mask > 0], b[mask > 0], atol=ATOL)


def test_reinforce_pp_all_equal_rewards_give_zero():
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], np.float32)
    for mb in (True, False):
        got = np.asarray(adv_lib.reinforce_pp_advantages(np.full(4, 1.0), 2, mask, minus_baseline=mb))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got[mask > 0], 0.0, atol=1e-6)


def test_reinforce_pp_variance_floor():
    # the variance is clamped at 1e-8 (not 1e-8 added): a = +-5e-5 (var 2.5e-9) gives +-0.5, a = +-2e-4
    # (var 4e-8, above the floor) gives +-1
    mask = np.ones((2, 2), np.float32)
    got = np.asarray(adv_lib.reinforce_pp_advantages(np.array([0.0, 1e-4]), 2, mask))
    np.testing.assert_allclose(got, [[-0.5, -0.5], [0.5, 0.5]], atol=1e-3)
    got = np.asarray(adv_lib.reinforce_pp_advantages(np.array([0.0, 4e-4]), 2, mask))
    np.testing.assert_allclose(got, [[-1.0, -1.0], [1.0, 1.0]], atol=1e-3)


def test_reinforce_pp_kl_in_reward_is_per_token():
    r = np.array([1.0, 0.0, 0.5, 0.5])
    mask = np.ones((4, 4), np.float32)
    kl = np.array([[0.0, 0.1, 0.4, 0.9], [0.2, 0.2, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.25, 0.0]])
    got = np.asarray(adv_lib.reinforce_pp_advantages(r, 2, mask, kl_RT=kl, kl_coef=0.5))
    np.testing.assert_allclose(got, ref_reinforce_pp(r, 2, mask, True, kl, 0.5), atol=ATOL)
    assert np.ptp(got[0]) > 0.1 and np.ptp(got[3]) > 0.1  # values vary along a row
    # more KL on a token = a lower advantage there (row 0: kl increasing along the row)
    assert np.all(np.diff(got[0]) < 0)
    # kl_coef 0 (or no KL) ignores the KL: constant along each row, the plain result
    plain = np.asarray(adv_lib.reinforce_pp_advantages(r, 2, mask))
    np.testing.assert_allclose(np.asarray(adv_lib.reinforce_pp_advantages(r, 2, mask, kl_RT=kl, kl_coef=0.0)), plain,
                               atol=ATOL)
    np.testing.assert_allclose(plain, ref_reinforce_pp(r, 2, mask), atol=ATOL)


def test_reinforce_pp_shape_errors():
    with pytest.raises(ValueError):
        adv_lib.reinforce_pp_advantages(np.zeros(5), 2, np.ones((5, 3)))
    with pytest.raises(ValueError):
        adv_lib.reinforce_pp_advantages(np.zeros(4), 2, np.ones((3, 3)))


# ------------------------------------------------------------------------------------------------------- GDPO


def test_gdpo_hand_values_unbiased_whitening_and_weight_order():
    c1 = np.array([1.0, 0.0, 1.0, 1.0])
    c2 = np.array([0.0, 0.0, 1.0, 0.0])
    # plain mean, no std: A1 = [.5, -.5, 0, 0], A2 = [0, 0, .5, -.5]; sum = [.5, -.5, .5, -.5];
    # mean 0, unbiased std sqrt(1/3) -> +-sqrt(3)/2 (a biased std would give +-1)
    got = np.asarray(adv_lib.gdpo_advantages([c1, c2], 2, leave_one_out=False, normalize_std=False))
    h = math.sqrt(3) / 2
    np.testing.assert_allclose(got, [h, -h, h, -h], atol=ATOL)
    # weights (2, 1): sum = [1, -1, .5, -.5], std = sqrt(2.5 / 3)
    got = np.asarray(adv_lib.gdpo_advantages([c1, c2], 2, [2.0, 1.0], leave_one_out=False, normalize_std=False))
    np.testing.assert_allclose(got, np.array([1.0, -1.0, 0.5, -0.5]) / math.sqrt(2.5 / 3), atol=ATOL)
    # the weights follow the components' order
    got = np.asarray(adv_lib.gdpo_advantages([c2, c1], 2, [2.0, 1.0], leave_one_out=False, normalize_std=False))
    np.testing.assert_allclose(got, np.array([0.5, -0.5, 1.0, -1.0]) / math.sqrt(2.5 / 3), atol=ATOL)


@pytest.mark.parametrize("loo", [True, False])
@pytest.mark.parametrize("norm", [True, False])
def test_gdpo_matches_reference(loo, norm):
    rng = np.random.default_rng(1)
    G = 4
    fmt = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0], np.float64)  # one group with no spread, one with
    math_ = np.round(rng.uniform(0, 1, 12), 3)                         # LOO std 0 for sample 0 ([1,0,0,0])
    small = np.round(rng.uniform(0, 1e-3, 12), 7)  # a small-scale component: the eps 1e-6 is visible on it
    comps = [fmt, math_, small]
    for w in (None, [1.0, 0.5, 2.0]):
        got = np.asarray(adv_lib.gdpo_advantages(comps, G, w, leave_one_out=loo, normalize_std=norm))
        ref = ref_gdpo(comps, G, w, loo, norm)
        assert got.shape == (12,)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=1e-5)
        assert abs(got.mean()) < 1e-5 and np.std(got, ddof=1) == pytest.approx(1.0, abs=1e-4)
    # weights default to all 1
    np.testing.assert_allclose(np.asarray(adv_lib.gdpo_advantages(comps, G, leave_one_out=loo, normalize_std=norm)),
                               np.asarray(adv_lib.gdpo_advantages(comps, G, [1, 1, 1], leave_one_out=loo,
                                                                  normalize_std=norm)), atol=1e-6)


def test_gdpo_leave_one_out_differs_from_plain_mean():
    # with std normalisation the two baselines give different (not merely rescaled) advantages
    c1 = np.array([1.0, 0.0, 0.0, 0.5, 0.2, 0.9, 0.9, 0.1])
    c2 = np.array([0.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.0, 0.7])
    a = np.asarray(adv_lib.gdpo_advantages([c1, c2], 4, leave_one_out=True))
    b = np.asarray(adv_lib.gdpo_advantages([c1, c2], 4, leave_one_out=False))
    np.testing.assert_allclose(a, ref_gdpo([c1, c2], 4, None, True, True), atol=ATOL)
    np.testing.assert_allclose(b, ref_gdpo([c1, c2], 4, None, False, True), atol=ATOL)
    assert np.max(np.abs(a - b)) > 1e-2


def test_gdpo_no_spread_is_zero_not_nan():
    comps = [np.ones(8), np.array([0.5] * 4 + [0.0] * 4)]
    got = np.asarray(adv_lib.gdpo_advantages(comps, 4))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_gdpo_errors():
    with pytest.raises(ValueError, match="at least 2"):
        adv_lib.gdpo_advantages([np.zeros(4)], 2)
    with pytest.raises(ValueError):
        adv_lib.gdpo_advantages([], 2)
    with pytest.raises(ValueError, match="weights"):
        adv_lib.gdpo_advantages([np.zeros(4), np.ones(4)], 2, [1.0])
    with pytest.raises(ValueError, match="weights"):
        adv_lib.gdpo_advantages([np.zeros(4), np.ones(4)], 2, [1.0, 2.0, 3.0])


# ------------------------------------------------------------------------------------- reward transforms


def test_scale_rewards_clamps_and_maps():
    r = np.array([-1.0, 0.0, 0.5, 2.0, 3.0, 10.0])
    got = np.asarray(adv_lib.scale_rewards(r, 0.0, 2.0, -1.0, 1.0))
    np.testing.assert_allclose(got, [-1.0, -1.0, -0.5, 1.0, 1.0, 1.0], atol=1e-6)
    got = np.asarray(adv_lib.scale_rewards(r, 1.0, 5.0, 0.0, 10.0))
    np.testing.assert_allclose(got, ref_scale(r, 1.0, 5.0, 0.0, 10.0), atol=1e-5)
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, 2.5, 5.0, 10.0], atol=1e-5)
    # a reversed target range flips the order
    np.testing.assert_allclose(np.asarray(adv_lib.scale_rewards(r, 0.0, 2.0, 1.0, 0.0)),
                               [1.0, 1.0, 0.75, 0.0, 0.0, 0.0], atol=1e-6)
    for smin, smax in ((1.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="source_max"):
            adv_lib.scale_rewards(r, smin, smax, 0.0, 1.0)


def test_stop_properly_penalty():
    r = np.array([1.0, 0.8, -0.5, 1.0])
    trunc = np.array([True, False, True, False])
    np.testing.assert_allclose(np.asarray(adv_lib.stop_properly_penalty(r, trunc, 0.5)), [0.5, 0.8, -0.25, 1.0],
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(adv_lib.stop_properly_penalty(r, trunc, 0.0)), [0.0, 0.8, 0.0, 1.0],
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(adv_lib.stop_properly_penalty(r, np.zeros(4, bool), 0.1)), r, atol=1e-6)


# ------------------------------------------------------------------------------------------ rl_train: rewards


def test_shaped_rewards_scaling_applies_to_rewards_and_components():
    roll = _rollouts([-1.0, 0.0, 1.0, 4.0], [2, 3, 4, 5], ["stop"] * 4,
                     components={"math": [0.0, 2.0, 3.0, 1.0], "format": [-5.0, 0.5, 1.0, 1.5]})
    c = _config(**{"rollout.max_new_tokens": 8, "grpo.reward_scaling.enabled": True,
                   "grpo.reward_scaling.source_min": 0.0, "grpo.reward_scaling.source_max": 2.0,
                   "grpo.reward_scaling.target_min": -1.0, "grpo.reward_scaling.target_max": 1.0})
    r, comps = shaped_rewards(roll, c)
    np.testing.assert_allclose(r, [-1.0, -1.0, 0.0, 1.0], atol=1e-6)
    assert sorted(comps) == ["format", "math"]
    np.testing.assert_allclose(comps["math"], [-1.0, 1.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(comps["format"], [-1.0, -0.5, 0.0, 0.5], atol=1e-6)
    np.testing.assert_array_equal(roll.rewards, [-1.0, 0.0, 1.0, 4.0])  # the rollouts are not modified
    # disabled: unchanged
    r, comps = shaped_rewards(roll, _config(**{"rollout.max_new_tokens": 8}))
    np.testing.assert_allclose(r, roll.rewards, atol=0)
    np.testing.assert_allclose(comps["format"], roll.components["format"], atol=0)


def test_shaped_rewards_scaling_then_overlong_shaping():
    rewards, lengths = [0.0, 2.0, 4.0, 1.0], [4, 7, 8, 10]
    roll = _rollouts(rewards, lengths, ["stop", "stop", "length", "length"])
    c = _config(**{"rollout.max_new_tokens": 10, "grpo.overlong_buffer": 4, "grpo.overlong_penalty": 0.5,
                   "grpo.reward_scaling.enabled": True, "grpo.reward_scaling.source_min": 0.0,
                   "grpo.reward_scaling.source_max": 4.0, "grpo.reward_scaling.target_min": 0.0,
                   "grpo.reward_scaling.target_max": 1.0})
    r, _ = shaped_rewards(roll, c)
    expected = ref_overlong(ref_scale(rewards, 0.0, 4.0, 0.0, 1.0), lengths, 10, 4, 0.5)
    np.testing.assert_allclose(r, expected, atol=1e-6)
    np.testing.assert_allclose(r, [0.0, 0.5 - 0.125, 1.0 - 0.25, 0.25 - 0.5], atol=1e-6)


@pytest.mark.parametrize("coef", [0.5, 0.0])
def test_shaped_rewards_stop_properly_penalty_replaces_overlong_shaping(coef):
    rewards, lengths = [1.0, 0.8, 1.0, 0.6], [3, 10, 9, 10]
    roll = _rollouts(rewards, lengths, ["stop", "length", "stop", "length"],
                     components={"a": [1.0, 1.0, 0.0, 1.0], "b": [0.0, 0.5, 1.0, 1.0]})
    c = _config(**{"rollout.max_new_tokens": 10, "grpo.overlong_buffer": 4, "grpo.overlong_penalty": 1.0,
                   "grpo.stop_properly_penalty": coef})
    r, comps = shaped_rewards(roll, c)
    # only the truncated samples (finish "length") are scaled; sample 2 (long but stopped) gets no DAPO penalty
    np.testing.assert_allclose(r, [1.0, coef * 0.8, 1.0, coef * 0.6], atol=1e-6)
    np.testing.assert_allclose(comps["a"], roll.components["a"], atol=0)
    # with the penalty unset, DAPO shaping applies instead
    r, _ = shaped_rewards(roll, _config(**{"rollout.max_new_tokens": 10, "grpo.overlong_buffer": 4,
                                           "grpo.overlong_penalty": 1.0}))
    np.testing.assert_allclose(r, ref_overlong(rewards, lengths, 10, 4, 1.0), atol=1e-6)


def test_shaped_rewards_scaling_then_stop_properly_penalty():
    roll = _rollouts([2.0, 4.0], [2, 10], ["stop", "length"])
    c = _config(**{"rollout.max_new_tokens": 10, "grpo.stop_properly_penalty": 0.5,
                   "grpo.reward_scaling.enabled": True, "grpo.reward_scaling.source_min": 0.0,
                   "grpo.reward_scaling.source_max": 4.0, "grpo.reward_scaling.target_min": 1.0,
                   "grpo.reward_scaling.target_max": 2.0})
    r, _ = shaped_rewards(roll, c)
    np.testing.assert_allclose(r, [1.5, 0.5 * 2.0], atol=1e-6)  # (not 1 + 0.5 * 4 / 4 = 1.5: scaled first)


def test_reward_components(caplog):
    info = [{"reward/math": 1, "reward/format": 0.5, "other": 3}, {"reward/format": 0.0, "reward/math": 0.25}]
    comps = reward_components(info)
    assert list(comps) == ["format", "math"]
    np.testing.assert_allclose(comps["format"], [0.5, 0.0])
    np.testing.assert_allclose(comps["math"], [1.0, 0.25])
    assert reward_components([{"x": 1}, {}]) == {}
    # a component only some samples carry is left out, with a warning naming it and the first sample without it
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.rl_train"):
        comps = reward_components([{"reward/math": 1.0, "reward/f": 1.0}, {"reward/f": 0.0},
                                   {"reward/math": 0.0, "reward/f": 0.0}])
    assert list(comps) == ["f"] and "'math'" in caplog.text and "sample 1" in caplog.text
    np.testing.assert_allclose(comps["f"], [1.0, 0.0, 0.0])
    assert reward_components([{}, {"reward/math": 1.0}]) == {}


# ---------------------------------------------------------------------------------------- rl_train: advantages


def _mask(lengths, T):
    m = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    return m


def test_compute_advantages_grpo_broadcast():
    r = np.array([1.0, 0.0, 0.0, 0.5, 0.2, 0.9, 0.9, 0.1], np.float32)
    mask = _mask([1, 2, 3, 4, 5, 5, 2, 1], 5)
    for loo, norm in ((True, True), (False, True), (True, False), (False, False)):
        c = _config(**{"rollout.group_size": 4, "grpo.leave_one_out": loo, "grpo.normalize_std": norm})
        got = compute_advantages(c, r, {}, mask)
        assert got.shape == mask.shape
        np.testing.assert_allclose(got, np.repeat(np.array(ref_grpo(r, 4, loo, norm))[:, None], 5, 1), atol=ATOL)


def test_compute_advantages_reinforce_pp_with_kl_in_reward():
    rng = np.random.default_rng(2)
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], np.float32)
    mask = _mask([2, 4, 1, 3, 4, 2], 4)
    kl = rng.uniform(0, 1, (6, 4)).astype(np.float32)
    c = _config(**{"rollout.group_size": 3, "grpo.adv_estimator": "reinforce_plus_plus", "grpo.kl_coef": 0.4,
                   "grpo.kl_in_reward": True})
    got = compute_advantages(c, r, {}, mask, kl)
    ref = ref_reinforce_pp(r, 3, mask, True, kl, 0.4)
    assert got.shape == (6, 4)
    np.testing.assert_allclose(got[mask > 0], ref[mask > 0], atol=ATOL)
    # kl_in_reward off: the KL stays in the loss and does not enter the advantage
    c = _config(**{"rollout.group_size": 3, "grpo.adv_estimator": "reinforce_plus_plus", "grpo.kl_coef": 0.4,
                   "grpo.minus_baseline": False})
    got = compute_advantages(c, r, {}, mask, kl)
    ref = ref_reinforce_pp(r, 3, mask, False)
    np.testing.assert_allclose(got[mask > 0], ref[mask > 0], atol=ATOL)


def test_compute_advantages_gdpo_sorted_names_and_weights():
    G = 4
    comps = {"math": np.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.9, 0.0], np.float32),   # insertion order is
             "format": np.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0], np.float32)}  # not sorted order
    rewards = np.zeros(8, np.float32)  # GDPO ignores the summed reward
    mask = _mask([3] * 8, 3)
    c = _config(**{"rollout.group_size": G, "grpo.adv_estimator": "gdpo", "grpo.reward_weights": (2.0, 0.5)})
    got = compute_advantages(c, rewards, comps, mask)
    ref = ref_gdpo([comps["format"], comps["math"]], G, [2.0, 0.5], True, True)  # weights in sorted-name order
    np.testing.assert_allclose(got, np.repeat(ref[:, None], 3, 1), atol=ATOL)
    assert np.max(np.abs(ref - ref_gdpo([comps["math"], comps["format"]], G, [2.0, 0.5]))) > 1e-2
    # default weights (): all 1; and the config's baseline options reach GDPO
    c = _config(**{"rollout.group_size": G, "grpo.adv_estimator": "gdpo", "grpo.leave_one_out": False})
    got = compute_advantages(c, rewards, comps, mask)
    np.testing.assert_allclose(got[:, 0], ref_gdpo([comps["format"], comps["math"]], G, None, False, True), atol=ATOL)


def test_compute_advantages_gdpo_errors_name_the_key():
    mask = _mask([2] * 4, 2)
    c = _config(**{"rollout.group_size": 2, "grpo.adv_estimator": "gdpo"})
    with pytest.raises(ValueError, match="grpo.adv_estimator"):
        compute_advantages(c, np.zeros(4, np.float32), {"only": np.ones(4, np.float32)}, mask)
    with pytest.raises(ValueError, match="grpo.adv_estimator"):
        compute_advantages(c, np.zeros(4, np.float32), {}, mask)
    c = _config(**{"rollout.group_size": 2, "grpo.adv_estimator": "gdpo", "grpo.reward_weights": (1.0, 2.0, 3.0)})
    with pytest.raises(ValueError, match="grpo.adv_estimator"):
        compute_advantages(c, np.zeros(4, np.float32), {"a": np.ones(4, np.float32),
                                                         "b": np.array([0, 1, 0, 1], np.float32)}, mask)


@pytest.mark.parametrize("low,high", [(-0.5, 0.7), (-0.5, None), (None, 0.7), (None, None)])
def test_compute_advantages_clipping(low, high):
    r = np.array([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 0.0, -2.0], np.float32)
    mask = _mask([2] * 8, 2)
    c = _config(**{"rollout.group_size": 4, "grpo.leave_one_out": False, "grpo.normalize_std": False,
                   "grpo.advantage_clip_low": low, "grpo.advantage_clip_high": high})
    got = compute_advantages(c, r, {}, mask)
    raw = ref_grpo(r, 4, False, False)  # [0.75, -0.25, -0.25, -0.25, 2.5, 0.5, -0.5, -2.5]
    expected = [min(max(a, -math.inf if low is None else low), math.inf if high is None else high) for a in raw]
    np.testing.assert_allclose(got, np.repeat(np.array(expected)[:, None], 2, 1), atol=1e-6)


def test_compute_advantages_clipping_applies_to_reinforce_pp():
    r = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    mask = _mask([2] * 4, 2)
    c = _config(**{"rollout.group_size": 4, "grpo.adv_estimator": "reinforce_plus_plus",
                   "grpo.advantage_clip_high": 1.0})
    got = compute_advantages(c, r, {}, mask)
    ref = np.minimum(ref_reinforce_pp(r, 4, mask), 1.0)  # sample 0: sqrt(3) before the clamp
    np.testing.assert_allclose(got, ref, atol=ATOL)
    assert got[0, 0] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ rl_train: batch pieces


def test_mask_logprob_errors():
    T = 4
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.int32)
    diff = np.array([[0.1, -0.3, 5.0, 0.0],      # mean exp = 1.2275 (the masked 5.0 does not count): kept
                     [0.05, -0.05, 0.05, 10.0],   # 1.051: kept
                     [9.0, 9.0, 9.0, 9.0],        # no valid tokens: not counted
                     [0.0, -0.8, 0.0, 0.0],       # (1 + e^0.8) / 2 = 1.613 > 1.5 (exp of the mean: 1.49): masked
                     [2.0, -2.0, 2.0, -2.0]], np.float32)  # e^2: masked
    old = np.full((5, T), -1.0, np.float32)
    batch = {"loss_mask": mask.copy(), "sampler_logprobs": old + diff, "old_logprobs": old}
    assert mask_logprob_errors(batch, 1.5) == 2
    expected = mask.copy()
    expected[3] = 0
    expected[4] = 0
    np.testing.assert_array_equal(batch["loss_mask"], expected)
    # the threshold is strict: mean exactly 1 (no error) at threshold 1 is kept
    batch = {"loss_mask": mask.copy(), "sampler_logprobs": old.copy(), "old_logprobs": old}
    assert mask_logprob_errors(batch, 1.0) == 0
    np.testing.assert_array_equal(batch["loss_mask"], mask)
    # reference over a threshold sweep
    for thr in (1.0, 1.1, 1.3, 3.0, 10.0):
        batch = {"loss_mask": mask.copy(), "sampler_logprobs": old + diff, "old_logprobs": old}
        n = mask_logprob_errors(batch, thr)
        bad = []
        for i in range(5):
            vals = [math.exp(abs(float(diff[i, t]))) for t in range(T) if mask[i, t] > 0]
            bad.append(bool(vals) and sum(vals) / len(vals) > thr)
        assert n == sum(bad), thr
        np.testing.assert_array_equal(batch["loss_mask"], mask * (~np.array(bad))[:, None], err_msg=str(thr))


def test_prepare_batch_positive_uses_shaped_rewards_and_advantages_shape():
    rewards, lengths = [0.5, 0.0, 1.0, 0.2], [8, 2, 3, 7]
    roll = _rollouts(rewards, lengths, ["length", "stop", "stop", "stop"])
    c = _config(**{"rollout.group_size": 2, "rollout.num_prompts": 2, "rollout.max_new_tokens": 8,
                   "grpo.overlong_buffer": 4, "grpo.overlong_penalty": 1.0})
    batch, m = prepare_batch(roll, c, pad_id=0)
    shaped = ref_overlong(rewards, lengths, 8, 4, 1.0)  # [-0.5, 0, 1, -0.55]
    np.testing.assert_allclose(batch["shaped_rewards"], shaped, atol=1e-6)
    np.testing.assert_array_equal(batch["positive"], [0, 0, 1, 0])  # raw reward > 0 would give [1, 0, 1, 1]
    T = c.data.max_prompt_len + c.rollout.max_new_tokens
    assert batch["advantages"].shape == (4, T) == batch["loss_mask"].shape
    np.testing.assert_allclose(batch["advantages"], np.repeat(np.array(ref_grpo(shaped, 2))[:, None], T, 1),
                               atol=ATOL)
    assert not any(k.startswith("reward/") for k in m)


def test_prepare_batch_gdpo_and_component_metrics():
    comps = {"math": [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]}
    rewards = [a + b for a, b in zip(comps["math"], comps["format"], strict=True)]
    roll = _rollouts(rewards, [2, 3, 4, 5, 2, 3, 4, 5], ["stop"] * 8, components=comps)
    c = _config(**{"rollout.group_size": 4, "rollout.num_prompts": 2, "rollout.max_new_tokens": 8,
                   "grpo.adv_estimator": "gdpo", "grpo.reward_weights": (1.0, 3.0)})
    batch, m = prepare_batch(roll, c, pad_id=0)
    ref = ref_gdpo([comps["format"], comps["math"]], 4, [1.0, 3.0])
    T = c.data.max_prompt_len + c.rollout.max_new_tokens
    assert batch["advantages"].shape == (8, T)
    np.testing.assert_allclose(batch["advantages"], np.repeat(ref[:, None], T, 1), atol=ATOL)
    assert m["reward/math"] == pytest.approx(np.mean(comps["math"]))
    assert m["reward/format"] == pytest.approx(np.mean(comps["format"]))
    np.testing.assert_array_equal(batch["positive"], (np.array(rewards) > 0).astype(int))
