"""Review of 3ad828d..HEAD (rev27): model.logits_chunk on a tensor-parallel mesh and in bf16, the hashed bf16
stochastic rounding on sharded arrays and past 2**32 elements (the command-line findings are in
test_cli_review.py)."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm import models, parallel
from jaxrl_llm.algorithms.losses import target_logprobs
from jaxrl_llm.optim import apply_updates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO = os.path.join(ROOT, "configs", "grpo_tiny.py")
V = 96


def _cfg(**kw) -> models.ModelConfig:
    return models.ModelConfig(family="llama", vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1,
                              num_heads=4, num_kv_heads=2, head_dim=4, **kw)


def test_chunked_logprobs_on_a_tensor_parallel_mesh_equal_unchunked():
    """Vocabulary sharded over `tensor` (hidden states' batch over data x fsdp): chunked log-probs and their
    gradients (head and hidden states) equal the unchunked ones on the same mesh; 13 positions, chunks of 3."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    rules = parallel.ShardingRules()
    p = models.init_params(_cfg(), jax.random.key(0), mesh=mesh, rules=rules, std=0.3)
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((8, 13, 16)), jnp.float32)
    t = jnp.asarray(rng.integers(0, V, (8, 13)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((8, 13)), jnp.float32)
    out = {}
    for chunk in (0, 3):
        cfg = _cfg(logits_chunk=chunk)

        def loss(p, h, cfg=cfg):
            lp = target_logprobs(cfg, p, h, t, rules)
            return (lp * w).sum(), lp

        with jax.set_mesh(mesh):
            out[chunk] = jax.device_get(jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, h))
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[3]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_chunked_bf16_logprobs_are_as_close_to_fp32_as_unchunked():
    """compute_dtype=bfloat16: chunks change which bf16 roundings happen (per-chunk head gradients), not how far
    the result is from fp32."""
    base = _cfg()
    p = models.init_params(base, jax.random.key(1), std=0.3)
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((2, 40, 16)), jnp.float32)
    t = jnp.asarray(rng.integers(0, V, (2, 40)), jnp.int32)

    def run(cd, chunk):
        cfg = dataclasses.replace(base, compute_dtype=cd, logits_chunk=chunk)
        f = lambda p, h: target_logprobs(cfg, p, h.astype(cfg.dtype if cd == "float32" else jnp.bfloat16), t)  # noqa: E731
        def both(p, h):
            lp, vjp = jax.vjp(f, p, h)
            return lp, vjp(jnp.ones_like(lp))

        return jax.device_get(jax.jit(both)(p, h))

    ref = run("float32", 0)
    err = {}
    for chunk in (0, 7):
        out = run("bfloat16", chunk)
        err[chunk] = [float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))
                      for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True) if np.any(b)]
    for e0, e1 in zip(err[0], err[7], strict=True):
        assert e1 <= 1.5 * e0 + 1e-6, (err[0], err[7])


def test_bf16_stochastic_rounding_is_unbiased_and_the_same_on_any_layout():
    mesh = jax.make_mesh((8,), ("x",))
    shape = (64, 512)
    frac = 0.3
    ones = np.ones(shape, np.float32)
    u = np.full(shape, frac * 2.0**-7, np.float32)  # 0.3 of a bf16 step above 1.0
    results = []
    for spec in (P(), P("x", None), P(None, "x")):
        sh = NamedSharding(mesh, spec)
        f = jax.jit(lambda p, u: apply_updates({"w": p}, {"w": u}, jnp.int32(3)), out_shardings={"w": sh})
        results.append(np.asarray(f(jax.device_put(jnp.asarray(ones, jnp.bfloat16), sh),
                                    jax.device_put(u, sh))["w"].astype(jnp.float32)))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    up = (results[0] > 1.0).mean()
    assert abs(up - frac) < 5 * np.sqrt(frac * (1 - frac) / results[0].size)  # P(up) = the fraction of a step
    nxt = np.asarray(jax.jit(lambda p, u: apply_updates({"w": p}, {"w": u}, jnp.int32(4)))(
        jnp.asarray(ones, jnp.bfloat16), u)["w"].astype(jnp.float32))
    assert abs(np.corrcoef((nxt > 1).ravel(), (results[0] > 1).ravel())[0, 1]) < 0.03  # a new draw each step


def test_rounding_noise_of_a_leaf_past_2_to_the_32_does_not_repeat():
    """A flat uint32 index repeats every 2**32 elements (a stacked 70B MLP weight has ~1.9e10): elements that far
    apart drew the same noise at every step. Past the limit (here lowered to 64) the leading index is hashed apart;
    below it the noise is the flat-index stream."""
    from jaxrl_llm.optim import _noise16

    seed = jnp.uint32(12345)
    flat = np.asarray(_noise16((4, 64), seed))
    split = np.asarray(_noise16((4, 64), seed, flat_limit=64))
    assert (flat < 2**16).all() and (split < 2**16).all()
    assert len({tuple(r) for r in split}) == 4  # each leading slice its own draws
    wrapped = np.asarray(_noise16((4, 64), seed, flat_limit=2**40))  # (the same as `flat`: below the limit)
    np.testing.assert_array_equal(flat, wrapped)
    assert abs(split.mean() / 2**16 - 0.5) < 0.05
