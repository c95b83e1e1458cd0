"""Independent float64 references for the policy-gradient tests: GRPO advantages and the clipped PG loss written
out token by token in plain Python from NeMo RL's behaviour (reference/nemo_rl.md §1.0, §1.4.2-1.4.3), plus the
helpers that feed the same float32-rounded inputs to the implementation and compare."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.losses import policy_gradient_loss, policy_gradient_loss_sum

RTOL, ATOL = 1e-5, 1e-6
EPS = 1e-6


def close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol,
                               err_msg=what)


# ----------------------------------------------------------------------------------------------------------------
# Independent references (plain Python loops, float64)
# ----------------------------------------------------------------------------------------------------------------

def std_unbiased(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1))


def ref_advantages(rewards, G: int, leave_one_out: bool = True, normalize_std: bool = True, eps: float = EPS):
    r = [float(x) for x in rewards]
    out = []
    for g0 in range(0, len(r), G):
        group = r[g0:g0 + G]
        for i, ri in enumerate(group):
            if G == 1:  # a group with one sample: the baseline is the reward itself
                out.append(0.0)
                continue
            pool = group[:i] + group[i + 1:] if leave_one_out else group
            b = sum(pool) / len(pool)
            s = std_unbiased(pool)
            a = ri - b
            if normalize_std and s > 0:
                a = a / (s + eps)
            out.append(a)
    return np.array(out)


def ref_k(logr: float, kl_type: str) -> float:
    x = min(max(logr, -20.0), 20.0)
    return {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - 1.0 - x}[kl_type]


def _exp(x: float) -> float:
    """math.exp that overflows to inf (like float arithmetic) instead of raising."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def ref_loss(lp, old, ref, adv, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3",
             token_level=True, sequence_level_ratio=False, sampler_logprobs=None, tis_cap=None, normalizer=None,
             reinforce=False, sums=False, kl_logprobs=None, cispo=False, tis_type="tis", tis_min=None,
             on_policy_kl=False, positive_nll_weight=0.0, positive_rows=None, nll_scale=None):
    """The loss written out token by token. Returns (loss, metrics) or, with sums=True, (sum, count, metric sums).

    cispo: l = -A * r_c * log p (r_c a constant: CISPO); tis_type/tis_min: how the sampler importance weight is
    truncated when tis_cap is set ("tis" clip to [tis_min or 0, tis_cap], "icepop" zero outside [tis_min, tis_cap],
    "seq-mask-tis" zero whole sequences whose geometric-mean weight is outside, else raw); on_policy_kl: each KL
    term times exp(log p_kl - log p_sampler); positive_nll_weight/positive_rows/nll_scale: VAPO's NLL on the
    positive rows, added as weight * scale * (sum of -log p over their valid tokens), scale = nll_scale or
    count / N_pos in the sums form and normaliser / N_pos in the normalised form."""
    lp, old, mask = (np.asarray(x, np.float64) for x in (lp, old, mask))
    R, T = lp.shape
    adv = np.asarray(adv, np.float64)
    A = np.repeat(adv[:, None], T, 1) if adv.ndim == 1 else adv
    gen = None if sampler_logprobs is None else np.asarray(sampler_logprobs, np.float64)
    refa = None if ref is None else np.asarray(ref, np.float64)
    kla = lp if kl_logprobs is None else np.asarray(kl_logprobs, np.float64)
    names = ["actor_loss", "kl_loss", "kl", "clip_fraction", "ratio_mean", "is_weight_mean", "approx_entropy",
             "advantage_mean"]
    tok = {k: np.zeros((R, T)) for k in names}
    ratios = np.ones((R, T))
    for i in range(R):
        valid_t = [t for t in range(T) if mask[i, t] > 0]
        if sequence_level_ratio:
            d = sum(lp[i, t] - old[i, t] for t in valid_t) / len(valid_t) if valid_t else 0.0
            seq_ratio = math.exp(d)
            if gen is not None:
                seq_w = _exp(sum(old[i, t] - gen[i, t] for t in valid_t))
        seq_masked = False  # seq-mask-tis: the sequence's geometric-mean weight left [tis_min, tis_cap]
        if gen is not None and tis_cap is not None and tis_type == "seq-mask-tis" and valid_t:
            s_geo = _exp(sum(old[i, t] - gen[i, t] for t in valid_t) / len(valid_t))
            seq_masked = not (tis_min <= s_geo <= tis_cap)
        for t in range(T):
            a = A[i, t]
            clipped = False
            if reinforce:
                r = 1.0
                ell = -a * lp[i, t]
            elif cispo:
                r = math.exp(lp[i, t] - old[i, t])
                rc = min(max(r, 1.0 - clip_low), 1.0 + clip_high)
                ell = -a * rc * lp[i, t]  # r_c is a constant weight on log p
                clipped = rc != r
            else:
                r = seq_ratio if sequence_level_ratio else math.exp(lp[i, t] - old[i, t])
                rc = min(max(r, 1.0 - clip_low), 1.0 + clip_high)
                lu, lc = -a * r, -a * rc
                ell = max(lu, lc)
                clipped = lc > lu
                if dual_clip is not None and a < 0 and ell > -a * dual_clip:
                    ell = -a * dual_clip
                    clipped = True
            w = 1.0
            if gen is not None:
                w = seq_w if sequence_level_ratio else _exp(old[i, t] - gen[i, t])
                if not math.isfinite(w):
                    w = 0.0
                if tis_cap is not None:
                    if tis_type == "tis":
                        w = min(max(w, 0.0 if tis_min is None else tis_min), tis_cap)
                    elif tis_type == "icepop":
                        w = w if tis_min <= w <= tis_cap else 0.0
                    elif tis_type == "seq-mask-tis":
                        w = 0.0 if seq_masked else w
                    else:
                        raise ValueError(tis_type)
            k = ref_k(refa[i, t] - kla[i, t], kl_type) if refa is not None else 0.0
            v = 1.0
            if on_policy_kl:
                v = _exp(kla[i, t] - gen[i, t])
                if not math.isfinite(v):
                    v = 0.0
            kl_term = kl_coef * min(max(v * k, -10.0), 10.0) if kl_coef else 0.0  # NeMo: beta x clamp(v k)
            ent = -lp[i, t] * (math.exp(lp[i, t] - gen[i, t]) if gen is not None else 1.0)
            ratios[i, t] = r
            for name, v in zip(names, [w * ell, kl_term, k, float(clipped), r, w, ent, a], strict=True):
                tok[name][i, t] = v
    # aggregation
    agg = {}
    if token_level:
        count = sum(1.0 for i in range(R) for t in range(T) if mask[i, t] > 0)
        for name in names:
            agg[name] = sum(tok[name][i, t] for i in range(R) for t in range(T) if mask[i, t] > 0)
    else:
        rows = [i for i in range(R) if mask[i].sum() > 0]
        count = float(len(rows))
        for name in names:
            agg[name] = sum(sum(tok[name][i, t] for t in range(T) if mask[i, t] > 0) / mask[i].sum() for i in rows)
    valid = mask > 0
    rmin, rmax = ratios[valid].min(), ratios[valid].max()
    # positive-example NLL: -log p summed over the valid tokens of the positive rows
    pos = [False] * R if positive_rows is None else [float(x) > 0 for x in np.asarray(positive_rows).reshape(-1)]
    nll_sum = sum(-lp[i, t] for i in range(R) for t in range(T) if pos[i] and mask[i, t] > 0)
    n_pos = sum(1 for i in range(R) for t in range(T) if pos[i] and mask[i, t] > 0)
    n = count if (sums or normalizer is None) else float(normalizer)
    if sums:
        scale = nll_scale if nll_scale is not None else count / max(n_pos, 1)
    else:
        assert nll_scale is None, "policy_gradient_loss derives nll_scale from its normaliser"
        scale = n / max(n_pos, 1)
    agg["positive_nll_loss"] = positive_nll_weight * scale * nll_sum
    total = agg["actor_loss"] + agg["kl_loss"] + agg["positive_nll_loss"]
    if sums:
        return total, count, dict(agg, ratio_min=rmin, ratio_max=rmax)
    metrics = {k: v / n for k, v in agg.items()}
    metrics.update(ratio_min=rmin, ratio_max=rmax)
    return total / n, metrics

# Every batch goes to the implementation padded to PAD_R x PAD_T with masked entries (log-probs -1, advantage 0,
# mask 0), so JAX's eager kernels compile for one shape only and the file stays fast. Masked entries must not change
# anything (test_masked_tokens_do_not_count checks it without padding tricks: same shape, different values).
PAD_R, PAD_T = 4, 6


def _pad(x, fill):
    if x is None:
        return None
    x = np.asarray(x, np.float32)
    assert x.shape[0] <= PAD_R and (x.ndim == 1 or x.shape[1] <= PAD_T), x.shape
    out = np.full((PAD_R,) if x.ndim == 1 else (PAD_R, PAD_T), fill, np.float32)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return jnp.asarray(out)


def padded(lp, old, ref, adv, mask, sampler):
    return (_pad(lp, -1.0), _pad(old, -1.0), _pad(ref, -1.0), _pad(adv, 0.0), _pad(mask, 0.0),
            _pad(sampler, -1.0))


def pad_kw(kw):
    """Pads the optional per-row / per-token keyword inputs (positive rows pad as negative, i.e. 0)."""
    kw = dict(kw)
    if kw.get("positive_rows") is not None:
        kw["positive_rows"] = _pad(kw["positive_rows"], 0.0)
    if kw.get("kl_logprobs") is not None:
        kw["kl_logprobs"] = _pad(kw["kl_logprobs"], -1.0)
    return kw


def pgl(lp, old, ref, adv, mask, sampler_logprobs=None, **kw):
    *args, sampler = padded(lp, old, ref, adv, mask, sampler_logprobs)
    return policy_gradient_loss(*args, sampler_logprobs=sampler, **pad_kw(kw))


def pgl_sum(lp, old, ref, adv, mask, sampler_logprobs=None, **kw):
    *args, sampler = padded(lp, old, ref, adv, mask, sampler_logprobs)
    return policy_gradient_loss_sum(*args, sampler_logprobs=sampler, **pad_kw(kw))


def f32(x):
    return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


def f64(x):
    """The float32-rounded inputs as float64, so the reference sees exactly what the implementation sees."""
    return np.asarray(np.asarray(x, np.float32), np.float64)


def run_both(lp, old, ref, adv, mask, sampler=None, **kw):
    lp, old, adv, mask = f64(lp), f64(old), f64(adv), f64(mask)
    ref = None if ref is None else f64(ref)
    sampler = None if sampler is None else f64(sampler)
    if kw.get("kl_logprobs") is not None:
        kw["kl_logprobs"] = f64(kw["kl_logprobs"])
    got_loss, got_m = pgl(lp, old, ref, adv, mask, sampler_logprobs=sampler, **kw)
    exp_loss, exp_m = ref_loss(lp, old, ref, adv, mask, sampler_logprobs=sampler, **kw)
    return float(got_loss), {k: float(v) for k, v in got_m.items()}, exp_loss, exp_m


def check_all(got_loss, got_m, exp_loss, exp_m):
    close(got_loss, exp_loss)
    assert set(exp_m) <= set(got_m), f"missing metrics {set(exp_m) - set(got_m)}"
    for k, v in exp_m.items():
        close(got_m[k], v, atol=1e-5 if k == "approx_entropy" else ATOL, what=k)


def random_batch(seed, R=4, T=6, spread=0.3):
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.1, 3.0, (R, T))
    old = lp + rng.normal(0, spread, (R, T))
    ref = lp + rng.normal(0, spread, (R, T))
    sampler = old + rng.normal(0, spread, (R, T))
    adv = rng.normal(0, 1.0, R)
    mask = (rng.uniform(size=(R, T)) < 0.75).astype(np.float64)
    mask[:, 0] = 1.0
    return lp, old, ref, sampler, adv, mask


def loss_grad(lp, old, ref, adv, mask, sampler_logprobs=None, **kw):
    """d loss / d logprobs on the padded batch; the padding (masked) must get exactly zero gradient."""
    *args, sampler = padded(lp, old, ref, adv, mask, sampler_logprobs)
    kw = pad_kw(kw)
    g = np.asarray(jax.grad(lambda x: policy_gradient_loss(x, *args[1:], sampler_logprobs=sampler, **kw)[0])(args[0]),
                   np.float64)
    R, T = np.shape(lp)
    assert np.all(g[R:] == 0) and np.all(g[:, T:] == 0), "masked padding got a gradient"
    return g[:R, :T]


def central_differences(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f / d x[i, t] by central differences of the float64 scalar function f."""
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        out[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return out


def hand_ratio_batch():
    # one row, per-token advantages and ratios covering each side of the clip
    ratios = np.array([1.5, 0.5, 0.5, 1.5, 1.1, 0.9])
    A = np.array([[1.0, 1.0, -1.0, -1.0, 2.0, -0.5]])
    old = np.array([[-1.0, -2.0, -0.5, -1.5, -0.7, -3.0]])
    lp = old + np.log(ratios)[None]
    mask = np.ones((1, 6))
    return lp, old, A, mask, ratios


def ragged_batch():
    lp = np.array([[-1.0, -0.5, -2.0, -0.2], [-0.3, -0.9, -1.1, -0.4], [-2.0, -0.1, -0.6, -1.3],
                   [-0.7, -0.8, -0.9, -1.0]])
    old = lp + np.array([[0.1, -0.3, 0.05, 0.4], [0.0, 0.2, -0.1, 0.0], [-0.25, 0.02, 0.3, 0.1],
                         [0.0, 0.0, 0.0, 0.0]])
    adv = np.array([1.0, -0.5, 2.0, 3.0])
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0.0]])  # row 3 has no valid token
    return lp, old, adv, mask
