"""Dependency drift: what the newest releases that `pip install -e .` picks deprecate, caught before it breaks."""

import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.algorithms.sft import apply_mean_grads


def test_apply_mean_grads_uses_no_deprecated_optax_api():
    # optax 0.2.8 warns at every call of optax.global_norm (deprecated for optax.tree.norm); the training steps
    # of SFT, DPO, RM and GRPO all report their grad norm through apply_mean_grads
    params = {"a": jnp.ones((2, 3)), "b": jnp.full((4,), 2.0)}
    opt = optax.sgd(0.1)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        new, gnorm = apply_mean_grads(opt, state, params, jnp.float32(2.0))
    assert float(gnorm) == pytest.approx(np.sqrt(6 * 0.25 + 4 * 1.0), rel=1e-6)
    np.testing.assert_allclose(np.asarray(new["params"]["b"]), 2.0 - 0.1 * 1.0, rtol=1e-6)
