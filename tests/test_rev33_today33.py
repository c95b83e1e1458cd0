"""Review of the day's changes (today33): float16 compute keeps the vocabulary head's fp32-cotangent backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.models.transformer import vocab_product


def test_float16_head_gradients_do_not_flush_small_cotangents():
    """A mean loss's logit cotangents are tiny (a probability over the batch's tokens: 1e-8 for V = 32k, 4k tokens),
    below float16's smallest subnormal (6e-8). FAILS before the fix: the float16 path rounded them to float16, so
    both head gradients came back zero (an SFT step on 4096 tokens, V = 8192: 6% / 8% off the fp32 ones; 0.03% /
    0.35% with the fp32 cotangent)."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float16)
    w = jnp.asarray(rng.normal(size=(8, 16)), jnp.float16)
    ct = jnp.asarray(rng.uniform(1e-9, 2e-8, size=(2, 3, 16)), jnp.float32)
    _, vjp = jax.vjp(lambda h, w: vocab_product("btd,dv->btv", h, w), h, w)
    dh, dw = vjp(ct)
    _, vjp32 = jax.vjp(lambda h, w: jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32), h, w)
    for got, want in zip((dh, dw), vjp32(ct), strict=True):
        assert got.dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert np.abs(np.asarray(got, np.float32)).max() > 0
