"""Sampling strategies over logits [B, V]: small pure functions with per-row parameters.

Every per-request value (temperature, top-k, top-p) is a per-row array, never a compile-time constant, so a
new temperature or nucleus size reuses the compiled program. The processing order is HF's:
temperature -> top-k -> top-p. A row with temperature 0 is greedy: its processed distribution is a point
mass on the argmax (log-prob 0 for the chosen token).

Shape suffixes: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_F32 = jnp.float32
NEG_INF = -jnp.inf


def scale_by_temperature(logits_BV: jax.Array, temperature_B: jax.Array) -> jax.Array:
    """logits / T per row; rows with T == 0 (greedy) are left unscaled (their argmax is all that counts)."""
    t_B = jnp.where(temperature_B > 0, temperature_B, 1.0).astype(_F32)
    return logits_BV.astype(_F32) / t_B[:, None]


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order as the floats (-inf lowest, +inf highest; -0 just below +0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(_F32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_order_keys(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32((1 << 31) - 1), ~key)
    return jax.lax.bitcast_convert_type(bits, _F32)


def kth_largest(x_BV: jax.Array, k_B: jax.Array) -> jax.Array:
    """The k-th largest value of each row [B], ties counted (`-sort(-x)[k - 1]`; k clipped to [1, V]), without a
    sort: the largest t with count(x >= t) >= k, found by bisection on the floats' order-preserving bit patterns
    (32 counting passes over the row). Exact. On XLA:CPU about 30x faster than the sort at [32, 49152]."""
    V = x_BV.shape[-1]
    k_B = jnp.clip(k_B, 1, V).astype(jnp.int32)
    key_BV = _order_keys(x_BV)
    lo_B, hi_B = jnp.min(key_BV, axis=-1), jnp.max(key_BV, axis=-1)  # the answer lies in [lo, hi]

    def halve(_, bounds):
        lo_B, hi_B = bounds
        span_B = hi_B - lo_B
        mid_B = lo_B + (span_B >> 1) + (span_B & 1)  # the upper middle, no overflow
        ok_B = jnp.sum(key_BV >= mid_B[:, None], axis=-1, dtype=jnp.int32) >= k_B
        return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B - 1)

    lo_B, _ = jax.lax.fori_loop(0, 32, halve, (lo_B, hi_B))
    return _from_order_keys(lo_B)


def nucleus_threshold(x_BV: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """The smallest logit of each row's nucleus [B]: the smallest present value v whose strictly larger values hold
    less than top_p of the row's probability (so the tokens down to v reach top_p; the largest is always kept).
    Tokens tied with v are all kept, as top-k keeps its ties (HF keeps those its sort puts first). -inf where
    top_p >= 1 (off). No sort: the probability above a candidate is non-increasing in it, so bisection on the
    floats' order-preserving bit patterns finds the smallest candidate that passes (32 masked sums over the row);
    the step function only changes at present values, so that candidate is one. The sums round in another order
    than a sorted cumulative sum: the two differ only where a prefix's mass is within rounding of top_p."""
    x_BV = x_BV.astype(_F32)
    probs_BV = jax.nn.softmax(x_BV, axis=-1)
    p_B = top_p_B.astype(_F32)
    key_BV = _order_keys(x_BV)
    lo_B, hi_B = jnp.min(key_BV, axis=-1), jnp.max(key_BV, axis=-1)  # the row's largest value always passes

    def halve(_, bounds):
        lo_B, hi_B = bounds
        mid_B = lo_B + ((hi_B - lo_B) >> 1)  # the lower middle: mid < hi while lo < hi, so hi is never tested
        above_B = jnp.sum(jnp.where(key_BV > mid_B[:, None], probs_BV, 0.0), axis=-1)
        ok_B = above_B < p_B
        return jnp.where(ok_B, lo_B, mid_B + 1), jnp.where(ok_B, mid_B, hi_B)

    _, hi_B = jax.lax.fori_loop(0, 32, halve, (lo_B, hi_B))
    return jnp.where(top_p_B < 1.0, _from_order_keys(hi_B), NEG_INF)


CANDIDATES_CPU = 256  # `filter_threshold`'s default candidate count on a CPU (lax.top_k: a partial sort there)


def bisect_threshold(logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """`filter_threshold` over the whole rows: the larger of the top-k threshold (`kth_largest`) and the nucleus
    threshold of the top-k-renormalised row (`nucleus_threshold`); each part only when some row asks for it."""
    logits_BV = logits_BV.astype(_F32)
    thr_k_B = jax.lax.cond(jnp.any(top_k_B > 0), lambda x: jnp.where(top_k_B > 0, kth_largest(x, top_k_B), NEG_INF),
                           lambda x: jnp.full(x.shape[:-1], NEG_INF, _F32), logits_BV)

    def with_top_p(logits_BV):
        kept_BV = jnp.where(logits_BV >= thr_k_B[:, None], logits_BV, NEG_INF)
        return jnp.maximum(thr_k_B, nucleus_threshold(kept_BV, top_p_B))

    return jax.lax.cond(jnp.all(top_p_B >= 1.0), lambda x: thr_k_B, with_top_p, logits_BV)


def candidate_threshold(logits_BV: jax.Array, top_BK: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array
                        ) -> jax.Array:
    """`filter_threshold` [B] from each row's K largest logits `top_BK` (descending, as lax.top_k returns them), for
    rows whose top_k is off or at most K: the rule written over a sorted row (cumulative mass; probabilities
    normalised over the whole top-k-filtered row). Exact for such rows: the top-k set's values past the K-th all
    equal the K-th (they lie between the k-th and the K-th largest), so a nucleus that does not close among the K
    candidates ends at that same value. A row with neither filter gets -inf (keeps everything).
    XLA:CPU lowers lax.top_k to a sort and a slice that it turns back into its TopK call only while the sort's
    users are that one slice: a slice of top_BK folds into another slice of the sort (top_BK[:, :1] did: a full
    sort of [256, 49152], 2 s instead of 40 ms), so this function reads top_BK through gathers and reductions."""
    x_BV = logits_BV.astype(_F32)
    top_BK = top_BK.astype(_F32)
    K = top_BK.shape[-1]
    kth_B = jnp.take_along_axis(top_BK, (jnp.clip(top_k_B, 1, K) - 1)[:, None], axis=-1)[:, 0]
    thr_k_B = jnp.where(top_k_B > 0, kth_B, NEG_INF)

    def nucleus(_):
        m_B = jnp.max(top_BK, axis=-1, keepdims=True)  # (not top_BK[:, :1]: see the docstring)
        z_B = jnp.sum(jnp.where(x_BV >= thr_k_B[:, None], jnp.exp(x_BV - m_B), 0.0), axis=-1)
        probs_BK = jnp.where(top_BK >= thr_k_B[:, None], jnp.exp(top_BK - m_B), 0.0) / z_B[:, None]
        keep_BK = (jnp.cumsum(probs_BK, axis=-1) - probs_BK < top_p_B[:, None]).at[:, 0].set(True)
        thr_B = jnp.take_along_axis(top_BK, (jnp.sum(keep_BK, axis=-1) - 1)[:, None], axis=-1)[:, 0]
        return jnp.where(top_p_B < 1.0, thr_B, NEG_INF)

    thr_p_B = jax.lax.cond(jnp.all(top_p_B >= 1.0), lambda _: jnp.full_like(thr_k_B, NEG_INF), nucleus, None)
    return jnp.maximum(thr_k_B, thr_p_B)


def filter_threshold(logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array, candidates: int | None = None
                     ) -> jax.Array:
    """[B]: the smallest logit `filter_top_k_top_p` keeps in each row: the larger of the k-th largest logit (ties
    kept) and the nucleus edge of the top-k-renormalised row (`nucleus_threshold`). Nothing sorts the vocabulary.

    candidates: K > 0, when every filtered row has a top-k of at most K: the rule over each row's K largest logits
    (lax.top_k, then `candidate_threshold`, exact for such rows). Otherwise (some row with top_k > K, or top-p
    alone: a nucleus can span thousands of tokens) bisection over the whole rows (`bisect_threshold`). A
    `lax.cond`, so the choice follows the values, not the compile. None: K = CANDIDATES_CPU on a CPU, where
    lax.top_k is a cheap partial sort (at [32, 49152] with top_k 50 and top_p 0.9 on 2 cores: about 5 ms, against
    22 ms for the bisection and 260 ms for a sort); 0 elsewhere (XLA:GPU's top_k sorts the row for a large K:
    unmeasured; `benchmarks/filter.py` measures all three). The two paths round the nucleus's mass in different
    orders: a row whose prefix mass lies within rounding of top_p may keep one token more or less on one than on
    the other."""
    V = logits_BV.shape[-1]
    if candidates is None:
        candidates = CANDIDATES_CPU if jax.default_backend() == "cpu" else 0
    K = min(candidates, V)
    if K <= 0:
        return bisect_threshold(logits_BV, top_k_B, top_p_B)
    logits_BV = logits_BV.astype(_F32)

    def from_candidates(x_BV):
        return candidate_threshold(x_BV, jax.lax.top_k(x_BV, K)[0], top_k_B, top_p_B)

    off_B = (top_k_B <= 0) & (top_p_B >= 1.0)  # no filter: any threshold path gives -inf
    fits = jnp.all(off_B | ((top_k_B > 0) & (top_k_B <= K)))
    return jax.lax.cond(fits, from_candidates, lambda x: bisect_threshold(x, top_k_B, top_p_B), logits_BV)


def filter_top_k_top_p(logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
                       threshold_B: jax.Array | None = None) -> jax.Array:
    """Top-k then top-p (on the top-k-renormalised distribution); removed tokens get -inf. The rows' threshold is
    `filter_threshold`'s unless given."""
    thr_B = filter_threshold(logits_BV, top_k_B, top_p_B) if threshold_B is None else threshold_B
    return jnp.where(logits_BV >= thr_B[:, None], logits_BV, NEG_INF)


def argmax_rows(x_BV: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1) as int32 (the first maximum; the first NaN if a row has one), as two plain
    reductions (a max, then the smallest index that attains it) instead of one over (value, index) pairs:
    XLA:CPU vectorises these (over [32, 49152] in isolation: 0.94 against 3.3-3.6 ms)."""
    V = x_BV.shape[-1]
    hit_BV = (x_BV == jnp.max(x_BV, axis=-1, keepdims=True)) | jnp.isnan(x_BV)
    return jnp.min(jnp.where(hit_BV, jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1), V), axis=-1)


def point_mass(logits_BV: jax.Array) -> jax.Array:
    """Log-weights of a point mass on each row's argmax: 0 there, -inf elsewhere."""
    V = logits_BV.shape[-1]
    return jnp.where(jnp.arange(V)[None] == argmax_rows(logits_BV)[:, None], 0.0, NEG_INF)


def _scale_and_filter(logits_BV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                      top_p_B: jax.Array) -> jax.Array:
    """Temperature, then top-k/top-p; the filter runs only when some row asks for it (a `lax.cond`)."""
    x_BV = scale_by_temperature(logits_BV, temperature_B)
    needs_filter = jnp.any((top_k_B > 0) | (top_p_B < 1.0))
    return jax.lax.cond(needs_filter, filter_top_k_top_p, lambda x, k, p: x, x_BV, top_k_B, top_p_B)


def process_logits(logits_BV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                   top_p_B: jax.Array) -> jax.Array:
    """The processed logits [B, V] fp32 whose softmax is the distribution actually sampled from.

    The top-k/top-p filter runs only when some row asks for it (a `lax.cond`, not a recompile).
    """
    x_BV = _scale_and_filter(logits_BV, temperature_B, top_k_B, top_p_B)
    return jnp.where((temperature_B > 0)[:, None], x_BV, point_mass(logits_BV))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    tokens_B: jax.Array  # int32
    logprobs_B: jax.Array  # fp32, under the processed distribution
    raw_logprobs_B: jax.Array  # fp32, temperature 1, no filtering


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class RowSampler:
    """Per-row sampling parameters (a pytree of arrays: changing a value never recompiles).

    temperature_B: 0 = greedy; top_k_B: 0 = off; top_p_B: 1 = off.
    """

    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array

    def get_next_tokens(self, logits_BV: jax.Array, keys_B: jax.Array, need_raw: jax.Array | bool = True
                        ) -> SampleResult:
        """Sample one token per row with its own key; also return both kinds of log-prob.

        A greedy row's processed distribution is a point mass (`process_logits`): its log-prob is 0 without
        computing one. When no row samples (an all-greedy batch) the processing, the Gumbel noise and the
        processed log-probs are skipped (a `lax.cond`), and so is the raw log-softmax when `need_raw` is false
        (raw_logprobs_B is then 0: the caller asked for none)."""
        sampled_B = self.temperature_B > 0
        greedy_B = argmax_rows(logits_BV)

        def sample(logits_BV):
            x_BV = _scale_and_filter(logits_BV, self.temperature_B, self.top_k_B, self.top_p_B)
            g_BV = jax.vmap(lambda k: jax.random.gumbel(k, x_BV.shape[-1:], _F32))(keys_B)
            tokens_B = jnp.where(sampled_B, argmax_rows(x_BV + g_BV), greedy_B)
            return tokens_B, jnp.where(sampled_B, token_logprobs(x_BV, tokens_B), 0.0)

        tokens_B, logprobs_B = jax.lax.cond(jnp.any(sampled_B), sample,
                                            lambda _: (greedy_B, jnp.zeros(greedy_B.shape, _F32)), logits_BV)
        raw_B = jax.lax.cond(need_raw, token_logprobs, lambda x, t: jnp.zeros(t.shape, _F32), logits_BV, tokens_B)
        return SampleResult(tokens_B=tokens_B, logprobs_B=logprobs_B, raw_logprobs_B=raw_B)


def token_logprobs(logits_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """log softmax(logits)[token] per row, fp32."""
    x_BV = logits_BV.astype(_F32)
    return jnp.take_along_axis(x_BV, tokens_B[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(x_BV, axis=-1)
