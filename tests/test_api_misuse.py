"""What a notebook gets for plausible misuse of the Python API: a clear error naming the bad thing, never a deep
traceback or a silently different result."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import losses, models, parallel, sampling

CFG = models.ModelConfig(family="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
SP = sampling.SamplingParams(max_new_tokens=3)


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0))


@pytest.mark.parametrize("change, bad_param", [
    ({"num_layers": 1}, "layers/attn_norm"),
    ({"num_kv_heads": 4}, "layers/wk"),
    ({"num_kv_heads": 1}, "layers/wk"),
    ({"vocab_size": 50}, "embed"),
    ({"num_heads": 8, "num_kv_heads": 4, "head_dim": 8}, "layers/wq"),
    ({"tie_word_embeddings": False}, "lm_head"),
])
def test_params_of_another_config_are_refused_everywhere(params, tmp_path, change, bad_param):
    """Params built for one config used with another ran as whatever model their arrays make in forward, and as
    another model again in the sampler (its cache sized from cfg): the two disagreed with no error."""
    other = dataclasses.replace(CFG, **change)
    ids = jnp.array([[1, 2, 3]])
    for call in (lambda: models.forward(other, params, ids),
                 lambda: jax.jit(models.forward, static_argnums=0)(other, params, ids),
                 lambda: sampling.generate(other, params, [[1, 2]], SP, 0),
                 lambda: models.save_pretrained(other, params, str(tmp_path / "out"))):
        with pytest.raises(ValueError, match=f"{bad_param}"):
            call()
    assert not (tmp_path / "out").exists()


def test_forward_token_ids_are_checked(params):
    expected = models.forward(CFG, params, jnp.array([[1, 2, 3]]))
    np.testing.assert_array_equal(models.forward(CFG, params, [[1, 2, 3]]), expected)  # a list is fine
    np.testing.assert_array_equal(models.forward(CFG, params, np.array([[1, 2, 3]])), expected)
    with pytest.raises(ValueError, match=r"input_ids: expected integer token ids of 2 axes \(\[batch, length\]\), "
                                         r"got shape \(3,\)"):
        models.forward(CFG, params, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="got shape .1, 3. of float32"):
        models.forward(CFG, params, jnp.array([[1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"token id 305 is outside the vocabulary \[0, 300\)"):
        models.forward(CFG, params, jnp.array([[1, 2, 305]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        models.forward(CFG, params, np.array([[1, -1]]))
    # ids closed over by a jitted function are concrete there, but their min/max are traced: no check, no error
    # (it raised ConcretizationTypeError)
    ids = jnp.array([[1, 2, 3]])
    np.testing.assert_allclose(jax.jit(lambda p: models.forward(CFG, p, ids))(params), expected, atol=1e-6)
    jax.jit(lambda p: jax.grad(lambda q: models.forward(CFG, q, ids).sum())(p))(params)


@pytest.mark.parametrize("rng", [0, np.int64(0), jnp.int32(0), np.array(0), None])
def test_integer_seeds_of_any_kind_are_seeds(params, rng):
    expected = sampling.generate(CFG, params, [[1, 2]], SP, jax.random.key(0)).tokens
    assert sampling.generate(CFG, params, [[1, 2]], SP, rng).tokens == expected


def test_other_rngs(params):
    a = models.init_params(CFG, 3)
    b = models.init_params(CFG, jax.random.key(3))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    sampling.generate(CFG, params, [[1, 2]], SP, jax.random.PRNGKey(1))  # a raw uint32[2] key
    default_impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:  # a raw key of another implementation: uint32[4]
        models.init_params(CFG, jax.random.PRNGKey(1))
    finally:
        jax.config.update("jax_default_prng_impl", default_impl)
    for bad in (0.5, jnp.float32(0.0), "seed", jnp.zeros(3, jnp.int32)):
        with pytest.raises(ValueError, match="rng: expected a PRNG key .* or an integer seed, got"):
            sampling.generate(CFG, params, [[1, 2]], SP, bad)
    with pytest.raises(ValueError, match=r"rng: expected one PRNG key, got a batch of shape \(2,\)"):
        sampling.generate(CFG, params, [[1, 2]], SP, jax.random.split(jax.random.key(0)))  # failed in fold_in


def test_params_on_devices_outside_the_mesh_name_the_fix(params):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = parallel.make_mesh(data=1, fsdp=-1, tensor=1)
    on_last = jax.device_put(params, jax.devices()[-1])  # committed to one device of the 8
    with pytest.raises(ValueError, match=r"params\['embed'\] lives on devices \[\d\], not on the mesh's .*"
                                         r"models.load_pretrained\(path, mesh=mesh\)"):
        sampling.generate(CFG, on_last, [[1, 2]], SP, 0, mesh=mesh)
    placed = jax.device_put(params, models.param_shardings(CFG, mesh))
    assert sampling.generate(CFG, placed, [[1, 2]], SP, 0, mesh=mesh).tokens == \
        sampling.generate(CFG, params, [[1, 2]], SP, 0).tokens
    # a separate sampling rules table reshards them to the mesh, wherever they were
    sampling.generate(CFG, on_last, [[1, 2]], SP, 0, mesh=mesh, sampling_rules=parallel.ShardingRules())


def test_pair_losses_refuse_arrays_of_other_shapes():
    z2, z1 = jnp.zeros(2), jnp.zeros(1)
    with pytest.raises(ValueError, match=r"arrays of one shape; got shapes .*'policy_rejected_logps': \(1,\)"):
        losses.dpo_loss(z2, z1, z2, z2)
    with pytest.raises(ValueError, match=r"'chosen_scores_P': \(2, 1\), 'rejected_scores_P': \(2,\)"):
        losses.bradley_terry_loss(jnp.zeros((2, 1)), jnp.zeros(2))
    c, r = jnp.array([[0.5], [-1.0]]), jnp.array([[0.0], [0.3]])  # score_sequences' [P, 1] with one label
    np.testing.assert_allclose(losses.bradley_terry_loss(c, r)[0], losses.bradley_terry_loss(c[:, 0], r[:, 0])[0])
    loss, _ = losses.dpo_loss([0.0, -1.0], [-2.0, -1.0], [0.0, 0.0], [0.0, 0.0], beta=1.0)
    expected = -np.mean(np.log(1 / (1 + np.exp(-np.array([2.0, 0.0])))))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
