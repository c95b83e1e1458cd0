"""Tests written from a mutation-testing pass over the loss, advantage and optimizer code: each one pins down a
behaviour that an earlier test did not, against a formula written out here (NeMo RL's semantics, see
shared/reference/nemo_rl.md, and the docstrings), not against the library's own helpers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from recipes import recipe

from jaxrl_llm import models
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.algorithms.sft import microbatch_sums
from jaxrl_llm.optim import learning_rate_schedule, make_optimizer

# ------------------------------------------------------------------------------------ learning-rate schedule


def _ref_lr(step, lr, max_steps, warmup, schedule, floor):
    """Linear warmup 0 -> lr over `warmup` steps, then decay from lr to lr * floor over the remaining
    max_steps - warmup steps (held at the end value after that)."""
    if step < warmup:
        return lr * step / warmup
    t = min((step - warmup) / max(1, max_steps - warmup), 1.0)
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr + (lr * floor - lr) * t
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,floor", [(0, 0.0), (4, 0.0), (4, 0.1), (3, 0.25)])
def test_learning_rate_schedule_values(schedule, warmup, floor):
    lr, max_steps = 3e-4, 20
    sched = learning_rate_schedule(lr, max_steps, warmup, schedule, floor)
    got = [float(sched(s)) for s in range(max_steps + 3)]
    exp = [_ref_lr(s, lr, max_steps, warmup, schedule, floor) for s in range(max_steps + 3)]
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-12)
    if warmup:
        assert got[0] == 0.0 and got[warmup] == pytest.approx(lr)  # warmup ends at the peak, not a step late
    if schedule != "constant":
        assert got[max_steps] == pytest.approx(lr * floor, rel=1e-5, abs=1e-12)  # the floor is reached at max_steps


# -------------------------------------------------------------------------------------- grad-norm clipping


def _ref_adam_clipped(params, grads_seq, lr, clip, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (no weight decay) on gradients clipped by their GLOBAL norm over all leaves: g * min(1, clip / |g|)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads_seq, start=1):
        norm = math.sqrt(sum(float((np.asarray(x, np.float64) ** 2).sum()) for x in g.values()))
        scale = min(1.0, clip / norm) if clip else 1.0
        for k in p:
            gk = np.asarray(g[k], np.float64) * scale
            mu[k] = b1 * mu[k] + (1 - b1) * gk
            nu[k] = b2 * nu[k] + (1 - b2) * gk**2
            p[k] = p[k] - lr * (mu[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps)
    return p


def test_grad_clip_is_by_global_norm_before_adam():
    """Each leaf alone has RMS < 1 and norm < clip in the first step, but the global norm is above it; the second
    step's gradient is small, so how much the first was clipped shows in Adam's moments."""
    params = {"a": jnp.ones((4, 3), jnp.float32), "b": jnp.ones((5,), jnp.float32)}
    g1 = {"a": jnp.full((4, 3), 0.5, jnp.float32), "b": jnp.full((5,), -0.7, jnp.float32)}  # global norm ~2.3
    g2 = {"a": jnp.full((4, 3), 0.05, jnp.float32), "b": jnp.full((5,), 0.02, jnp.float32)}
    opt, _ = make_optimizer(lr=0.1, max_steps=10, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    state, p = opt.init(params), params
    for g in (g1, g2):
        u, state = opt.update(g, state, p)
        p = jax.tree.map(lambda x, y: x + y, p, u)
    exp = _ref_adam_clipped(params, [g1, g2], 0.1, 1.0)
    unclipped = _ref_adam_clipped(params, [g1, g2], 0.1, 0.0)
    assert np.abs(exp["a"] - unclipped["a"]).max() > 1e-3  # the clip matters here
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), exp[k], rtol=0, atol=2e-5, err_msg=k)


# ----------------------------------------------------------------------------------- microbatch min / max


def test_microbatch_sums_reduce_min_and_max_metrics_with_min_and_max():
    """`*_min` / `*_max` metrics over microbatches are the batch's min / max (e.g. ratio_min / ratio_max), the rest
    are sums; the gradient and the count are sums."""
    v = np.array([3.0, -1.0, 4.0, 1.5, -5.0, 9.0, 2.0, 6.0], np.float32)

    def loss_fn(p, mb):
        x = mb["v"]
        return (p["w"] * x).sum(), (jnp.float32(x.shape[0]), {"v_min": x.min(), "v_max": x.max(), "v_sum": x.sum()})

    for k in (1, 2, 4):
        g, loss, n, sums = microbatch_sums(loss_fn, {"w": jnp.float32(2.0)}, {"v": jnp.asarray(v)}, k)
        assert float(sums["v_min"]) == -5.0 and float(sums["v_max"]) == 9.0, k
        assert float(sums["v_sum"]) == pytest.approx(v.sum()) and float(n) == 8.0
        assert float(g["w"]) == pytest.approx(v.sum()) and float(loss) == pytest.approx(2 * v.sum())


# ------------------------------------------------------------------------------------- GRPO train step

N, G, P, C, V = 2, 4, 5, 6, 64


def _cfg():
    return models.ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=8)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    prompts, comps = [], []
    for i, n_p in enumerate((3, 5)):
        p = rng.integers(3, V, n_p).tolist()
        for g in range(G):
            prompts.append(p)
            comps.append(rng.integers(3, V, [C, 2, 4, 1][(i + g) % 4]).tolist())
    b = grpo.build_batch(prompts, comps, [[-1.0] * len(c) for c in comps], P, C, pad_id=0)
    R, T = b["input_ids"].shape
    b["advantages"] = rng.normal(size=(R, T)).astype(np.float32)
    b["old_logprobs"] = b["sampler_logprobs"]
    b["ref_logprobs"] = (-4.0 + rng.normal(0, 0.5, (R, T))).astype(np.float32)
    b["positive"] = (np.arange(R) % 3 == 0).astype(np.int32)
    return {k: b[k] for k in grpo.BATCH_AXES}


def _step(over, mb, params):
    config = recipe("grpo_tiny", {"rollout.num_prompts": N, "rollout.group_size": G, "rollout.max_new_tokens": C,
                                  "data.max_prompt_len": P, "train.batch_size": N * G, "train.microbatches": 2,
                                  "grpo.shared_prompt": False, "rollout.temperature": 0.8, **over})
    opt = optax.sgd(0.0)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    _, m = jax.jit(grpo.make_train_step(_cfg(), opt, config))(state, mb, jnp.bool_(True))
    return {k: float(v) for k, v in m.items()}, config


def _logprobs(params, mb, temperature, top_k=0, top_p=1.0):
    """Token log-probs under temperature (and the sampler's filter when given), target-aligned [R, T]."""
    fn = grpo.make_logprobs_fn(_cfg(), temperature, 1, top_k=top_k, top_p=top_p, first_target=P)
    return np.asarray(fn(params, mb["input_ids"], mb["attention_mask"]), np.float64)


@pytest.fixture(scope="module")
def params():
    return models.init_params(_cfg(), jax.random.key(0), std=0.3)


def test_kl_in_the_train_step_uses_unfiltered_logprobs_under_top_k(params):
    """With top-k/top-p sampling the ratio uses the filtered log-probs but the KL to the reference uses the
    unfiltered ones (NeMo RL's curr_logprobs_unfiltered): metrics kl = token mean of k3(ref - lp_unfiltered)."""
    mb = _batch()
    m, _ = _step({"rollout.top_k": 4, "grpo.kl_coef": 0.02, "grpo.kl_type": "k3"}, mb, params)
    raw = _logprobs(params, mb, 0.8)
    filt = _logprobs(params, mb, 0.8, top_k=4)
    mask = mb["loss_mask"] > 0
    assert np.abs(raw - filt)[mask].max() > 1.0  # the filter changes these tokens' log-probs
    x = np.clip(mb["ref_logprobs"] - raw, -20, 20)[mask]
    k3 = np.exp(x) - 1 - x
    assert m["kl"] == pytest.approx(k3.mean(), rel=1e-4)
    assert m["kl_loss"] == pytest.approx((0.02 * np.clip(k3, -10, 10)).mean(), rel=1e-4)  # NeMo: beta x clamp(k)
    # on-policy first update: ratio 1, so the clipped surrogate is -A, averaged over all the step's tokens (both
    # microbatches divided by the global token count)
    assert m["actor_loss"] == pytest.approx(-mb["advantages"][mask].mean(), rel=1e-4)
    assert m["loss"] == pytest.approx(m["actor_loss"] + m["kl_loss"], rel=1e-5)


@pytest.mark.parametrize("token_level", [True, False])
def test_positive_nll_in_the_train_step_is_a_mean_over_positive_tokens(params, token_level):
    """VAPO's positive-example NLL: weight x mean over the tokens of positive samples of -log p, whether the loss
    is token-level or per-sequence (the term's sum is rescaled to the step's count)."""
    mb = _batch(1)
    over = {"grpo.kl_coef": 0.0, "grpo.positive_nll_weight": 0.3, "grpo.token_level": token_level}
    m, _ = _step(over, mb, params)
    lp = _logprobs(params, mb, 0.8)
    pos = (mb["loss_mask"] > 0) & (mb["positive"][:, None] > 0)
    assert pos.sum() > 0
    assert m["positive_nll_loss"] == pytest.approx(0.3 * (-lp[pos]).mean(), rel=1e-4)


def test_kl_in_reward_leaves_no_kl_term_in_the_loss(params):
    """grpo.kl_in_reward (REINFORCE++): the KL penalty moves into the advantages, so the loss carries none of it
    (kl_loss 0, loss = actor loss) while the kl metric is still reported."""
    mb = _batch(2)
    m, _ = _step({"grpo.adv_estimator": "reinforce_plus_plus", "grpo.kl_in_reward": True, "grpo.kl_coef": 0.5},
                 mb, params)
    assert m["kl"] > 0.1
    assert m["kl_loss"] == 0.0
    assert m["loss"] == pytest.approx(m["actor_loss"], rel=1e-6, abs=1e-7)
