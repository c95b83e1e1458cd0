"""Sampler behaviours that no other test pinned down (found by mutation testing of jaxrl_llm/sampling).

Each test names the wrong variant of the code that it rejects. The tiny Llama and its prompts come from
test_sampling.py, and most calls use its shape bucket (batch 4, prompt 16, 16 new tokens), so that little is
compiled anew.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_sampling import NEW, llama, make_prompts, recompute_logprobs  # noqa: F401 (llama: a fixture)

from jaxrl_llm import models, sampling

# ------------------------------------------------------------------------------------------- strategies


def _process(logits_V, temperature=1.0, top_k=0, top_p=1.0):
    x = jnp.asarray(np.asarray(logits_V, np.float32))[None]
    return np.asarray(sampling.process_logits(x, jnp.array([temperature], jnp.float32), jnp.array([top_k], jnp.int32),
                                              jnp.array([top_p], jnp.float32)))[0]


def test_top_p_stops_at_the_token_that_reaches_it():
    """The nucleus is the shortest prefix whose mass reaches top_p: a token whose preceding mass equals top_p
    exactly is left out, as in HF's TopPLogitsWarper. (Rejects `before < top_p` written as `<=`: one token
    too many at every exact boundary.) Probabilities 1/2, 1/4, 1/8, 1/8 are exact in fp32."""
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    for top_p, n_kept in ((0.5, 1), (0.75, 2), (0.7, 2)):  # (HF splits the tied 1/8s: ours keeps ties)
        got = _process(logits, top_p=top_p)
        assert np.isfinite(got).sum() == n_kept, (top_p, got)
        hf = transformers.TopPLogitsWarper(top_p)(None, torch.tensor(logits, dtype=torch.float32)[None])[0]
        assert np.isfinite(hf.numpy()).sum() == n_kept, (top_p, hf)


def test_top_p_one_filters_nothing_even_when_the_mass_rounds_to_one():
    """top_p = 1 is off: no token is removed even when the fp32 cumulative mass reaches 1.0 before the tail (a
    sort runs here because the other row asks for top-k). (Rejects `top_p < 1` written as `<= 1`, which
    drops every token after the mass rounds to 1.)"""
    logits = np.array([[0.0, -30.0, -31.0, -32.0, -33.0], [0.0, -30.0, -31.0, -32.0, -33.0]], np.float32)
    got = np.asarray(sampling.process_logits(jnp.asarray(logits), jnp.ones(2), jnp.array([0, 3]), jnp.ones(2)))
    assert np.isfinite(got[0]).all()
    assert np.isfinite(got[1]).sum() == 3  # top-k alone


def test_top_p_after_top_k_keeps_the_kth_token():
    """Top-p runs on the top-k-renormalised distribution, the k-th token included: with top_k=3 and a top_p the
    three tokens only reach together, all three stay. (Rejects leaving the k-th token out of the distribution
    top-p sees, which removed it.)"""
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    got = _process(logits, top_k=3, top_p=0.95)
    assert np.isfinite(got).sum() == 3, got
    hf = transformers.TopPLogitsWarper(0.95)(None, transformers.TopKLogitsWarper(3)(
        None, torch.tensor(logits, dtype=torch.float32)[None]))[0]
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(got)), torch.softmax(hf, -1).numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------- log-probs


def test_mixed_raw_and_processed_logprob_rows(llama):  # noqa: F811
    """Rows asking for raw log-probs next to rows asking for processed ones, in one batch: each row gets its
    own kind. (Rejects computing the raw log-softmax only when *every* active row wants it: the raw rows then
    got 0.0.)"""
    _, cfg, params = llama
    prompts = make_prompts(seed=1)
    kws = [dict(temperature=0.7, top_k=10), dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=5),
           dict(temperature=0.0)]
    raws = [True, False, True, False]
    sps = [sampling.SamplingParams(max_new_tokens=NEW, return_raw_logprobs=r, **kw)
           for kw, r in zip(kws, raws, strict=True)]
    out = sampling.generate(cfg, params, prompts, sps, jax.random.key(3))
    for i, raw in enumerate(raws):
        want = recompute_logprobs(cfg, params, [prompts[i]], [out.tokens[i]], [sps[i]], raw)[0]
        np.testing.assert_allclose(out.logprobs[i], want, atol=1e-5, rtol=0)
    assert all(lp < 0 for lp in out.logprobs[0])  # raw log-probs of a sampled row are never 0


def _zero_model():
    """A model whose logits are all 0 (every weight 0): each step samples uniformly, whatever the input."""
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    params = jax.tree.map(jnp.zeros_like, models.init_params(cfg, jax.random.key(0)))
    return cfg, params


def test_each_step_draws_fresh_noise():
    """Every decode step of a row samples with its own key (the row's stream folded with the step). On a
    uniform distribution, reusing one key for all the steps of a row repeats the same token at every step.
    (Rejects keys_B = row_keys_B.)"""
    cfg, params = _zero_model()
    out = sampling.generate(cfg, params, [[1, 2, 3]] * 2, sampling.SamplingParams(max_new_tokens=16), 0)
    assert [len(t) for t in out.tokens] == [16, 16]
    for row in out.tokens:
        assert len(set(row)) > 4, row  # 16 uniform draws over 64 ids
    assert out.tokens[0] != out.tokens[1]
    np.testing.assert_allclose(np.concatenate(out.logprobs), -np.log(64), rtol=1e-5)


# ------------------------------------------------------------------------------------- stops and limits


def test_a_stop_token_at_the_last_allowed_position_is_a_stop(llama):  # noqa: F811
    """A row whose stop id is its max_new_tokens-th token finished on the stop: 'stop', as vLLM and HF report
    it (a GRPO length penalty must not hit a completed answer). (Rejects letting the length limit win.)"""
    _, cfg, params = llama
    prompts = make_prompts(seed=6)
    free = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0))
    rows = [(r, m) for r, g in enumerate(free.tokens) for m in range(2, NEW + 1) if g[m - 1] not in g[:m - 1]]
    assert rows
    r, m = rows[0]
    sp = sampling.SamplingParams(max_new_tokens=m, temperature=0.0, stop_token_ids=(free.tokens[r][m - 1],))
    out = sampling.generate(cfg, params, [prompts[r]], sp)
    assert out.tokens[0] == free.tokens[r][:m]
    assert out.finish_reasons == ["stop"]


def test_each_row_gets_its_own_max_new_tokens_across_buckets(llama):  # noqa: F811
    """Rows of one chunk with max_new_tokens in different buckets: the decode bucket fits the largest, wherever
    that row is. (Rejects taking the new-token bucket from the chunk's first row.)"""
    _, cfg, params = llama
    prompts = make_prompts(seed=6)
    sps = [sampling.SamplingParams(max_new_tokens=m, temperature=0.0) for m in (3, 20, 5, 7)]
    out = sampling.generate(cfg, params, prompts, sps)
    assert [len(t) for t in out.tokens] == [3, 20, 5, 7]
    assert out.finish_reasons == ["length"] * 4
    assert out.stats["shapes"] == [(4, 16, 32)]


# -------------------------------------------------------------------------------------------- prompts


def test_a_prompt_exactly_at_the_limit_fits(llama, caplog):  # noqa: F811
    """A prompt of exactly max_prompt_len (or max_position_embeddings - max_new_tokens) tokens fits: it is not
    refused nor counted as truncated. Several truncated prompts are all counted. (Rejects `len > limit` written
    as `>=`, and a count of 1.)"""
    _, cfg, params = llama
    prompts = make_prompts((5, 10, 3, 8), seed=9)
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0)
    out = sampling.generate(cfg, params, prompts, sp, max_prompt_len=10)
    assert out.stats["truncated_prompts"] == 0
    out = sampling.generate(cfg, params, prompts, sp, max_prompt_len=10, truncate_prompts=True)
    assert out.stats["truncated_prompts"] == 0
    edge = cfg.max_position_embeddings - NEW
    sampling.generate(cfg, params, [[3] * edge], sp)  # no PromptLengthError
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.sampling.generate"):
        out = sampling.generate(cfg, params, make_prompts((12, 10, 14, 8), seed=9), sp, max_prompt_len=10,
                                truncate_prompts=True)
    assert out.stats["truncated_prompts"] == 2 and "truncated 2 prompt" in caplog.text


def test_a_stop_id_outside_the_vocabulary_is_refused(llama):  # noqa: F811
    """vocab_size itself is outside [0, vocab_size): a stop id that can never be sampled is an error, not a
    row that silently runs to its length limit. (Rejects `t <= vocab_size`.)"""
    _, cfg, params = llama
    with pytest.raises(ValueError, match=f"stop token id {cfg.vocab_size} is outside the vocabulary"):
        sampling.generate(cfg, params, [[3]], sampling.SamplingParams(stop_token_ids=(cfg.vocab_size,)))


def test_repeated_prompts_sharing_is_by_prompt_not_padded_row(llama):  # noqa: F811
    """[0, a, b] and [a, b] are different prompts although their left-padded rows are equal (padding is id 0):
    the shared prefill must not merge them. (Rejects keying the distinct prompts by the padded row.)"""
    _, cfg, params = llama
    prompts = [[0, 5, 6], [5, 6], [0, 5, 6], [5, 6]]
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=1.0)
    shared = sampling.generate(cfg, params, prompts, sp, 4)
    every = sampling.generate(cfg, params, prompts, sp, 4, share_prefill=False)
    assert shared.stats["prefill_rows"] == 2
    assert shared.tokens == every.tokens
    for x, y in zip(shared.logprobs, every.logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


# ------------------------------------------------------------------------------------ buckets and stats


def test_shape_buckets(llama):  # noqa: F811
    """Prompt and new-token lengths round up to powers of two from 16: lengths up to 16 share the (16, 16)
    bucket, 17 goes to 32. (Rejects over-rounding 16 to 32, and dropping the floor of 16.)"""
    _, cfg, params = llama
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0)
    assert sampling.generate(cfg, params, make_prompts(), sp).stats["shapes"] == [(4, 16, 16)]
    short = sampling.generate(cfg, params, [[3], [4, 5]], sampling.SamplingParams(max_new_tokens=1))
    assert short.stats["shapes"] == [(2, 16, 16)]
    long = sampling.generate(cfg, params, make_prompts((16, 3, 17, 2)), sampling.SamplingParams(max_new_tokens=16))
    assert long.stats["shapes"] == [(4, 32, 16)]


def test_max_batch_size_bounds_every_chunk(llama):  # noqa: F811
    """max_batch_size bounds the rows of every chunk (memory), also when it is not a power of two; the results
    equal one batch. (Rejects leaving the chunk at the power-of-two bucket, 4 rows for max_batch_size=3.)"""
    _, cfg, params = llama
    prompts = make_prompts((5, 11, 3, 8), seed=5) + make_prompts((4, 6), seed=6)
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0)
    out = sampling.generate(cfg, params, prompts, sp, max_batch_size=3)
    assert [s[0] for s in out.stats["shapes"]] == [3, 3]
    assert out.tokens == sampling.generate(cfg, params, prompts, sp).tokens


def test_new_shapes_are_counted_as_compiles():
    """stats['compiles'] counts the sampler's traces (GRPO logs it as sampler_compiles): a model never seen in
    this process compiles prefill and decode, a second call nothing. (Rejects a counter that is not
    incremented, which the existing 'never recompiles' test cannot see.)"""
    cfg = models.ModelConfig(family="llama", vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    params = models.init_params(cfg, jax.random.key(1))
    sp = sampling.SamplingParams(max_new_tokens=4, temperature=0.0)
    for unroll in (False, True):
        before = sampling.compile_counts()
        first = sampling.generate(cfg, params, [[1, 2, 3]], sp, 0, unroll_layers=unroll)
        after = sampling.compile_counts()
        assert after.get("prefill", 0) > before.get("prefill", 0) or unroll  # prefill is shared by both
        assert after.get("decode", 0) == before.get("decode", 0) + 1
        assert first.stats["compiles"] == sum(after.values()) - sum(before.values()) >= 1
        assert sampling.generate(cfg, params, [[4, 5]], sp, 0, unroll_layers=unroll).stats["compiles"] == 0
