"""Top-k without a sort: `strategies.kth_largest` equals the sorted row's k-th value, ties, -inf, signed zeros and
huge values included, and filter_threshold takes it when no row asks for top-p (the sort of the whole vocabulary
cost ~290 ms a step at [32, 49152] on a 2-core CPU; the bisection ~10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.sampling import strategies as st

B, V = 8, 300


def _rows():
    rng = np.random.default_rng(0)
    plain = rng.standard_normal((B, V)).astype(np.float32)
    ties = np.round(rng.standard_normal((B, V)) * 2).astype(np.float32)
    masked = plain.copy()
    masked[:, ::3] = -np.inf
    huge = (-np.abs(rng.standard_normal((B, V))) * 1e30).astype(np.float32)
    zeros = np.zeros((B, V), np.float32)
    zeros[:, ::2] = -0.0
    return [plain, ties, masked, huge, zeros, -plain]


@pytest.mark.parametrize("which", range(6))
def test_kth_largest_equals_the_sorted_rows_kth_value(which):
    x = jnp.asarray(_rows()[which])
    rng = np.random.default_rng(which)
    for k in (np.full(B, 1), np.full(B, V), np.full(B, V + 7), rng.integers(1, V + 1, B), np.arange(B) * 40 + 1):
        k = jnp.asarray(k, jnp.int32)
        want = jnp.take_along_axis(-jnp.sort(-x, axis=-1), (jnp.clip(k, 1, V) - 1)[:, None], axis=-1)[:, 0]
        np.testing.assert_array_equal(np.asarray(jax.jit(st.kth_largest)(x, k)), np.asarray(want))


def test_top_k_alone_sorts_nothing_and_keeps_the_same_tokens():
    x = jnp.asarray(_rows()[1])
    k = jnp.asarray([0, 1, 3, 50, V, 7, 2, 299], jnp.int32)
    jaxpr = str(jax.make_jaxpr(st.kth_largest)(x, k))
    assert "sort" not in jaxpr
    got = jax.jit(st.filter_top_k_top_p)(x, k, jnp.ones(B))
    kth = jnp.take_along_axis(-jnp.sort(-x, axis=-1), (jnp.clip(k, 1, V) - 1)[:, None], axis=-1)[:, 0]
    thr = jnp.where(k > 0, kth, st.NEG_INF)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.where(x >= thr[:, None], x, st.NEG_INF)))
    assert np.isfinite(np.asarray(got[0])).all()  # top_k 0: off
    # a row with top-p: top-k first, then the nucleus
    p = jnp.ones(B).at[3].set(0.5)
    mixed = jax.jit(st.filter_top_k_top_p)(x, k, p)
    np.testing.assert_array_equal(np.asarray(mixed[jnp.arange(B) != 3]), np.asarray(got[jnp.arange(B) != 3]))
    assert np.isfinite(np.asarray(mixed[3])).sum() <= np.isfinite(np.asarray(got[3])).sum()
