"""GRPO group advantages and the KL estimators against independent float64 references (reference/nemo_rl.md
§1.4.2-1.4.3), and the public re-exports of the policy-gradient pieces."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from pg_reference import EPS, close, ref_advantages, ref_k, std_unbiased

from jaxrl_llm import losses
from jaxrl_llm.losses import grpo_advantages, kl_penalty

# ----------------------------------------------------------------------------------------------------------------
# Public re-exports
# ----------------------------------------------------------------------------------------------------------------

def test_reexported_from_public_losses_module():
    for name in ("grpo_advantages", "policy_gradient_loss", "policy_gradient_loss_sum", "kl_penalty", "KL_TYPES"):
        assert name in losses.__all__ and hasattr(losses, name), name
    assert tuple(losses.KL_TYPES) == ("k1", "k2", "k3")


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------

PAD_N = 12  # a multiple of every group size used below


def advantages(rewards, G, **kw):
    """grpo_advantages with the rewards padded by whole groups of zeros to PAD_N entries (one compiled shape);
    groups are independent, so the padding cannot change the real groups' advantages."""
    r = np.asarray(rewards, np.float32)
    assert PAD_N % G == 0 and r.shape[0] <= PAD_N
    out = np.asarray(grpo_advantages(jnp.asarray(np.concatenate([r, np.zeros(PAD_N - r.shape[0], np.float32)])), G,
                                     **kw))
    assert out.shape == (PAD_N,)
    return out[:r.shape[0]]


REWARDS_3x4 = [0.3, 1.7, -2.1, 0.9,   1.0, 0.0, 0.0, 1.0,   0.5, 0.25, 2.0, -1.0]


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_advantages_several_groups(leave_one_out, normalize_std):
    got = advantages(jnp.asarray(REWARDS_3x4), 4, leave_one_out=leave_one_out, normalize_std=normalize_std)
    assert got.shape == (12,)
    close(got, ref_advantages(REWARDS_3x4, 4, leave_one_out, normalize_std))


def test_advantages_hand_values():
    # Plain baseline, G=4, rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3).
    s = math.sqrt(1.0 / 3.0)
    a = 0.5 / (s + EPS)
    close(advantages([1.0, 0.0, 0.0, 1.0], 4, leave_one_out=False), [a, -a, -a, a])
    # LOO, G=4, first sample r=1, peers [0, 0, 1]: b = 1/3, s = std([0,0,1], ddof=1) = sqrt(1/3).
    got = advantages([1.0, 0.0, 0.0, 1.0], 4, leave_one_out=True)
    close(got[0], (1 - 1 / 3) / (s + EPS))
    # sample r=0, peers [1, 0, 1]: b = 2/3, same std.
    close(got[1], (0 - 2 / 3) / (s + EPS))
    # no normalisation: plain r - mean and LOO r - mean(others)
    close(advantages([3.0, 1.0, 2.0], 3, leave_one_out=False, normalize_std=False), [1.0, -1.0, 0.0])
    close(advantages([3.0, 1.0, 2.0], 3, leave_one_out=True, normalize_std=False), [1.5, -1.5, 0.0])


def test_advantages_eps_is_used():
    got = advantages([2.0, 0.0, 1.0, 1.0], 4, leave_one_out=False, eps=0.5)
    s = std_unbiased([2.0, 0.0, 1.0, 1.0])
    close(got, [1.0 / (s + 0.5), -1.0 / (s + 0.5), 0.0, 0.0])


def test_advantages_loo_sample_whose_peers_agree_is_not_normalised():
    # reference §1.4.2: rewards [1,0,0] with LOO -> the first sample's peers [0,0] have zero std: A = +1,
    # the others: b = 0.5, s = std([1,0]) = sqrt(0.5): A = -0.5 / (sqrt(0.5) + 1e-6) ~ -0.71.
    got = advantages([1.0, 0.0, 0.0], 3)
    close(got, [1.0, -0.5 / (math.sqrt(0.5) + EPS), -0.5 / (math.sqrt(0.5) + EPS)])
    close(got, ref_advantages([1.0, 0.0, 0.0], 3))
    # without LOO the same group is normalised by its one std
    s = std_unbiased([1.0, 0.0, 0.0])
    close(advantages([1.0, 0.0, 0.0], 3, leave_one_out=False), np.array([2 / 3, -1 / 3, -1 / 3]) / (s + EPS))


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_advantages_all_equal_groups_are_zero_and_unnormalised(leave_one_out):
    rewards = [0.7] * 4 + [1.0, 0.0, 1.0, 0.0] + [0.0] * 4
    got = np.asarray(advantages(rewards, 4, leave_one_out=leave_one_out))
    assert np.all(np.isfinite(got))
    close(got[:4], 0.0)
    close(got[8:], 0.0)
    close(got, ref_advantages(rewards, 4, leave_one_out))


def test_advantages_small_groups():
    # G=2 with LOO: one peer, no spread to measure -> r_i - r_j unnormalised.
    close(advantages([1.0, 0.0, 0.25, 0.75], 2), [1.0, -1.0, -0.5, 0.5])
    close(advantages([1.0, 0.0, 0.25, 0.75], 2), ref_advantages([1.0, 0.0, 0.25, 0.75], 2))
    # G=2 without LOO: (r - mean) / (unbiased std + eps); std of [1,0] is sqrt(0.5)
    close(advantages([1.0, 0.0], 2, leave_one_out=False), np.array([0.5, -0.5]) / (math.sqrt(0.5) + EPS))
    # G=1: the baseline is the reward itself
    close(advantages([1.0, 0.0, 3.0], 1), [0.0, 0.0, 0.0])
    close(advantages([1.0, 0.0, 3.0], 1, leave_one_out=False), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("G,value,leave_one_out", [(8, 0.3, False), (16, 0.7, True), (16, 0.9, False)])
def test_advantages_all_equal_large_groups_are_zero(G, value, leave_one_out):
    got = np.asarray(grpo_advantages(jnp.full((G,), value, jnp.float32), G, leave_one_out=leave_one_out))
    close(got, np.zeros(G))


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_advantages_offset_rewards_precision(leave_one_out):
    rewards = (np.random.default_rng(0).normal(0.0, 1.0, 16) + 20.0).astype(np.float32)
    got = grpo_advantages(jnp.asarray(rewards), 8, leave_one_out=leave_one_out)
    # atol 1e-5: float32 cannot resolve a mean of values near 20 better than ulp(20) ~ 2e-6
    close(got, ref_advantages(rewards, 8, leave_one_out), atol=1e-5)


@pytest.mark.parametrize("rewards,G", [(np.zeros((2, 4)), 4), (np.zeros(7), 4), (np.zeros(4), 0), (np.zeros(4), -2)])
def test_advantages_bad_shapes(rewards, G):
    with pytest.raises(ValueError, match="group"):
        grpo_advantages(rewards, G)


# ----------------------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------------------

def test_kl_penalty_estimators_and_input_clamp():
    logr = np.array([-25.0, -3.0, -0.5, 0.0, 0.4, 2.0, 25.0])
    for kl_type in ("k1", "k2", "k3"):
        got = kl_penalty(jnp.asarray(logr, jnp.float32), kl_type)
        close(got, [ref_k(x, kl_type) for x in logr], rtol=2e-6)
    close(kl_penalty(jnp.asarray([25.0]), "k1"), [-20.0])
    close(kl_penalty(jnp.asarray([-25.0]), "k2"), [200.0])
    with pytest.raises(ValueError, match="kl_type"):
        kl_penalty(jnp.zeros(3), "k4")
