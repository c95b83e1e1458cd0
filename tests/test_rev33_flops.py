"""Arithmetic the compiled train steps should not do (a static audit on the CPU: lowered and compiled programs, no
timing): the vocabulary head's backward products in fp32 under bf16 compute, DPO projecting prompt and padding
positions onto the vocabulary, a second top-k/top-p sort in GRPO's chunked backward pass, and chunks padded far
past the positions they project."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.algorithms.losses import target_logprobs
from jaxrl_llm.data import preference as pref
from jaxrl_llm.models.logit_chunks import over_positions

V = 4096
CFG = models.ModelConfig(family="llama", vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16)
_DOT = re.compile(r"stablehlo\.dot_general.*?:\s*\(tensor<(?:\d+x)*([a-z]\w*)>, tensor<(?:\d+x)*([a-z]\w*)>\)")


def _pairs(n: int, prompt: int, seed: int = 0, common: int = 0) -> list[pref.PreferencePair]:
    """Pairs of a long prompt (out of the loss) and short responses (in it) that start with `common` shared tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, c0 = rng.integers(3, V, prompt).astype(np.int32), rng.integers(3, V, common).astype(np.int32)
        sides = []
        for _side in range(2):
            r = np.r_[c0, rng.integers(3, V, int(rng.integers(3, 9))).astype(np.int32)]
            sides += [np.r_[p, r], np.r_[np.zeros(prompt, np.int32), np.ones(len(r), np.int32)]]
        out.append(pref.PreferencePair(*sides))
    return out


@pytest.mark.parametrize("tied,chunk", [(False, 0), (True, 0), (False, 8)])
def test_bf16_head_backward_runs_no_fp32_matmul(tied, chunk):
    """With bf16 compute every product of the loss's gradient takes bf16 operands. FAILS before the fix: the fp32
    cotangent of the fp32 logits promoted both backward products of the vocabulary head (its weight and input
    gradients, 2/3 of its FLOPs) to fp32 x fp32 matmuls on an fp32 copy of the head."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied, compute_dtype="bfloat16", logits_chunk=chunk)
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), dtype="bfloat16"))
    ids = jax.ShapeDtypeStruct((2, 24), jnp.int32)

    def loss(p, ids):
        return target_logprobs(cfg, p, models.hidden_states(cfg, p, ids)[:, :-1], ids[:, 1:]).sum()

    dots = _DOT.findall(jax.jit(jax.grad(loss)).lower(params, ids).as_text())
    assert dots and ("f32", "f32") not in dots, dots

def test_grpo_chunked_backward_does_not_sort_the_vocabulary_again():
    """GRPO's loss with the sampler's top-k/top-p filter and model.logits_chunk sorts each position's logits once.
    FAILS before the fix: a chunk's backward recomputation sorted them again (a [positions, V] sort, dearer than
    the head's matmul on a GPU); the threshold it needs is now kept from the forward pass (one float a position)."""
    cfg = dataclasses.replace(CFG, logits_chunk=4)
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(p, ids):
        return grpo._policy_logprobs(cfg, p, ids, jnp.ones_like(ids), 0.7, 5, 0.9, None, first_target=6)[0].sum()

    hlo = jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile().as_text()  # (the loss is reported)
    assert len(re.findall(r"= \S+ sort\(", hlo)) == 1


@pytest.mark.parametrize("K,chunk,size", [(9, 8, 5), (17, 8, 6), (16, 8, 8), (5, 8, 5)])
def test_chunks_are_balanced_not_padded_to_the_chunk_size(K, chunk, size):
    """over_positions runs ceil(K / chunk) chunks of equal size (<= chunk). FAILS before the fix: K = 9 positions in
    chunks of 8 projected 16 (the second chunk almost all padding), 1.8x the head's FLOPs."""
    seen = []

    def fn(h, t):
        seen.append(h.shape[1])
        return (h.sum(-1) * t,)

    h, t = jnp.ones((2, K, 3)), jnp.ones((2, K))
    out = over_positions(fn, chunk, h, t)[0]
    assert seen == [size] and out.shape == (2, K)
    np.testing.assert_allclose(out, 3.0)
