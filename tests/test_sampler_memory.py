"""Memory of the sampler, measured with XLA's memory_analysis (tiny shapes, CPU; compile only, nothing runs)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl_llm import models
from jaxrl_llm.models.params import param_specs, unflatten
from jaxrl_llm.sampling import loop
from jaxrl_llm.sampling.cache import cache_bytes

_CFG = models.ModelConfig(vocab_size=256, family="llama", hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
_PARAMS = unflatten({k: jax.ShapeDtypeStruct(s.shape, jnp.float32) for k, s in param_specs(_CFG).items()})
_WIDE = dataclasses.replace(_CFG, vocab_size=4096, num_layers=1)  # [B, T, V] logits stand out from the rest
_WIDE_PARAMS = unflatten({k: jax.ShapeDtypeStruct(s.shape, jnp.float32) for k, s in param_specs(_WIDE).items()})


def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _prefill_memory(U: int, R: int | None, P: int, N: int, cfg=_CFG, params=_PARAMS):
    rows = None if R is None else _i32(R)
    return loop.prefill.lower(cfg, params, _i32(U, P), _i32(U), cache_len=P + N, rows_R=rows
                              ).compile().memory_analysis()


def test_prefill_projects_only_the_last_position():
    """No [B, P, V] logits: the output is the cache and [B, V] logits, and the temporaries stay below one
    [B, P, V] fp32 array."""
    B, P, N, V = 8, 64, 64, _WIDE.vocab_size
    ma = _prefill_memory(B, None, P, N, _WIDE, _WIDE_PARAMS)
    assert ma.output_size_in_bytes - (cache_bytes(_WIDE, B, P + N) + B * V * 4) < 1024
    assert ma.temp_size_in_bytes < B * P * V * 4 / 4


def test_a_shared_prefill_holds_no_full_length_cache_of_the_distinct_prompts():
    """GRPO's groups (and pass@k's samples) prefill each distinct prompt once and copy its cache to its rows. The
    distinct prompts' cache needs only their P prompt slots; FAILS on 3e97f2d: it is built at full length P + N
    and gathered from, so a shared prefill of 2 prompts for 8 rows needs more temporaries than a full-length
    cache of the 2 prompts (SmolLM2-135M, 64 prompts x 4 samples, P=512, N=4096, bf16: 12.7 GiB of temporaries,
    0.9 GiB without that cache; prefilling all 256 rows takes 5.4 GiB)."""
    U, R, P, N = 2, 8, 16, 240
    shared = _prefill_memory(U, R, P, N)
    assert shared.output_size_in_bytes - (cache_bytes(_CFG, R, P + N) + R * _CFG.vocab_size * 4) < 1024
    assert shared.temp_size_in_bytes < cache_bytes(_CFG, U, P + N), (
        f"{shared.temp_size_in_bytes} bytes of temporaries; a full-length cache of the {U} prompts is "
        f"{cache_bytes(_CFG, U, P + N)}")


def test_decode_keeps_one_step_of_logits():
    """The decode loop keeps one step's logits, not [B, N, V] (tokens and log-probs are [B, N] outputs), and
    updates the donated cache in place."""
    from jaxrl_llm.sampling.strategies import RowSampler
    cfg, B, P, N = _WIDE, 4, 16, 256
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    inp = loop.DecodeInputs(start_B=_i32(B), sampler=RowSampler(temperature_B=f32(B), top_k_B=_i32(B),
                                                                top_p_B=f32(B)),
                            raw_logprobs_B=jax.ShapeDtypeStruct((B,), bool), stop_ids_BK=_i32(B, 8),
                            max_new_B=_i32(B), row_ids_B=_i32(B), rng=jax.eval_shape(lambda: jax.random.key(0)))
    shape = (cfg.num_layers, B, cfg.num_kv_heads, P + N, cfg.head_dim)
    cache = {n: jax.ShapeDtypeStruct(shape, cfg.dtype) for n in "kv"}
    ma = loop.decode.lower(cfg, _WIDE_PARAMS, cache, f32(B, cfg.vocab_size), inp, max_new_bucket=N
                           ).compile().memory_analysis()
    assert ma.alias_size_in_bytes == cache_bytes(cfg, B, P + N)
    assert ma.temp_size_in_bytes < B * N * cfg.vocab_size * 4 / 8, ma.temp_size_in_bytes


def test_the_cache_holds_new_tokens_in_rungs_of_256_past_256():
    """Decode reads every cache slot at each step: 1100 new tokens get 1280 slots, not 2048 (powers of two stay up
    to 256, so small requests keep their few shapes)."""
    import numpy as np

    from jaxrl_llm import sampling
    from jaxrl_llm.sampling.request import bucket_new_tokens

    assert [bucket_new_tokens(n) for n in (1, 16, 17, 200, 256, 257, 600, 1100, 4096)] == \
        [16, 16, 32, 256, 256, 512, 768, 1280, 4096]
    cfg = dataclasses.replace(_CFG, vocab_size=4)
    params = models.init_params(cfg, jax.random.key(0))
    sp = sampling.SamplingParams(max_new_tokens=600, temperature=0.0, stop_token_ids=(0, 1, 2, 3))  # stops at once
    out = sampling.generate(cfg, params, [np.array([1, 2, 3])], sp)
    assert out.stats["shapes"] == [(1, 16, 768)] and len(out.tokens[0]) == 1
