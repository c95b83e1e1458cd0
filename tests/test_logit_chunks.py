"""model.logits_chunk: the losses project onto the vocabulary a few positions at a time. Values and gradients equal
the unchunked ones (SFT, DPO pairs in both layouts, GRPO's log-probs with the sampler's filter and entropy), and the
compiled step keeps less memory: the [B, T, V] logits and their gradient never exist whole."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm import models, train
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.algorithms.losses import target_logprobs, token_logprobs
from jaxrl_llm.algorithms.pairs import pair_logprobs
from jaxrl_llm.algorithms.sft import sft_loss_sum
from jaxrl_llm.data import preference as pref
from jaxrl_llm.models.logit_chunks import over_positions
from jaxrl_llm.models.transformer import lm_logits

VOCAB = 97


def _cfg(**kw) -> models.ModelConfig:
    return models.ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_layers=1,
                              num_heads=2, num_kv_heads=1, head_dim=8, **kw)


@pytest.fixture(scope="module")
def params():
    return models.init_params(_cfg(), jax.random.key(0))


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_over_positions_equals_one_call_in_values_and_gradients():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 13, 5)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 11, (2, 13)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((5, 11)), jnp.float32)

    def fn(h_BCD, t_BC, w=w):
        logits = h_BCD @ w
        return token_logprobs(logits, t_BC), jax.nn.logsumexp(logits, -1)

    def loss(h, w, chunk):
        a, b = over_positions(lambda x, y: fn(x, y, w), chunk, h, t)
        return (a * jnp.arange(13)).sum() + (b ** 2).sum(), (a, b)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (l0, out0), g0 = f(h, w, 0)
    for chunk in (4, 5, 13, 64):  # 13 positions: padded to 16 and 15, exact, fewer than a chunk
        (l1, out1), g1 = f(h, w, chunk)
        assert out1[0].shape == (2, 13) and out1[1].shape == (2, 13)
        _close((l0, out0, g0), (l1, out1, g1))


def _sft_batch(rng, B=3, T=21):
    ids = rng.integers(1, VOCAB, (B, T)).astype(np.int32)
    attn = np.ones((B, T), np.int32)
    attn[1, 15:] = 0
    idx = np.tile(np.arange(T - 1, dtype=np.int32), (B, 1))
    weight = (rng.random((B, T - 1)) < 0.7).astype(np.float32) * attn[:, 1:]
    return {"input_ids": ids, "attention_mask": attn, "positions": np.cumsum(attn, 1, dtype=np.int32) - 1,
            "segment_ids": attn.copy(), "target_index": idx, "target_weight": weight}


def test_sft_loss_and_gradient_equal_unchunked(params):
    mb = _sft_batch(np.random.default_rng(1))
    f = lambda cfg: jax.jit(jax.value_and_grad(lambda p: sft_loss_sum(cfg, p, mb)[0]))  # noqa: E731
    l0, g0 = f(_cfg())(params)
    l1, g1 = f(_cfg(logits_chunk=4))(params)
    assert abs(float(l0 - l1)) < 1e-4 * abs(float(l0))
    _close(g0, g1)


def _pairs(rng, n=4):
    out = []
    for _ in range(n):
        prompt = rng.integers(1, VOCAB, int(rng.integers(3, 7))).tolist()
        sides = []
        for _ in range(2):
            resp = rng.integers(1, VOCAB, int(rng.integers(2, 9))).tolist()
            sides += [np.asarray(prompt + resp, np.int32), np.asarray([0] * len(prompt) + [1] * len(resp), np.int32)]
        out.append(pref.PreferencePair(*sides))
    return out


@pytest.mark.parametrize("shared", [False, True], ids=["separate_rows", "shared_prefix"])
def test_pair_logprobs_and_gradients_equal_unchunked(params, shared):
    pairs = _pairs(np.random.default_rng(2))
    if shared:
        pairs = pref.share_prefixes(pairs, max_len=16)
        assert pairs is not None
    mb = pref.collate(pairs, ml_collections.ConfigDict(dict(data=dict(max_len=16))), 0)

    def f(cfg):
        def loss(p):
            lp, n = pair_logprobs(cfg, p, mb)
            return (lp * jnp.asarray([1.0, -0.5])).sum(), (lp, n)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (l0, (lp0, n0)), g0 = f(_cfg())(params)
    (l1, (lp1, n1)), g1 = f(_cfg(logits_chunk=3))(params)
    np.testing.assert_array_equal(n0, n1)
    _close((lp0, g0), (lp1, g1), 1e-4)


def test_grpo_logprobs_entropy_and_gradients_equal_unchunked(params, top_k=5, top_p=0.8):
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(1, VOCAB, (4, 19)), jnp.int32)
    attn = jnp.ones((4, 19), jnp.int32).at[2, 16:].set(0)

    def f(cfg):
        def loss(p):
            lp, raw, ent = grpo._policy_logprobs(cfg, p, ids, attn, 0.7, top_k, top_p, None, with_entropy=True,
                                                 first_target=5)
            return (lp + 0.3 * raw + 0.1 * ent)[:, 5:].sum(), (lp, raw, ent)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (_, out0), g0 = f(_cfg())(params)
    (_, out1), g1 = f(_cfg(logits_chunk=4))(params)
    assert out1[0].shape == (4, 19) and out1[2].shape == (4, 19)
    _close((out0, g0), (out1, g1), 1e-4)
    chunked = jax.jit(grpo.make_logprobs_fn(_cfg(logits_chunk=4), 0.7, 2, top_k=top_k, top_p=top_p, first_target=5))
    _close(chunked(params, ids, attn), out0[0], 1e-4)


def test_chunks_keep_less_memory_than_the_whole_logits():
    """The compiled gradient of a vocabulary projection + log-prob over B x K positions: without chunks the
    temporaries hold the [B, K, V] fp32 logits (and their gradient); with chunks of 64 positions they are at least
    that array smaller."""
    cfg = models.ModelConfig(family="llama", vocab_size=8192, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    p = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    B, K = 2, 512
    h = jax.ShapeDtypeStruct((B, K, 32), jnp.float32)
    t = jax.ShapeDtypeStruct((B, K), jnp.int32)

    def temp_bytes(chunk):
        c = dataclasses.replace(cfg, logits_chunk=chunk)
        g = jax.grad(lambda p, h, t: target_logprobs(c, p, h, t).sum(), argnums=(0, 1))
        return jax.jit(g).lower(p, h, t).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(64)
    logits_bytes = B * K * cfg.vocab_size * 4
    assert whole >= logits_bytes
    assert whole - chunked >= logits_bytes, (whole, chunked)


def test_target_logprobs_equal_lm_logits_log_softmax(params):
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    t = jnp.asarray(rng.integers(0, VOCAB, (2, 9)), jnp.int32)
    ref = jnp.take_along_axis(jax.nn.log_softmax(lm_logits(_cfg(), params, h), -1), t[..., None], -1)[..., 0]
    _close(target_logprobs(_cfg(logits_chunk=2), params, h, t), ref)


def test_logits_chunk_setting_is_checked_and_reaches_the_model():
    with pytest.raises(ValueError, match=r"logits_chunk=-1: must be an integer >= 0"):
        _cfg(logits_chunk=-1)
    with pytest.raises(ValueError, match=r"logits_chunk=True"):
        _cfg(logits_chunk=True)
    with pytest.raises(train.ConfigError, match=r"model.logits_chunk=-8: must be an integer >= 0"):
        train.validate(recipe("sft_tiny", {"model.logits_chunk": -8}))
    config = recipe("sft_tiny", {"model.logits_chunk": 16})
    train.validate(config)
    cfg, _ = train.build_model(config, VOCAB, None, None)
    assert cfg.logits_chunk == 16
    del config.model["logits_chunk"]  # a recipe written before the key: all positions at once
    train.validate(config)
    assert train.build_model(config, VOCAB, None, None)[0].logits_chunk == 0
