"""Work GRPO's compiled loss step should not do (a static audit of the lowered programs, as test_rev33_flops): the
entropy metric's own passes of exp over [positions, vocabulary]; and a loss-variant pair NeMo RL refuses (GSPO with
seq-mask-tis)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm import models
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.algorithms.losses import token_logprob_stats, token_logprobs
from jaxrl_llm.algorithms.pg_losses import policy_gradient_loss

V = 512
CFG = models.ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8)


def _vocab_exps(hlo: str) -> int:
    """exp instructions over a [..., V] array in a compiled program (loop bodies counted once)."""
    return len(re.findall(rf"= f32\[[\d,]*,{V}\]\{{[^}}]*\}} exponential\(", hlo))


@pytest.mark.parametrize("chunk,exps", [(0, 1), (4, 2)])
def test_grpo_entropy_takes_no_exp_of_its_own(chunk, exps):
    """GRPO's loss with the entropy metric takes one exp over each position's vocabulary (two with model.logits_chunk:
    the backward pass recomputes a chunk). FAILS before the fix: jax.nn.log_softmax and exp(log p) for the entropy
    took two more passes over [positions, V] beside the log-probs' logsumexp (3 and 4)."""
    cfg = dataclasses.replace(CFG, logits_chunk=chunk)
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(p, ids):
        lp, _, ent = grpo._policy_logprobs(cfg, p, ids, jnp.ones_like(ids), 0.7, 0, 1.0, None, with_entropy=True,
                                           first_target=6)
        return lp.sum(), jax.lax.stop_gradient(ent).sum()

    hlo = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, ids).compile().as_text()
    assert _vocab_exps(hlo) == exps


def test_token_logprob_stats_values():
    """The log-probs are token_logprobs' (bit for bit), the entropy the float64 one's to fp32 rounding (as close as
    the log_softmax formula's), with no gradient; logits of large magnitude included."""
    x = jax.random.normal(jax.random.key(0), (3, 5, V)) * jnp.array([1.0, 8.0, 60.0])[:, None, None] + 30.0
    t = jax.random.randint(jax.random.key(1), (3, 5), 0, V)
    lp, ent = token_logprob_stats(x, t)
    np.testing.assert_array_equal(lp, token_logprobs(x, t))
    y = np.asarray(x, np.float64) - np.asarray(x, np.float64).max(-1, keepdims=True)
    logp = y - np.log(np.exp(y).sum(-1, keepdims=True))
    np.testing.assert_allclose(ent, -(np.exp(logp) * logp).sum(-1), rtol=1e-5, atol=5e-6)
    g = jax.grad(lambda x: token_logprob_stats(x, t)[1].sum())(x)
    assert not np.asarray(g).any()


def test_gspo_with_seq_mask_tis_is_refused():
    """seq-mask-tis keeps the raw weights of the sequences it does not mask; under GSPO each is the sequence's
    exp(sum of log-weights), untruncated (NeMo RL refuses the pair). FAILS before the fix: 2000 tokens 0.15% apart,
    a geometric mean inside [0.999, 1.002], gave the sequence weight e^3 = 20."""
    lp = jnp.full((1, 2000), -1.0)
    with pytest.raises(ValueError, match="seq-mask-tis"):
        policy_gradient_loss(lp, lp, None, jnp.ones(1), jnp.ones_like(lp), token_level=False,
                             sequence_level_ratio=True, sampler_logprobs=lp - 0.0015, tis_cap=1.002, tis_min=0.999,
                             tis_type="seq-mask-tis")
    c = recipe("grpo_tiny", {"grpo.token_level": False, "grpo.sequence_level_ratio": True,
                             "grpo.importance_correction": True, "grpo.recompute_old_logprobs": True,
                             "grpo.tis_cap": 1.002, "grpo.tis_min": 0.999, "grpo.tis_type": "seq-mask-tis"})
    with pytest.raises(ValueError, match="grpo.tis_type='seq-mask-tis'"):
        grpo.validate_config(c)
