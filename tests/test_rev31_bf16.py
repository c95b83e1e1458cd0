"""Sampler-vs-trainer log-prob checks around the top-k/top-p floor: a token that the trainer's recomputed filter
leaves out (rounding in bf16 puts 0.1-0.5% of sampled tokens at the set's edge outside it, with SmolLM2), and the
padding columns, whose pad token is usually outside the set, carry the -1e4 log-prob floor in the recomputed old
log-probs. It must not leak into the metrics, the sample masking or REINFORCE++'s KL in the reward."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxrl_llm.algorithms import grpo
from jaxrl_llm.algorithms.pg_losses import policy_gradient_loss
from jaxrl_llm.rl_batch import logprob_error_metrics, mask_logprob_errors, reward_kl

FLOOR = grpo.LOGP_FLOOR


def _batch() -> dict[str, np.ndarray]:
    """Row 0: two tokens 2 nats off the sampler's, then padding (at the floor); row 1: one token outside the
    trainer's filter (floor) among exact ones; row 2: exact, then padding."""
    return {"loss_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], np.int32),
            "sampler_logprobs": np.array([[-1, -1, 0, 0], [-1, -2, -3, -1], [-1, -1, -1, 0]], np.float32),
            "old_logprobs": np.array([[-3, -3, FLOOR, FLOOR], [-1, -2, FLOOR, -1], [-1, -1, -1, FLOOR]], np.float32),
            "ref_logprobs": np.array([[-3, -3, -9, -9], [-1, -2, -4, -1], [-1, -1, -1, -9]], np.float32)}


def test_logprob_error_threshold_masks_rows_with_padding():
    """exp(1e4) x mask 0 at a padding column was NaN: the row's mean was NaN, never above the threshold, so a row
    shorter than the budget was never masked however far its sampler and trainer log-probs were apart."""
    b = _batch()
    assert mask_logprob_errors(b, 2.0) == 2  # row 0 (mean e^2) and row 1 (a token the trainer gives probability 0)
    np.testing.assert_array_equal(b["loss_mask"].sum(1), [0, 0, 3])


def test_logprob_error_metrics_leave_out_tokens_outside_the_filter():
    """One floored token made logprob_error_mean ~1e4 / tokens (13 to 45 on SmolLM2 bf16 with top-p/top-k, where the
    real error was 0.03) and logprob_error_max 1e4; they are counted apart as logprob_outside_filter."""
    m = logprob_error_metrics(_batch())
    assert m == {"logprob_error_max": 2.0, "logprob_error_mean": 4.0 / 8, "logprob_outside_filter": 1.0}


def test_reward_kl_ignores_the_floor():
    """REINFORCE++'s kl_in_reward: a floored old log-prob gave the clamped k3 e^20 - 21 ~ 5e8 on its token, which
    the batch whitening then made the only advantage left."""
    b = _batch()
    kl = reward_kl(b, "k3")
    assert np.isfinite(kl).all() and kl.max() < 1.0
    assert kl[1, 2] == 0.0 and kl[0, 2] == 0.0
    np.testing.assert_allclose(kl[0, 0], 0.0)  # ref == old there


def test_approx_entropy_and_positive_nll_ignore_the_floor():
    """approx_entropy (-log p averaged over tokens) and the positive-example NLL took a floored token as -1e4:
    +1e4 / tokens on the metric and on the logged loss (its gradient was already 0)."""
    lp = jnp.array([[-1.0, FLOOR, -2.0]])
    mask = jnp.ones((1, 3))
    kw = dict(positive_nll_weight=1.0, positive_rows=jnp.array([True]))
    _, m = policy_gradient_loss(lp, lp, None, jnp.array([1.0]), mask, **kw)
    np.testing.assert_allclose(float(m["approx_entropy"]), 3.0 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["positive_nll_loss"]), 3.0 / 3, rtol=1e-6)
