"""`models.forward_with_cache`: stacked (scan) and per-layer (unrolled) forms, the kv-head-major cache layout,
`last_only`, and the unrolled decode loop, all checked against `models.forward` and plain numpy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models, sampling
from jaxrl_llm.models.transformer import CACHE_AXES, unstack_layers

# GQA (4 query heads over 2 kv heads) with q/k/v biases, so a mixed-up head or axis order shows.
CFG = models.ModelConfig(family="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-6)
LENGTHS = (6, 3, 5)  # left padded to P
P, S = 6, 10  # prompt slots, cache slots


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    shapes = models.abstract_params(CFG)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray((1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
                                    + 0.2 * rng.standard_normal(a.shape), jnp.float32), shapes)


def sequences(n_extra: int, seed: int = 0) -> np.ndarray:
    """Left-padded ids [B, P + n_extra]: each row's prompt ends in slot P - 1, then n_extra more tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(LENGTHS), P + n_extra), np.int32)
    for b, n in enumerate(LENGTHS):
        ids[b, P - n:] = rng.integers(1, CFG.vocab_size, size=n + n_extra)
    return ids


def valid_mask(T: int) -> np.ndarray:
    m = np.zeros((len(LENGTHS), T), np.int32)
    for b, n in enumerate(LENGTHS):
        m[b, P - n:] = 1
    return m


def cache_mask(q_slots: np.ndarray) -> np.ndarray:
    """[B, T, S]: slot s is visible to the query in slot q iff the row's first token <= s <= q (or s == q)."""
    s = np.arange(S)
    start = np.array([P - n for n in LENGTHS])
    m = (s[None, None] >= start[:, None, None]) & (s[None, None] <= q_slots[None, :, None])
    return m | (s[None, None] == q_slots[None, :, None])


def positions(q_slots: np.ndarray) -> np.ndarray:
    start = np.array([P - n for n in LENGTHS])
    return np.maximum(q_slots[None] - start[:, None], 0).astype(np.int32)


def empty_cache(per_layer: bool) -> dict:
    cache = sampling.init_cache(CFG, len(LENGTHS), S)
    return sampling.cache.unstack_cache(cache) if per_layer else cache


def run(params, ids_BT, slot0: int, cache: dict, per_layer: bool, last_only: bool = False):
    T = ids_BT.shape[1]
    q = np.arange(slot0, slot0 + T)
    p = {**params, "layers": unstack_layers(params["layers"])} if per_layer else params
    f = jax.jit(models.forward_with_cache, static_argnames=("cfg", "last_only"))
    return f(CFG, p, jnp.asarray(ids_BT), jnp.asarray(positions(q)), jnp.asarray(cache_mask(q)), cache,
             jnp.int32(slot0), last_only=last_only)


def np_rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.rms_norm_eps) * w


def np_rope(x_TKH, pos_T):
    H = x_TKH.shape[-1]
    inv = 1.0 / CFG.rope_theta ** (np.arange(0, H, 2) / H)
    ang = pos_T[:, None, None] * inv  # [T, 1, H/2]
    x1, x2 = x_TKH[..., :H // 2], x_TKH[..., H // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


@pytest.mark.parametrize("per_layer", [False, True])
def test_prefill_logits_equal_forward_and_cache_layout(params, per_layer):
    ids = sequences(0)
    logits_BTV, cache = run(params, ids, 0, empty_cache(per_layer), per_layer)
    want_BTV = models.forward(CFG, params, jnp.asarray(ids), jnp.asarray(valid_mask(P)))
    m = valid_mask(P).astype(bool)
    np.testing.assert_allclose(np.asarray(logits_BTV)[m], np.asarray(want_BTV)[m], atol=2e-5, rtol=0)

    assert isinstance(cache["k"], list) == per_layer
    if per_layer:  # keys per layer lie transposed, [B, K, H, S]
        assert cache["k"][0].shape == (len(LENGTHS), CFG.num_kv_heads, CFG.head_dim, S)
        cache = sampling.cache.stack_cache(cache)
    k_LBKSH, v_LBKSH = np.asarray(cache["k"]), np.asarray(cache["v"])
    assert CACHE_AXES == ("layers", "batch", "kv_heads", "length", "head_dim")
    assert k_LBKSH.shape == (CFG.num_layers, len(LENGTHS), CFG.num_kv_heads, S, CFG.head_dim)
    # Layer 0 keys/values from the embeddings by hand: k = rope(norm(x) @ wk + bk), v = norm(x) @ wv + bv.
    lp = jax.tree.map(lambda a: np.asarray(a[0], np.float64), params["layers"])
    for b, n in enumerate(LENGTHS):
        x_TD = np.asarray(params["embed"], np.float64)[ids[b, P - n:]]
        h_TD = np_rms_norm(x_TD, lp["attn_norm"])
        k_TKH = np_rope(np.einsum("td,dkh->tkh", h_TD, lp["wk"]) + lp["bk"], np.arange(n))
        v_TKH = np.einsum("td,dkh->tkh", h_TD, lp["wv"]) + lp["bv"]
        np.testing.assert_allclose(k_LBKSH[0, b, :, P - n:P], k_TKH.transpose(1, 0, 2), atol=2e-5)
        np.testing.assert_allclose(v_LBKSH[0, b, :, P - n:P], v_TKH.transpose(1, 0, 2), atol=2e-5)
    assert not np.any(k_LBKSH[:, :, :, P:]) and not np.any(v_LBKSH[:, :, :, P:])  # unwritten slots untouched


def test_decode_steps_per_layer_equal_scan_and_forward(params):
    n_new = S - P
    ids = sequences(n_new, seed=1)
    want_BTV = np.asarray(models.forward(CFG, params, jnp.asarray(ids), jnp.asarray(valid_mask(S))))
    caches = {}
    for per_layer in (False, True):
        _, cache = run(params, ids[:, :P], 0, empty_cache(per_layer), per_layer)
        for i in range(n_new):
            logits_B1V, cache = run(params, ids[:, P + i:P + i + 1], P + i, cache, per_layer)
            np.testing.assert_allclose(np.asarray(logits_B1V)[:, 0], want_BTV[:, P + i], atol=2e-5, rtol=0)
        assert isinstance(cache["k"], list) == per_layer
        cache = sampling.cache.stack_cache(cache) if per_layer else cache
        caches[per_layer] = {n: np.asarray(c) for n, c in cache.items()}
    for n in ("k", "v"):  # (the two layouts' products may round differently: jax 0.12's CPU backend, 2e-6)
        np.testing.assert_allclose(caches[True][n], caches[False][n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("per_layer", [False, True])
def test_last_only_is_the_last_position(params, per_layer):
    ids = sequences(0, seed=2)
    full_BTV, cache_full = run(params, ids, 0, empty_cache(per_layer), per_layer)
    last_B1V, cache_last = run(params, ids, 0, empty_cache(per_layer), per_layer, last_only=True)
    assert last_B1V.shape == (len(LENGTHS), 1, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(last_B1V), np.asarray(full_BTV)[:, -1:], atol=1e-6, rtol=0)
    for n in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(jnp.stack(cache_last[n]) if per_layer else cache_last[n]),
                                      np.asarray(jnp.stack(cache_full[n]) if per_layer else cache_full[n]))


def test_mixed_stacked_and_per_layer_raise(params):
    ids = sequences(0)
    with pytest.raises(ValueError, match=r"params\['layers'\].*all stacked or all per-layer"):
        run(params, ids, 0, empty_cache(per_layer=True), per_layer=False)
    short = {n: c[:-1] for n, c in empty_cache(per_layer=True).items()}
    with pytest.raises(ValueError, match="3 layers of params, 2/2 of cache"):
        run(params, ids, 0, short, per_layer=True)


def test_unrolled_generate_equals_scanned(params):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, CFG.vocab_size, size=n).tolist() for n in (4, 9, 2)]
    sps = [sampling.SamplingParams(max_new_tokens=7, **kw) for kw in (
        dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.8, top_k=10, top_p=0.9))]
    out = {u: sampling.generate(CFG, params, prompts, sps, 5, unroll_layers=u) for u in (False, True)}
    assert out[True].tokens == out[False].tokens
    assert [len(t) for t in out[True].tokens] == [7, 7, 7]
    for a, b in zip(out[True].logprobs, out[False].logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])
def test_empty_cache_prefill_reads_only_the_new_slots(params, per_layer):
    """empty_cache: attention reads the T new keys/values only. Slots >= P hold NaN here: masked out, they still
    poison the value product when read (0 * NaN), so the flag is what keeps the logits finite."""
    ids = sequences(0)
    q = np.arange(P)
    cache = jax.tree.map(lambda c: c.at[..., P:, :].set(jnp.nan), sampling.init_cache(CFG, len(LENGTHS), S))
    cache = sampling.cache.unstack_cache(cache) if per_layer else cache
    p = {**params, "layers": unstack_layers(params["layers"])} if per_layer else params
    f = jax.jit(models.forward_with_cache, static_argnames=("cfg", "empty_cache"))
    args = (CFG, p, jnp.asarray(ids), jnp.asarray(positions(q)), jnp.asarray(cache_mask(q)), cache, jnp.int32(0))
    logits_BTV, new_cache = f(*args, empty_cache=True)
    want_BTV = models.forward(CFG, params, jnp.asarray(ids), jnp.asarray(valid_mask(P)))
    m = valid_mask(P).astype(bool)
    np.testing.assert_allclose(np.asarray(logits_BTV)[m], np.asarray(want_BTV)[m], atol=2e-5, rtol=0)
    k = np.asarray(sampling.cache.stack_cache(new_cache)["k"] if per_layer else new_cache["k"])
    assert np.isfinite(k[..., :P, :]).all() and np.isnan(k[..., P:, :]).all()  # new slots written, rest kept
    assert np.isnan(np.asarray(f(*args, empty_cache=False)[0])[m]).any()  # reading every slot sees the NaN

