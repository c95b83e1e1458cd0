"""`models.decode_layout`: the output-major decode weights and the thin-product form, checked against the
plain einsums, the stacked forward pass, and the compiled HLO (the layout that makes it fast survives XLA)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models
from jaxrl_llm.models.decode_layout import FUSED, INPUT_AXES, decode_params, is_decode_params, project
from jaxrl_llm.sampling.cache import init_cache, unstack_cache

# Every optional per-layer leaf (biases on q/k/v/o and the MLP, QK-norm) and an untied head.
CFG = models.ModelConfig(family="llama", vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=2,
                         num_heads=6, num_kv_heads=2, head_dim=4, qkv_bias=True, o_bias=True, mlp_bias=True,
                         qk_norm=True, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6)


def random_params(cfg: models.ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(1.0 + 0.3 * rng.standard_normal(a.shape), jnp.float32),
                        models.abstract_params(cfg))


@pytest.mark.parametrize("spec,w_shape,n_in", [
    ("btd,dnh->btnh", (24, 6, 4), 1),   # wq: one input axis, two output axes
    ("btnh,nhd->btd", (6, 4, 24), 2),   # wo: two input axes
    ("btd,df->btf", (24, 40), 1),       # MLP
])
def test_project_equals_the_einsum(spec, w_shape, n_in):
    rng = np.random.default_rng(1)
    x_shape = (3, 2) + w_shape[:n_in]
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    w_t = np.transpose(w, tuple(range(n_in, w.ndim)) + tuple(range(n_in)))
    got = np.asarray(jax.jit(project, static_argnums=2)(jnp.asarray(x), jnp.asarray(w_t), n_in))
    np.testing.assert_allclose(got, np.einsum(spec, x.astype(np.float64), w), rtol=1e-5, atol=1e-5)


def test_decode_params_layout():
    params = random_params(CFG)
    dp = decode_params(CFG, params)
    assert is_decode_params(dp) and not is_decode_params(params)
    assert isinstance(dp["layers"], list) and len(dp["layers"]) == CFG.num_layers
    np.testing.assert_array_equal(dp["lm_head_t"], np.asarray(params["lm_head"]).T)
    assert "lm_head" not in dp
    for name in ("embed", "final_norm"):
        np.testing.assert_array_equal(dp[name], params[name])
    for i, layer in enumerate(dp["layers"]):
        want = set(params["layers"]) - set(INPUT_AXES) | {"wo_t", "w_down_t"} | set(FUSED)
        assert set(layer) == want
        stacked = jax.tree.map(lambda a, i=i: np.asarray(a[i]), params["layers"])
        N, K = CFG.num_heads, CFG.num_kv_heads
        assert layer["wqkv_t"].shape == (N + 2 * K, CFG.head_dim, CFG.hidden_size)
        np.testing.assert_array_equal(layer["wqkv_t"][:N], stacked["wq"].transpose(1, 2, 0))  # [N, H, D]
        np.testing.assert_array_equal(layer["wqkv_t"][N:N + K], stacked["wk"].transpose(1, 2, 0))
        np.testing.assert_array_equal(layer["wqkv_t"][N + K:], stacked["wv"].transpose(1, 2, 0))
        F = CFG.intermediate_size
        np.testing.assert_array_equal(layer["w_gate_up_t"][:F], stacked["w_gate"].T)  # [F, D]
        np.testing.assert_array_equal(layer["w_gate_up_t"][F:], stacked["w_up"].T)
        np.testing.assert_array_equal(layer["wo_t"], stacked["wo"].transpose(2, 0, 1))  # [D, N, H]
        np.testing.assert_array_equal(layer["w_down_t"], stacked["w_down"].T)
        for name in ("bq", "bo", "b_gate", "q_norm", "attn_norm"):
            np.testing.assert_array_equal(layer[name], stacked[name])

    tied = models.ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": True})
    tp = random_params(tied)
    assert decode_params(tied, tp)["lm_head_t"] is tp["embed"]  # the embedding itself, no copy
    with pytest.raises(ValueError, match="score-head"):
        decode_params(models.ModelConfig(**{**CFG.__dict__, "num_labels": 1}), tp)


@pytest.mark.parametrize("tie", [False, True])
def test_cached_forward_on_decode_params_equals_forward(tie):
    """Prefill then decode, token by token, on the output-major per-layer weights = the full forward."""
    cfg = models.ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": tie})
    params = random_params(cfg, seed=2)
    B, T, S = 3, 7, 8
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    want = np.asarray(models.forward(cfg, params, jnp.asarray(ids)))
    dp = jax.jit(decode_params, static_argnums=0)(cfg, params)
    kv = unstack_cache(init_cache(cfg, B, S))
    step = jax.jit(models.forward_with_cache, static_argnames=("cfg",))
    for t in range(T):
        mask = jnp.broadcast_to(jnp.arange(S)[None, None] <= t, (B, 1, S))
        logits, kv = step(cfg, dp, jnp.asarray(ids[:, t:t + 1]), jnp.full((B, 1), t, jnp.int32), mask, kv,
                          jnp.int32(t))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, t], rtol=1e-4, atol=1e-4)


def test_thin_products_stay_output_major_after_xla():
    """The point of the layout: the compiled dot must produce [out, rows] (8 rows here). Without the
    optimization barrier XLA folds the transpose back into the dot and emits the slow [rows, out] form."""
    x = jnp.ones((8, 1, 576), jnp.float32)
    w_t = jnp.ones((1536, 576), jnp.float32)
    hlo = jax.jit(lambda x, w: project(x, w, 1) * 2.0).lower(x, w_t).compile().as_text()
    dots = re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} dot\(", hlo)
    assert dots and all(d.split(",")[0] == "1536" for d in dots), dots
    plain = jax.jit(lambda x, w: jnp.einsum("btd,fd->btf", x, w) * 2.0).lower(x, w_t).compile().as_text()
    assert re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} dot\(", plain)[0].startswith("8,")  # the form we avoid


@pytest.mark.parametrize("tie", [False, True])
def test_prepare_decode_params_equals_decode_params_and_keeps_the_callers_arrays(tie):
    """The jitted preparation the sampler uses gives what `decode_params` gives, and passes the embedding
    (and a tied head) through as the caller's own arrays: no per-call copy of the [V, D] table."""
    from jaxrl_llm.sampling.loop import prepare_decode_params

    cfg = models.ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": tie})
    params = random_params(cfg, seed=4)
    got, want = prepare_decode_params(cfg, params), decode_params(cfg, params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert got["embed"] is params["embed"] and got["final_norm"] is params["final_norm"]
    if tie:
        assert got["lm_head_t"] is params["embed"]


@pytest.mark.parametrize("fsdp,tensor,fused", [(8, 1, True), (4, 2, False)])
def test_products_fused_only_when_their_output_axes_stay_whole(fsdp, tensor, fused):
    """q/k/v and gate/up are concatenated only when no device holds a slice of the heads or the MLP width
    (a tensor-parallel split would not survive concatenation); either way the cached forward is the model's."""
    from jaxrl_llm import parallel
    from jaxrl_llm.sampling.loop import prepare_decode_params

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py asks for 8 fake CPU devices)")
    cfg = models.ModelConfig(**{**CFG.__dict__, "num_heads": 4, "intermediate_size": 32})
    params = random_params(cfg, seed=5)
    mesh = parallel.make_mesh(data=1, fsdp=fsdp, tensor=tensor, devices=jax.devices()[:8])
    rules = parallel.ShardingRules()
    sharded = jax.device_put(params, models.param_shardings(cfg, mesh, rules))
    with jax.set_mesh(mesh):
        dp = prepare_decode_params(cfg, sharded, rules)
    names = set(dp["layers"][0])
    assert (set(FUSED) <= names) == fused
    assert ({"wq_t", "wk_t", "wv_t", "w_gate_t", "w_up_t"} <= names) == (not fused)

    B, T, S = 8, 5, 8
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    want = np.asarray(models.forward(cfg, params, jnp.asarray(ids)))
    kv = unstack_cache(init_cache(cfg, B, S))
    step = jax.jit(models.forward_with_cache, static_argnames=("cfg", "rules"))
    with jax.set_mesh(mesh):
        for t in range(T):
            mask = jnp.broadcast_to(jnp.arange(S)[None, None] <= t, (B, 1, S))
            logits, kv = step(cfg, dp, jnp.asarray(ids[:, t:t + 1]), jnp.full((B, 1), t, jnp.int32), mask, kv,
                              jnp.int32(t), rules=rules)
            np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, t], rtol=1e-4, atol=1e-4)
