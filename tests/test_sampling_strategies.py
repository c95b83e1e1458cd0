"""Sampling strategies on a fixed logits vector: processed distributions vs HF's logits warpers, and the
empirical frequencies of many samples vs the processed distribution (chi-square, fixed seed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from jaxrl_llm import sampling

V = 12
LOGITS_V = np.random.default_rng(0).normal(size=V).astype(np.float32) * 1.5
CASES = [
    dict(temperature=0.7, top_k=0, top_p=1.0),
    dict(temperature=1.0, top_k=4, top_p=1.0),
    dict(temperature=1.0, top_k=0, top_p=0.6),
    dict(temperature=1.3, top_k=6, top_p=0.8),
]


def hf_processed_probs(temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution HF's sampling warpers (temperature -> top-k -> top-p) produce for LOGITS_V."""
    scores = torch.tensor(LOGITS_V)[None]
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


def row_sampler(n: int, temperature: float, top_k: int, top_p: float) -> sampling.RowSampler:
    return sampling.RowSampler(temperature_B=jnp.full(n, temperature, jnp.float32),
                               top_k_B=jnp.full(n, top_k, jnp.int32), top_p_B=jnp.full(n, top_p, jnp.float32))


@jax.jit
def _sample(sampler, logits_BV, keys_B):
    return sampler.get_next_tokens(logits_BV, keys_B)


@pytest.mark.parametrize("case", CASES)
def test_processed_distribution_matches_hf_warpers(case):
    s = row_sampler(1, **case)
    processed = sampling.process_logits(jnp.asarray(LOGITS_V)[None], s.temperature_B, s.top_k_B, s.top_p_B)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(processed[0])), hf_processed_probs(**case), atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_sample_frequencies_match_processed_distribution(case):
    n = 20000
    want_V = hf_processed_probs(**case)
    keys_B = jax.random.split(jax.random.key(1234), n)
    res = _sample(row_sampler(n, **case), jnp.broadcast_to(jnp.asarray(LOGITS_V), (n, V)), keys_B)
    tokens = np.asarray(res.tokens_B)
    counts_V = np.bincount(tokens, minlength=V)
    assert counts_V[want_V == 0].sum() == 0  # nothing outside the top-k / nucleus
    kept = want_V > 0
    chi2 = float((((counts_V - n * want_V) ** 2)[kept] / (n * want_V[kept])).sum())
    p_value = scipy.stats.chi2.sf(chi2, df=int(kept.sum()) - 1)
    assert p_value > 1e-3, (chi2, counts_V, want_V)
    np.testing.assert_allclose(np.asarray(res.logprobs_B), np.log(want_V[tokens]), atol=1e-5)
    raw = np.asarray(jax.nn.log_softmax(jnp.asarray(LOGITS_V)))[tokens]
    np.testing.assert_allclose(np.asarray(res.raw_logprobs_B), raw, atol=1e-5)


@pytest.mark.parametrize("case", [dict(temperature=0.0, top_k=0, top_p=1.0), dict(temperature=2.0, top_k=1, top_p=1.0),
                                  dict(temperature=2.0, top_k=0, top_p=1e-6)])
def test_greedy_limits(case):
    n = 64
    logits_BV = jax.random.normal(jax.random.key(0), (n, V))
    res = _sample(row_sampler(n, **case), logits_BV, jax.random.split(jax.random.key(5), n))
    np.testing.assert_array_equal(np.asarray(res.tokens_B), np.asarray(jnp.argmax(logits_BV, -1)))
    np.testing.assert_allclose(np.asarray(res.logprobs_B), 0.0, atol=1e-6)


def test_rows_keep_their_own_parameters():
    """One batch mixing greedy, top-k and nucleus rows: each row is filtered by its own values only."""
    logits_BV = jnp.broadcast_to(jnp.asarray(LOGITS_V), (4, V))
    s = sampling.RowSampler(temperature_B=jnp.array([0.0, 1.0, 1.0, 0.5]), top_k_B=jnp.array([0, 3, 0, 0]),
                            top_p_B=jnp.array([1.0, 1.0, 0.5, 1.0]))
    probs_BV = np.asarray(jax.nn.softmax(sampling.process_logits(logits_BV, s.temperature_B, s.top_k_B, s.top_p_B)))
    assert (probs_BV[0] > 0).sum() == 1 and probs_BV[0, LOGITS_V.argmax()] == 1.0
    np.testing.assert_allclose(probs_BV[1], hf_processed_probs(1.0, 3, 1.0), atol=1e-6)
    np.testing.assert_allclose(probs_BV[2], hf_processed_probs(1.0, 0, 0.5), atol=1e-6)
    np.testing.assert_allclose(probs_BV[3], hf_processed_probs(0.5, 0, 1.0), atol=1e-6)


def test_mixed_batch_and_need_raw():
    """Greedy rows next to sampled rows: greedy rows get the argmax with log-prob 0 (a point mass), sampled rows
    their processed log-prob; with need_raw=False the raw log-softmax is skipped and comes back as 0."""
    n = 6
    logits_BV = jax.random.normal(jax.random.key(3), (n, V)) * 2
    temp_B = jnp.array([0.0, 1.0, 0.0, 0.7, 1.3, 0.0], jnp.float32)
    s = sampling.RowSampler(temperature_B=temp_B, top_k_B=jnp.array([0, 0, 3, 4, 0, 0], jnp.int32),
                            top_p_B=jnp.array([1.0, 0.9, 1.0, 1.0, 0.8, 0.5], jnp.float32))
    keys_B = jax.random.split(jax.random.key(9), n)
    for need_raw in (True, False):
        res = jax.jit(lambda lg, k, r: s.get_next_tokens(lg, k, need_raw=r))(logits_BV, keys_B, need_raw)
        tok = np.asarray(res.tokens_B)
        greedy = np.asarray(temp_B) == 0
        np.testing.assert_array_equal(tok[greedy], np.asarray(jnp.argmax(logits_BV, -1))[greedy])
        processed_BV = sampling.process_logits(logits_BV, s.temperature_B, s.top_k_B, s.top_p_B)
        want = np.asarray(jax.nn.log_softmax(processed_BV))[np.arange(n), tok]
        np.testing.assert_allclose(np.asarray(res.logprobs_B), want, atol=1e-5)
        assert (np.asarray(res.logprobs_B)[greedy] == 0).all()
        raw = np.asarray(jax.nn.log_softmax(logits_BV))[np.arange(n), tok]
        np.testing.assert_allclose(np.asarray(res.raw_logprobs_B), raw if need_raw else 0 * raw, atol=1e-5)


def test_argmax_rows_equals_jnp_argmax():
    """The two-reduction argmax picks what jnp.argmax picks: the first of tied maxima, the first NaN of a row
    with NaNs, index 0 of an all -inf row; also on a transposed (column-major) input as the decode loop has."""
    from jaxrl_llm.sampling.strategies import argmax_rows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 257)).astype(np.float32)
    x[1, [7, 30, 200]] = 9.0  # ties: the first wins
    x[2, [11, 40]] = np.nan
    x[3] = -np.inf
    x[4, 0] = np.inf
    x[5, -1] = 50.0
    for arr in (jnp.asarray(x), jnp.asarray(np.ascontiguousarray(x.T)).T):
        got = np.asarray(jax.jit(argmax_rows)(arr))
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(arr, axis=-1)))
    assert got.tolist()[:4] == [int(np.argmax(x[0])), 7, 11, 0] and got[4] == 0 and got[5] == 256
    x3 = jnp.asarray(x.reshape(2, 3, 257))  # any leading shape: the last axis is the vocabulary
    np.testing.assert_array_equal(argmax_rows(x3), jnp.argmax(x3, axis=-1))
