"""The SwiGLU MLP's hand-written backward equals automatic differentiation of the plain formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models.swiglu import swiglu


def plain(h, wg, wu, wd):
    return jnp.einsum("btf,fd->btd", jax.nn.silu(jnp.einsum("btd,df->btf", h, wg)) * jnp.einsum("btd,df->btf", h, wu),
                      wd)


def inputs(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    B, T, D, F = 2, 5, 8, 12
    arrs = (rng.standard_normal((B, T, D)), rng.standard_normal((D, F)) * 0.5, rng.standard_normal((D, F)) * 0.5,
            rng.standard_normal((F, D)) * 0.5)
    return tuple(jnp.asarray(a, dtype) for a in arrs)


def test_value_and_gradients_equal_autodiff_fp32():
    args = inputs()
    dy = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 8)), jnp.float32)
    np.testing.assert_allclose(swiglu(*args), plain(*args), rtol=1e-6, atol=1e-6)
    loss = lambda f: (lambda *a: jnp.sum(f(*a) * dy))
    got = jax.grad(loss(swiglu), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(*args)
    for name, g, w in zip(("h", "w_gate", "w_up", "w_down"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_inside_a_layer_scan_with_remat_and_in_bf16():
    """As the model uses it: in a scan over stacked layers, under jax.checkpoint; bf16 keeps its dtypes."""
    h, wg, wu, wd = inputs()
    ws = tuple(jnp.stack([w, w * 0.9 + 0.01]) for w in (wg, wu, wd))

    def net(f, remat):
        def body(x, w):
            return x + f(x, *w), None
        body = jax.checkpoint(body) if remat else body
        return lambda ws, x: jnp.sum(jax.lax.scan(body, x, ws)[0] ** 2)

    want = jax.grad(net(plain, False))(ws, h)
    for remat in (False, True):
        got = jax.grad(net(swiglu, remat))(ws, h)
        for g, w in zip(got, want, strict=True):  # sums of squares of ~1-10: fp32 rounding of the order 1e-5
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    hb, gb, ub, db = inputs(jnp.bfloat16)
    grads = jax.grad(lambda *a: jnp.sum(swiglu(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))(hb, gb, ub, db)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    ref = jax.grad(lambda *a: jnp.sum(plain(*a)), argnums=(0, 1, 2, 3))(*inputs())
    for g, w in zip(grads, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("seed", [0, 1])
def test_model_gradients_match_the_plain_mlp(seed, monkeypatch):
    """Whole-model gradients (tiny Llama) with the custom backward equal those with the MLP differentiated
    automatically (the model's mlp_bias path, which does not use it, with zero biases)."""
    import dataclasses

    from jaxrl_llm import models
    from jaxrl_llm.models.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=4, max_position_embeddings=64)
    params = models.init_params(cfg, jax.random.key(seed))
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 7)), jnp.int32)

    def loss(cfg):
        return lambda p: jnp.sum(jax.nn.log_softmax(models.forward(cfg, p, ids))[..., 3])

    got = jax.grad(loss(cfg))(params)
    cfg_b = dataclasses.replace(cfg, mlp_bias=True)
    L, F, D = cfg.num_layers, cfg.intermediate_size, cfg.hidden_size
    params_b = {**params, "layers": {**params["layers"], "b_gate": jnp.zeros((L, F)), "b_up": jnp.zeros((L, F)),
                                     "b_down": jnp.zeros((L, D))}}
    want = jax.grad(loss(cfg_b))(params_b)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for k in path:
            w = w[k.key]
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_the_model_differentiates_its_mlp_with_the_custom_backward(monkeypatch):
    """The training forward (no MLP biases, input-major weights) routes its MLP through `swiglu`: differentiating
    the model runs the hand-written backward once per layer trace."""
    from jaxrl_llm import models
    from jaxrl_llm.models import swiglu as swiglu_module
    from jaxrl_llm.models.config import ModelConfig

    calls = []
    real = swiglu_module.swiglu.bwd
    monkeypatch.setattr(swiglu_module.swiglu, "bwd", lambda *a: calls.append(1) or real(*a))
    cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=8, intermediate_size=12, num_layers=3, num_heads=2,
                      num_kv_heads=1, head_dim=4, max_position_embeddings=32)
    params = models.init_params(cfg, jax.random.key(0))
    ids = jnp.zeros((1, 4), jnp.int32)
    jax.grad(lambda p: jnp.sum(models.forward(cfg, p, ids)))(params)
    assert calls  # the layer scan traces its body once
