"""The top-k / top-p filter of one decode step, [B, V] logits: jaxrl_llm's (no sort: bisection on the logits' bit
patterns, or lax.top_k candidates first: `sampling.strategies.filter_threshold`) against the same rule computed
with a sort in JAX (what it replaced) and against HF's TopK/TopP logits warpers in PyTorch (what `generate` runs),
on the same device kind.

    python benchmarks/filter.py                                  # [1, 49152], [32, 49152], [64, 128256]
    python benchmarks/filter.py --shapes 64x128256 --repeats 20 --json out.json

Per shape and setting, the median time of a call after a warm-up (compile excluded): ours with this backend's
default (`candidates`: lax.top_k's 256 largest first on a CPU, bisection alone elsewhere), with 256 candidates,
with bisection alone (0), the sort, HF; and the ratios sort / ours and HF / ours (> 1: ours is faster). The column
"bisect GB/s": the bytes the bisection reads (32 passes over [B, V] fp32 order keys, and probabilities for top-p)
over its time, an effective bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.sampling import strategies as st


def sorted_filter(x_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """The same filter with a sort of every row (the implementation the bisection replaced)."""
    s_BV = -jnp.sort(-x_BV, axis=-1)
    V = x_BV.shape[-1]
    kth_B = jnp.take_along_axis(s_BV, (jnp.clip(top_k_B, 1, V) - 1)[:, None], axis=-1)[:, 0]
    thr_k_B = jnp.where(top_k_B > 0, kth_B, -jnp.inf)
    s_BV = jnp.where(s_BV >= thr_k_B[:, None], s_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(s_BV, axis=-1)
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p_B[:, None]).at[:, 0].set(True)
    thr_p_B = jnp.take_along_axis(s_BV, (jnp.sum(keep_BV, -1) - 1)[:, None], axis=-1)[:, 0]
    thr_B = jnp.maximum(thr_k_B, jnp.where(top_p_B < 1.0, thr_p_B, -jnp.inf))
    return jnp.where(x_BV >= thr_B[:, None], x_BV, -jnp.inf)


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hf(x: np.ndarray, top_k: int, top_p: float, repeats: int) -> float | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    xt = torch.from_numpy(x).to(dev)
    warpers = ([transformers.TopKLogitsWarper(top_k)] if top_k else []) + (
        [transformers.TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

    def run():
        y = xt
        for w in warpers:
            y = w(None, y)
        if dev == "cuda":
            torch.cuda.synchronize()
        return y

    with torch.no_grad():
        return _time(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x49152,32x49152,64x128256", help="BxV, comma-separated")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| [B, V] | setting | ours ms | K=256 ms | bisect ms | sort ms | HF ms | sort/ours | HF/ours | bisect GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in a.shapes.split(","):
        B, V = (int(s) for s in shape.split("x"))
        x_np = (np.random.default_rng(0).standard_normal((B, V)) * 3).astype(np.float32)
        x = jnp.asarray(x_np)
        for top_k, top_p in [(0, 0.9), (50, 1.0), (50, 0.9)]:
            k, p = jnp.full(B, top_k, jnp.int32), jnp.full(B, top_p, jnp.float32)
            sort_fn = jax.jit(sorted_filter)
            want = np.isfinite(np.asarray(sort_fn(x, k, p)))
            times = []
            for cand in (None, 256, 0):
                fn = jax.jit(lambda x, k, p, cand=cand: st.filter_top_k_top_p(
                    x, k, p, st.filter_threshold(x, k, p, cand)))
                np.testing.assert_array_equal(np.isfinite(np.asarray(fn(x, k, p))), want)
                times.append(_time(lambda fn=fn, x=x, k=k, p=p: fn(x, k, p).block_until_ready(), a.repeats))
            ours, k256, bis = times
            srt = _time(lambda f=sort_fn, x=x, k=k, p=p: f(x, k, p).block_until_ready(), a.repeats)
            hf = _hf(x_np, top_k, top_p, a.repeats)
            passes = 32 * ((2 if top_p < 1.0 else 0) + (1 if top_k else 0))  # 4-byte [B, V] arrays read per pass
            gbs = passes * 4 * B * V / bis / 1e9
            setting = f"top_k={top_k} top_p={top_p}"
            hf_s = "-" if hf is None else f"{hf * 1e3:.2f}"
            hf_r = "-" if hf is None else f"{hf / ours:.2f}x"
            print(f"| [{B}, {V}] | {setting} | {ours * 1e3:.2f} | {k256 * 1e3:.2f} | {bis * 1e3:.2f} | {srt * 1e3:.2f} "
                  f"| {hf_s} | {srt / ours:.2f}x | {hf_r} | {gbs:.0f} |")
            rows.append(dict(B=B, V=V, top_k=top_k, top_p=top_p, ours_s=ours, candidates256_s=k256, bisect_s=bis,
                             sort_s=srt, hf_s=hf, bisect_gbs=gbs))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
