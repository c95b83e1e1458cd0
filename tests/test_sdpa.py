"""Attention with a recomputing backward: same values and gradients as automatic differentiation of the plain
formula, without the [B, K, G, T, S] probabilities among the saved residuals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models.sdpa import attention_probs, gqa_attention


def plain(q, k, v, mask):
    return jnp.einsum("bkgts,bskh->btkgh", attention_probs(q, k, mask).astype(v.dtype), v)


def case(T=6, S=6, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    B, K, G, H = 2, 2, 3, 4
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((B, T, K, G, H), (B, S, K, H), (B, S, K, H)))
    causal = np.tril(np.ones((T, S), bool), k=S - T)
    mask = np.broadcast_to(causal, (B, T, S)).copy()
    mask[0, :, :2] = False  # padding keys of row 0
    seg = np.array([1] * (S // 2) + [2] * (S - S // 2))  # row 1: two packed segments
    mask[1] &= seg[S - T:][:, None] == seg[None, :]
    mask |= np.eye(T, S, k=S - T, dtype=bool)  # every query may see itself (as attention_mask_BTS makes it)
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("T, S", [(6, 6), (3, 7)])
def test_values_and_gradients_equal_autodiff(T, S):
    q, k, v, mask = case(T, S)
    do = jnp.asarray(np.random.default_rng(9).standard_normal((2, T, 2, 3, 4)), jnp.float32)
    np.testing.assert_allclose(gqa_attention(q, k, v, mask), plain(q, k, v, mask), rtol=1e-6, atol=1e-6)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v, mask) * do))
    got = jax.grad(loss(gqa_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
    # a key no query may see gets no gradient (key 0 of row 0: padding, and no query sits there when S > T)
    if S > T:
        assert float(jnp.abs(got[1][0, 0]).max()) == 0.0 and float(jnp.abs(got[2][0, 0]).max()) == 0.0


def test_fully_masked_query_matches_autodiff():
    """A query that may see no key (not produced by the model's masks, but allowed): same values and gradients."""
    q, k, v, mask = case(6, 6)
    mask = mask.at[0, 2].set(False)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v, mask) ** 2))
    for g, w in zip(jax.grad(loss(gqa_attention), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_probabilities_are_not_saved_for_the_backward_pass():
    q, k, v, mask = case(8, 8)
    shapes = lambda f: {tuple(x.shape) for x in jax.tree.leaves(jax.vjp(lambda *a: f(*a, mask), q, k, v)[1])}
    assert (2, 2, 3, 8, 8) in shapes(plain)
    assert (2, 2, 3, 8, 8) not in shapes(gqa_attention)


def test_bf16_keeps_dtypes():
    q, k, v, mask = case(dtype=jnp.bfloat16)
    out, grads = jax.value_and_grad(lambda q, k, v: jnp.sum(gqa_attention(q, k, v, mask).astype(jnp.float32)),
                                    argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    ref = jax.grad(lambda *a: jnp.sum(plain(*a, mask)), argnums=(0, 1, 2))(*case()[:3])
    for g, w in zip(grads, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0.05, atol=0.05)


def test_model_layers_do_not_stack_the_probabilities():
    """Through models.forward (a layer scan): no saved residual holds T x T attention probabilities."""
    from jaxrl_llm import models
    from jaxrl_llm.models.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=4, max_position_embeddings=64)
    params = models.init_params(cfg, jax.random.key(0))
    T = 9
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, T)), jnp.int32)
    _, vjp_fn = jax.vjp(lambda p: models.forward(cfg, p, ids), params)
    big = [x.shape for x in jax.tree.leaves(vjp_fn) if x.ndim >= 5 and x.shape[-2:] == (T, T)]
    assert not big, big
