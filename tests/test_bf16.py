"""bf16 compute and bf16 storage: the sampler's log-probs stay the trainer's, and gradients summed over many tokens
are summed in fp32."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models, parallel, sampling
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.models.transformer import embed_tokens

BASE = models.ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5)


def test_bf16_sampler_logprobs_are_the_trainers():
    """On a CPU the sampler decoded with an unrolled layer loop, where XLA keeps some bf16 results in fp32 that the
    trainer's layer scan rounds: in bf16 compute the sampler's log-probs were up to 0.1 off the trainer's
    recomputation, and GRPO's importance ratios of later minibatches up to 10% off 1 for an unchanged policy.
    bf16 compute now decodes with the layer scan by default, whose log-probs are the trainer's."""
    cfg = dataclasses.replace(BASE, compute_dtype="bfloat16")
    params = models.init_params(cfg, jax.random.key(0), dtype="float32", std=0.5)
    rng = np.random.default_rng(0)
    P, N, G = 12, 16, 2
    prompts = [list(rng.integers(3, 512, size=int(rng.integers(4, P + 1)))) for _ in range(3) for _ in range(G)]
    out = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=N, temperature=1.0), 1)
    batch = grpo.build_batch(prompts, out.tokens, out.logprobs, P, N, 0)
    trainer = jax.jit(grpo.make_logprobs_fn(cfg, 1.0, 1, first_target=P, group=1))
    lp = np.asarray(trainer(params, batch["input_ids"], batch["attention_mask"]))
    m = batch["loss_mask"] > 0
    assert m.sum() > 40
    np.testing.assert_allclose(lp[m], batch["sampler_logprobs"][m], atol=1e-5)
    # the unrolled loop stays available on request (CPU speed in fp32); it rounds differently
    unrolled = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=N, temperature=1.0),
                                 1, unroll_layers=True)
    assert unrolled.tokens[0][:1] == out.tokens[0][:1]


@pytest.mark.parametrize("n", [300, 4096])
def test_bf16_embedding_gradient_sums_in_fp32(n):
    """A token that occurs n times: its row's gradient is the sum of n contributions. The lookup's gradient was a
    scatter-add in the table's dtype: a bf16 row stopped growing at 256 (4096 occurrences gave 256)."""
    ids = jnp.zeros((2, n // 2), jnp.int32)
    for dt in (jnp.float32, jnp.bfloat16):
        g = jax.grad(lambda e: jnp.sum(embed_tokens(e, ids, None).astype(jnp.float32)))(jnp.zeros((8, 4), dt))
        assert g.dtype == dt
        np.testing.assert_array_equal(np.asarray(g, np.float32)[0], float(n))
        np.testing.assert_array_equal(np.asarray(g, np.float32)[1:], 0.0)


def test_bf16_params_model_gradient_matches_fp32_on_a_mesh():
    """The whole model with bf16 parameters: the embedding gradient of a token repeated 2047 times is within bf16
    rounding of the fp32 one (it was 0.4x of it), the same on an (fsdp=4, tensor=2) mesh as on one device."""
    cfg = dataclasses.replace(BASE, vocab_size=64, num_layers=1, tie_word_embeddings=False)
    ids = jnp.asarray(np.r_[np.full(2047, 5), 7][None].astype(np.int32))

    def loss(p):
        return -jnp.mean(jax.nn.log_softmax(models.forward(cfg, p, ids), -1)[0, :, 9])

    p32 = models.init_params(cfg, jax.random.key(0), dtype="float32", std=0.05)
    ref = np.asarray(jax.grad(loss)(p32)["embed"][5], np.float64)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32)
    g16 = np.asarray(jax.grad(loss)(p16)["embed"][5], np.float64)
    assert np.linalg.norm(g16 - ref) / np.linalg.norm(ref) < 0.02
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = jax.device_put(p16, models.param_shardings(cfg, mesh))
    with jax.set_mesh(mesh):
        gs = jax.jit(jax.grad(loss))(sharded)["embed"]
    np.testing.assert_allclose(np.asarray(gs[5], np.float64), g16, rtol=0.02, atol=1e-6)


def test_bf16_lookup_takes_narrow_ids_and_forward_mode():
    """The fp32-summing lookup first overflowed on int16 ids of a vocabulary over 32767 (its scatter's index
    arithmetic in the ids' dtype) and refused forward-mode differentiation (a custom VJP); both work as with
    fp32 tables."""
    cfg = models.ModelConfig(family="llama", vocab_size=40000, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=2, num_kv_heads=2, head_dim=16)
    p16 = models.init_params(cfg, jax.random.key(0), dtype="bfloat16")
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p16)
    for dt in (np.int16, np.uint16):
        ids = jnp.asarray(np.array([[5, 7, 30000, 7]], dt))
        g16, g32 = (jax.grad(lambda p, ids=ids: models.forward(cfg, p, ids).sum())(p)["embed"] for p in (p16, p32))
        rows = [5, 7, 30000]
        np.testing.assert_allclose(np.asarray(g16, np.float32)[rows], np.asarray(g32)[rows], rtol=0.05, atol=0.05)
    ids = jnp.asarray([[5, 7, 5]])
    t = jax.tree.map(jnp.ones_like, p16)
    _, jvp16 = jax.jvp(lambda p: embed_tokens(p["embed"], ids, None).astype(jnp.float32), (p16,), (t,))
    np.testing.assert_array_equal(np.asarray(jvp16), 1.0)
