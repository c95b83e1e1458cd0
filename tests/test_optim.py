"""`optim`: which parameters get weight decay, checked on every optional leaf of the parameter layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import models
from jaxrl_llm.optim import decay_mask, make_optimizer

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
