"""What a decode step reads and writes. With fp32 parameters and bf16 compute off a CPU the layer weights are cast
to bf16 once per decode call, not inside every step (the layer scan casts each layer's slice, which XLA cannot hoist
out of the loop: a step read 4 bytes a weight, plus a bf16 copy written and read again unless the cast fused into
the product, instead of 2): checked on the jaxpr of the decode loop (backend-independent). On a CPU a bf16 cache is
carried as its bits, so that XLA:CPU updates it in place. Both give the plain loop's completions bit for bit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models, sampling
from jaxrl_llm.sampling import budget, loop
from jaxrl_llm.sampling.strategies import RowSampler

# distinct widths, so that no activation has a weight's shape
CFG = models.ModelConfig(family="llama", vocab_size=97, hidden_size=40, intermediate_size=56, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=12, compute_dtype="bfloat16")
B, P, N = 4, 16, 16  # the shapes generate gives the 4 prompts below: the tests share compiles


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0), dtype="float32", std=0.3)


def _inputs(temperature: float) -> loop.DecodeInputs:
    f32 = lambda v: jnp.full((B,), v, jnp.float32)
    i32 = lambda v: jnp.full((B,), v, jnp.int32)
    return loop.DecodeInputs(start_B=jnp.array([13, 11, 15, 12], jnp.int32),
                             sampler=RowSampler(temperature_B=f32(temperature), top_k_B=i32(0), top_p_B=f32(1.0)),
                             raw_logprobs_B=jnp.zeros((B,), bool), stop_ids_BK=jnp.full((B, 8), -1, jnp.int32),
                             max_new_B=i32(N), row_ids_B=jnp.arange(B, dtype=jnp.int32), rng=jax.random.key(1))


def _in_loop_converts(jaxpr: jax.core.Jaxpr, inside: bool = False) -> list[tuple[tuple[int, ...], str, str]]:
    """(shape, from dtype, to dtype) of every convert_element_type inside a while loop's body (nested jaxprs too)."""
    out = []
    for eqn in jaxpr.eqns:
        if inside and eqn.primitive.name == "convert_element_type":
            a = eqn.invars[0].aval
            out.append((tuple(a.shape), str(a.dtype), str(eqn.params["new_dtype"])))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            out += _in_loop_converts(sub, inside or eqn.primitive.name == "while")
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_fp32_weights_are_cast_before_the_decode_loop(params, tied):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    p = models.init_params(cfg, jax.random.key(0), dtype="float32") if tied else params
    weight_shapes = {a.shape[1:] for a in jax.tree.leaves(p["layers"])} | {a.shape for a in jax.tree.leaves(p)}
    cache = sampling.init_cache(cfg, B, P + N)
    logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)

    def converts(cast: bool):
        jaxpr = jax.make_jaxpr(lambda *a: loop.decode(cfg, *a, max_new_bucket=N, cast_weights=cast))(
            p, cache, logits, _inputs(1.0))
        return [c for c in _in_loop_converts(jaxpr.jaxpr) if c[0] in weight_shapes and c[1] == "float32"]

    assert converts(False)  # the layer scan's per-step casts that the option removes
    assert converts(True) == []


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("flag", ["cast_weights", "cache_bits"])
def test_the_options_sample_what_the_plain_loop_samples(params, temperature, flag):
    """Each option gives the plain prefill's cache and logits and the plain loop's tokens and log-probs, bit for
    bit."""
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, size=(B, P)).astype(np.int32)
    inp = _inputs(temperature)
    out = {}
    for on in (False, True):
        pre = loop.prefill(CFG, params, jnp.asarray(ids), inp.start_B, cache_len=P + N,
                           cache_bits=on and flag == "cache_bits")
        *dec, cache = loop.decode(CFG, params, *jax.tree.map(jnp.copy, pre), inp, max_new_bucket=N, **{flag: on})
        out[on] = [np.asarray(x) for x in jax.tree.leaves((pre, dec, cache))]
    for got, want in zip(out[True], out[False], strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_bf16_cache_is_updated_in_place_on_a_cpu(params):
    """XLA:CPU updates a bf16 array through fp32: every layer of the layer scan converted the whole stacked cache to
    fp32 and back (per step, O(layers^2 x cache); SmolLM2's shapes at batch 64: 39 GB a step where the weights and
    cache are 0.8 GB). With the cache carried as its bits (`cache_bits`, generate's choice on a CPU) no fp32 array
    of the stacked cache's shape is left in the compiled loop."""
    cache = sampling.init_cache(CFG, B, P + N)
    full_f32 = "f32[" + ",".join(map(str, cache["k"].shape)) + "]"

    def hlo(bits: bool) -> str:
        return loop.decode.lower(CFG, params, cache, jnp.zeros((B, CFG.vocab_size)), _inputs(1.0), max_new_bucket=N,
                                 cache_bits=bits).compile().as_text()

    assert full_f32 in hlo(False)
    assert full_f32 not in hlo(True)


def test_generate_casts_off_a_cpu_and_reserves_the_copy(params, monkeypatch):
    """Off a CPU (the platform faked here) generate decodes with the cast weights: the same completions; the
    chunk budget holds their bf16 copy (half the fp32 layer weights and head)."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [3], [4, 5, 6, 7]]
    sp = sampling.SamplingParams(max_new_tokens=16, temperature=1.0)
    want = sampling.generate(CFG, params, prompts, sp, 0, unroll_layers=False)
    seen = []
    decode = loop.decode

    def spy(*a, **kw):
        seen.append(kw.get("cast_weights"))
        return decode(*a, **kw)

    monkeypatch.setattr(loop, "decode", spy)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    got = sampling.generate(CFG, params, prompts, sp, 0)
    assert seen == [True]
    assert got.tokens == want.tokens and got.logprobs == want.logprobs
    assert budget.cast_copy_bytes(CFG, params) == (budget.layout_copy_bytes(params) + params["final_norm"].nbytes) // 2
    assert budget.cast_copy_bytes(CFG, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)) == 0
