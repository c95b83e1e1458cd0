"""Independent float64 references for the policy-gradient tests: GRPO advantages and the clipped PG loss written
out token by token in plain Python from NeMo RL's behaviour (reference/nemo_rl.md §1.0, §1.4.2-1.4.3), plus the
helpers that feed the same float32-rounded inputs to the implementation and compare."""

from __future__ import annotations

import math

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


def ref_loss(lp, old, ref, adv, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3",
             token_level=True, sequence_level_ratio=False, sampler_logprobs=None, tis_cap=None, normalizer=None,
             reinforce=False, sums=False):
    """The loss written out token by token. Returns (loss, metrics) or, with sums=True, (sum, count, metric sums)."""
    lp, old, mask = (np.asarray(x, np.float64) for x in (lp, old, mask))
    R, T = lp.shape
    adv = np.asarray(adv, np.float64)
    A = np.repeat(adv[:, None], T, 1) if adv.ndim == 1 else adv
    gen = None if sampler_logprobs is None else np.asarray(sampler_logprobs, np.float64)
    refa = None if ref is None else np.asarray(ref, np.float64)
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
                seq_w = math.exp(sum(old[i, t] - gen[i, t] for t in valid_t))
        for t in range(T):
            a = A[i, t]
            clipped = False
            if reinforce:
                r = 1.0
                ell = -a * lp[i, t]
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
                w = seq_w if sequence_level_ratio else math.exp(old[i, t] - gen[i, t])
                if not math.isfinite(w):
                    w = 0.0
                if tis_cap is not None:
                    w = min(max(w, 0.0), tis_cap)
            k = ref_k(refa[i, t] - lp[i, t], kl_type) if refa is not None else 0.0
            kl_term = min(max(kl_coef * k, -10.0), 10.0) if kl_coef else 0.0
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
    total = agg["actor_loss"] + agg["kl_loss"]
    if sums:
        return total, count, dict(agg, ratio_min=rmin, ratio_max=rmax)
    n = count if normalizer is None else float(normalizer)
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


def pgl(lp, old, ref, adv, mask, sampler_logprobs=None, kl_logprobs=None, **kw):
    *args, sampler = padded(lp, old, ref, adv, mask, sampler_logprobs)
    return policy_gradient_loss(*args, sampler_logprobs=sampler, kl_logprobs=_pad(kl_logprobs, -1.0), **kw)


def pgl_sum(lp, old, ref, adv, mask, sampler_logprobs=None, **kw):
    *args, sampler = padded(lp, old, ref, adv, mask, sampler_logprobs)
    return policy_gradient_loss_sum(*args, sampler_logprobs=sampler, **kw)


def f32(x):
    return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


def f64(x):
    """The float32-rounded inputs as float64, so the reference sees exactly what the implementation sees."""
    return np.asarray(np.asarray(x, np.float32), np.float64)


def run_both(lp, old, ref, adv, mask, sampler=None, **kw):
    lp, old, adv, mask = f64(lp), f64(old), f64(adv), f64(mask)
    ref = None if ref is None else f64(ref)
    sampler = None if sampler is None else f64(sampler)
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
