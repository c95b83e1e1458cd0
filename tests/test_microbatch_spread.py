"""Microbatch accumulation on a mesh: each microbatch's rows are spread over all of the batch's devices
(`sft.spread_microbatches`), so a scan over microbatches moves rows once before the loop, not in every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import parallel
from jaxrl_llm.algorithms import sft


@pytest.mark.parametrize("mesh_shape,num_micro", [((2, 4, 1), 4), ((1, 8, 1), 2), ((2, 2, 2), 4)])
def test_each_microbatch_spans_every_batch_device(mesh_shape, num_micro):
    mesh = parallel.make_mesh(*mesh_shape)
    rules = parallel.ShardingRules()
    B, T = 32, 16
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    x = jax.device_put(np.random.default_rng(0).normal(size=(B, T)).astype(np.float32),
                       rules.sharding(mesh, ("batch", "length"), (B, T)))
    w = jnp.ones((T,), jnp.float32)
    seen = []

    def loss_fn(p, mb):
        jax.debug.inspect_array_sharding(mb["x"], callback=seen.append)
        return (jnp.tanh(mb["x"]) @ p).sum(), (jnp.float32(mb["x"].shape[0]), {"x_max": mb["x"].max()})

    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, b: sft.microbatch_sums(loss_fn, p, b, num_micro, rules))
        g, loss, n, sums = fn(w, {"x": x})
    rows = B // num_micro
    assert seen and all(s.shard_shape((rows, T)) == (rows // batch_devices, T) for s in seen), \
        [s.shard_shape((rows, T)) for s in seen]
    # the same sums as one pass over the whole batch
    want = jnp.tanh(jnp.asarray(np.asarray(x)))
    np.testing.assert_allclose(float(loss), float((want @ w).sum()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want.sum(0)), rtol=1e-5, atol=1e-5)
    assert float(n) == B and float(sums["x_max"]) == pytest.approx(float(np.asarray(x).max()))


def test_without_a_mesh_it_is_the_plain_reshape():
    x = jnp.arange(24.0).reshape(4, 6)
    assert sft.spread_microbatches(x.reshape(2, 2, 6), None) is not None
    np.testing.assert_array_equal(sft.spread_microbatches(x.reshape(2, 2, 6), None), x.reshape(2, 2, 6))


def test_the_train_steps_pass_their_rules_table(monkeypatch):
    """SFT's and GRPO's steps (DPO and RM call microbatch_sums the same way) hand their own rules table down, so
    a custom table's batch axes are the ones the microbatches spread over."""
    from test_dynamic_batching import CFG, _setup

    from jaxrl_llm import models
    from jaxrl_llm.algorithms import grpo
    from jaxrl_llm.optim import make_optimizer

    got = []
    real = sft.spread_microbatches
    monkeypatch.setattr(sft, "spread_microbatches", lambda micro, rules: got.append(rules) or real(micro, rules))
    mine = parallel.ShardingRules(parallel.DEFAULT_RULES)
    opt, _ = make_optimizer(1e-3, 10)
    params = models.init_params(CFG, jax.random.key(0))
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    B, T, K = 4, 8, 3
    z = lambda *s: np.zeros(s, np.int32)
    batch = {"input_ids": z(B, T), "attention_mask": z(B, T) + 1, "positions": z(B, T), "segment_ids": z(B, T) + 1,
             "target_index": z(B, K), "target_weight": np.ones((B, K), np.float32)}
    jax.eval_shape(sft.make_sft_step(CFG, opt, 2, mine), state, batch)
    assert got and all(r is mine for r in got)
    got.clear()
    config, gbatch, *_ = _setup(microbatches=2)
    gbatch["advantages"] = np.zeros(gbatch["input_ids"].shape, np.float32)
    gbatch["old_logprobs"] = gbatch["ref_logprobs"] = gbatch["advantages"]
    gbatch["positive"] = np.zeros(16, np.int32)
    jax.eval_shape(grpo.make_train_step(CFG, opt, config, mine), state, {k: gbatch[k] for k in grpo.BATCH_AXES},
                   jnp.bool_(True))
    assert got and all(r is mine for r in got)


def test_grpo_logprob_chunks_spread_too(monkeypatch):
    from test_dynamic_batching import CFG

    from jaxrl_llm import models
    from jaxrl_llm.algorithms import grpo

    got = []
    real = sft.spread_microbatches
    monkeypatch.setattr(grpo, "spread_microbatches", lambda micro, rules: got.append(rules) or real(micro, rules))
    mine = parallel.ShardingRules(parallel.DEFAULT_RULES)
    ids = np.zeros((8, 12), np.int32)
    out = jax.eval_shape(grpo.make_logprobs_fn(CFG, 1.0, 4, mine, first_target=5),
                         models.init_params(CFG, jax.random.key(0)), ids, ids + 1)
    assert out.shape == (8, 12) and len(got) == 2 and all(r is mine for r in got)
