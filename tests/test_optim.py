"""`optim`: which parameters get weight decay, checked on every optional leaf of the parameter layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import models
from jaxrl_llm.algorithms.sft import apply_mean_grads
from jaxrl_llm.optim import apply_updates, decay_mask, make_optimizer

CFG = models.ModelConfig(family="qwen2", vocab_size=32, hidden_size=8, intermediate_size=12, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=4, qkv_bias=True, o_bias=True, mlp_bias=True,
                         qk_norm=True, tie_word_embeddings=False, max_position_embeddings=16)
MATRICES = {"embed", "lm_head", "score", "layers/wq", "layers/wk", "layers/wv", "layers/wo", "layers/w_gate",
            "layers/w_up", "layers/w_down"}


def flat(tree: dict) -> dict:
    return {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_decay_only_on_matrices():
    for cfg in (CFG, models.ModelConfig(**{**CFG.__dict__, "num_labels": 1})):
        mask = flat(decay_mask(models.abstract_params(cfg)))
        assert {k for k, v in mask.items() if v} == MATRICES & set(mask)
        assert {"layers/bq", "layers/bk", "layers/bv", "layers/bo", "layers/b_gate", "layers/b_down", "final_norm",
                "layers/q_norm", "layers/attn_norm"} <= {k for k, v in mask.items() if not v}


def test_one_step_with_zero_gradients_decays_matrices_only():
    """AdamW with zero gradients moves a parameter only through weight decay: p -> p (1 - lr wd)."""
    params = jax.tree.map(lambda a: jnp.ones(a.shape, jnp.float32), models.abstract_params(CFG))
    opt, _ = make_optimizer(lr=0.5, max_steps=10, schedule="constant", weight_decay=0.1, grad_clip=0.0)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = flat(jax.tree.map(lambda p, u: p + u, params, updates))
    for name, p in new.items():
        np.testing.assert_allclose(np.asarray(p), 0.95 if name in MATRICES else 1.0, rtol=1e-6, err_msg=name)


def _train(dtype, steps: int = 50, lr: float = 1e-3):
    """`steps` AdamW updates of a constant gradient on weights starting at 1: each moves a weight by about lr,
    far less than half a bf16 step there (2^-8 below 1)."""
    opt, _ = make_optimizer(lr=lr, max_steps=steps, schedule="constant", grad_clip=0.0)
    params = {"w": jnp.ones((64, 64), dtype)}
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    step = jax.jit(lambda s: apply_mean_grads(opt, s, {"w": jnp.full((64, 64), 2.0, jnp.float32)},
                                              jnp.float32(2.0))[0])
    for _ in range(steps):
        state = step(state)
    return state


def test_bf16_parameters_take_updates_far_below_a_bf16_step():
    """fp32 AdamW state (a bf16 b2 of 0.999 is 1.0) and stochastic rounding of the sum: bf16 weights move by
    what fp32 weights move on average, where rounding to nearest would leave every one of them at 1."""
    ref, low = _train(jnp.float32), _train(jnp.bfloat16)
    assert low["params"]["w"].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(low["opt_state"]) if jnp.ndim(x) == 2)
    moved_ref = 1.0 - float(ref["params"]["w"].mean())
    moved = 1.0 - float(low["params"]["w"].astype(jnp.float32).mean())
    assert abs(moved_ref - 0.05) < 1e-3
    assert abs(moved - moved_ref) < 0.05 * moved_ref, (moved, moved_ref)


def test_stochastic_rounding_depends_on_the_step_only():
    p = {"w": jnp.full((256,), 1.0, jnp.bfloat16)}
    u = {"w": jnp.full((256,), -1e-3, jnp.float32)}
    a, b, c = (apply_updates(p, u, jnp.int32(s))["w"] for s in (3, 3, 4))
    assert (a == b).all() and not (a == c).all()
    vals = set(np.asarray(a.astype(jnp.float32)).tolist())
    assert vals <= {1.0, 1.0 - 2**-8}  # the two bf16 neighbours of 1 - 1e-3
    ref = apply_updates({"w": p["w"].astype(jnp.float32)}, u, jnp.int32(3))["w"]
    np.testing.assert_array_equal(ref, np.full((256,), 1.0 - 1e-3, np.float32))  # fp32: the plain sum
