"""A resumed DPO (or GRPO with KL) run rebuilds its frozen reference from model.path: weights changed there since the
checkpoint (the previous stage's hf/ re-exported) would silently train against another reference. The checkpoint
records a checksum of the reference's bits; a different one is refused naming it (the runs: test_dpo_rm's
validation test, test_resume_checks' GRPO test)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import parallel, train
from jaxrl_llm.checkpoint import weights_checksum


def test_the_checksum_is_the_bits_whatever_the_layout():
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((4,)), jnp.bfloat16), "c": jnp.arange(5, dtype=jnp.int32)}
    base = weights_checksum(params)
    mesh = parallel.make_mesh(1, -1, 1)
    spread = {**params, "a": jax.device_put(params["a"], jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh.axis_names[1])))}
    assert weights_checksum(spread) == base and len(base) == 20
    nudged = {**params, "a": params["a"].at[3, 2].set(jnp.nextafter(params["a"][3, 2], jnp.inf))}
    assert weights_checksum(nudged) != base  # one bit of one weight


def test_a_changed_reference_is_named_on_resume():
    saved = {"reference": "aaaa", "batch_size": 4}
    with pytest.raises(train.ConfigError, match=r"the reference model's weights .*: 'aaaa' there, 'bbbb' now"):
        train.check_resume("wd", saved, {"reference": "bbbb", "batch_size": 4})
    train.check_resume("wd", {"batch_size": 4}, {"reference": "bbbb", "batch_size": 4})  # an older checkpoint
