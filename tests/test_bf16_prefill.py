"""The sampler's prefill in bf16 attends to the prompt's keys and values as the cache stores them (rounded), so
its logits are models.forward's bit for bit: taken straight from the projection, XLA may keep them unrounded
inside a fusion (jax 0.12's CPU backend did), and the sampler's log-probs were up to 0.06 off the trainer's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models, sampling
from jaxrl_llm.models.transformer import unstack_layers
from jaxrl_llm.sampling import loop

CFG = models.ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         compute_dtype="bfloat16")
B, P, N = 6, 16, 16


@pytest.fixture(scope="module")
def case():
    params = models.init_params(CFG, jax.random.key(0), dtype="float32", std=0.5)
    rng = np.random.default_rng(0)
    lens = rng.integers(4, 13, size=B)
    start = (P - lens).astype(np.int32)
    ids = np.zeros((B, P), np.int32)
    for b in range(B):
        ids[b, start[b]:] = rng.integers(3, CFG.vocab_size, size=lens[b])
    return params, ids, start


def test_prefill_logits_are_models_forwards(case):
    params, ids, start = case
    _, logits_BV = loop.prefill(CFG, params, jnp.asarray(ids), jnp.asarray(start), cache_len=P + N)
    mask = (np.arange(P)[None] >= start[:, None]).astype(np.int32)
    want = jax.jit(models.forward, static_argnums=0)(CFG, params, jnp.asarray(ids), jnp.asarray(mask))[:, -1]
    np.testing.assert_array_equal(np.asarray(logits_BV), np.asarray(want))


@pytest.mark.parametrize("per_layer", [False, True])
def test_empty_cache_attention_is_the_full_caches(case, per_layer):
    """`empty_cache` (attend to the T new slots only) against attending over every slot, masked: the same logits
    and cache, for the stacked cache and the per-layer one (keys stored transposed)."""
    params, ids, start = case
    cache = sampling.init_cache(CFG, B, P + N)
    cache = sampling.cache.unstack_cache(cache) if per_layer else cache
    p = {**params, "layers": unstack_layers(params["layers"])} if per_layer else params
    mask = loop.prefill_mask_BTS(CFG, jnp.asarray(start), P, P + N)
    pos = loop.prompt_positions_BT(jnp.asarray(start), P)
    f = jax.jit(models.forward_with_cache, static_argnames=("cfg", "empty_cache"))
    got, got_cache = f(CFG, p, jnp.asarray(ids), pos, mask, cache, jnp.int32(0), empty_cache=True)
    want, want_cache = f(CFG, p, jnp.asarray(ids), pos, mask, jax.tree.map(jnp.copy, cache), jnp.int32(0))
    valid = (np.arange(P)[None] >= start[:, None])
    np.testing.assert_array_equal(np.asarray(got)[valid], np.asarray(want)[valid])
    for n in ("k", "v"):
        np.testing.assert_array_equal(*(np.asarray(jnp.stack(c[n]) if per_layer else c[n])
                                        for c in (got_cache, want_cache)))
