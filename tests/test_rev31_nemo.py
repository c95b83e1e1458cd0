"""NeMo RL's formulas restated independently (reference/nemo_rl.md, checked against NeMo RL's calculate_kl): the KL
estimator is clamped to +-10 before the coefficient multiplies it, in the loss and in REINFORCE++'s reward."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.algorithms.pg_losses import LOGP_FLOOR, policy_gradient_loss
from jaxrl_llm.rl_batch import reward_kl


def _k3(logr: float) -> float:
    x = min(max(logr, -20.0), 20.0)
    return math.exp(x) - 1.0 - x


def test_kl_loss_clamps_the_estimator_before_the_coefficient():
    # NeMo RL: kl = beta * calculate_kl(..., output_clamp_value=10) = beta * clamp(v * k, +-10). A sampled token the
    # reference likes e^3.9 times more than the policy: k3 = 44.5 -> 10 -> 0.01 * 10 = 0.1 (not 0.445), and the
    # clamped token has no gradient.
    lp, ref = jnp.array([[-3.0, -1.0]]), jnp.array([[0.9, -1.2]])
    mask = jnp.ones((1, 2))

    def loss(x):
        return policy_gradient_loss(x, x, ref, jnp.zeros(1), mask, kl_coef=0.01, kl_type="k3")[0]

    x1 = -1.2 - (-1.0)
    expected = 0.01 * (min(_k3(3.9), 10.0) + _k3(x1)) / 2
    np.testing.assert_allclose(float(loss(lp)), expected, rtol=1e-5)
    g = np.asarray(jax.grad(loss)(lp))
    # token 1 unclamped: d/dlp beta * v * k3(ref - lp) with v = exp(lp - sg(lp)) -> beta * (k3 + 1 - e^x) / 2
    np.testing.assert_allclose(g[0], [0.0, 0.01 * (_k3(x1) + 1.0 - math.exp(x1)) / 2], rtol=1e-5, atol=1e-8)


def test_kl_loss_weight_has_no_gradient_where_the_input_clamp_binds():
    # |ref - lp| > 20: k is the clamped constant, and NeMo RL detaches the weight there too (no score-function term)
    lp, ref = jnp.array([[-0.5]]), jnp.array([[-25.5]])
    g = jax.grad(lambda x: policy_gradient_loss(x, x, ref, jnp.zeros(1), jnp.ones((1, 1)), kl_coef=0.1,
                                                kl_type="k1")[0])(lp)
    assert float(g[0, 0]) == 0.0


def test_reinforce_pp_reward_kl_is_clamped_like_nemo():
    # REINFORCE++ kl_in_reward: NeMo RL's calculate_kl defaults (input 20, output 10) -> k3(10) = 2.2e4 becomes 10
    old = np.array([[-10.5, -1.0, -2.0]], np.float32)
    ref = np.array([[-0.5, -1.5, -2.0]], np.float32)
    kl = reward_kl({"old_logprobs": old, "ref_logprobs": ref}, "k3")
    np.testing.assert_allclose(kl[0], [10.0, _k3(-0.5), 0.0], rtol=1e-5)


def test_gspo_ratio_leaves_tokens_outside_the_trainers_filter_out_of_the_mean():
    # NeMo RL's GSPO ratio averages the log-ratio over actor_token_mask, which drops tokens whose current log-prob
    # the top-k/top-p filter removed; here the floor token's bounded log-ratio (-20) made the ratio 0.0068.
    lp = jnp.array([[-1.0, -0.5, -0.7, LOGP_FLOOR], [-0.2, -0.3, -0.4, -0.5]])
    old = jnp.array([[-1.01, -0.5, -0.7, -2.0], [-0.2, -0.3, -0.4, -0.5]])
    kw = dict(token_level=False, sequence_level_ratio=True, clip_low=3e-4, clip_high=4e-4)

    def loss(x):
        return policy_gradient_loss(x, old, None, jnp.array([1.0, 0.0]), jnp.ones((2, 4)), **kw)

    _, m = loss(lp)
    s0 = math.exp(0.01 / 3)  # the other three tokens' mean log-ratio
    np.testing.assert_allclose(float(m["ratio_max"]), s0, rtol=1e-5)
    np.testing.assert_allclose(float(m["ratio_min"]), 1.0, rtol=1e-6)
    # row 0 (A = 1, ratio above 1 + 4e-4): clipped, so no gradient anywhere; the floor token never gets one
    g = np.asarray(jax.grad(lambda x: loss(x)[0])(lp))
    assert np.all(g == 0.0)
    # inside the clip range the three kept tokens share -A s / |kept| / N_seq and the floor token gets nothing
    old2 = lp.at[0, :3].add(-1e-4).at[0, 3].set(-2.0)
    g = np.asarray(jax.grad(lambda x: policy_gradient_loss(x, old2, None, jnp.array([1.0, 0.0]), jnp.ones((2, 4)),
                                                           **kw)[0])(lp))
    np.testing.assert_allclose(g[0], [-math.exp(1e-4) / 3 / 2] * 3 + [0.0], rtol=1e-4)
