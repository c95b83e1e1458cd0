"""Common input mistakes in `SamplingParams`, `generate` and `generate_text`: a clear ValueError naming the bad
input, and the reasonable forms (a single stop id, None, a jax array of prompts, per-prompt params) just work."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import word_tokenizer

from jaxrl_llm import models, sampling
from jaxrl_llm.sampling import text

SP = sampling.SamplingParams
CFG = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-6)
GREEDY = SP(max_new_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray((1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
                                    + 0.3 * rng.standard_normal(a.shape), jnp.float32), models.abstract_params(CFG))


# ------------------------------------------------------------------------------------------ stop ids


@pytest.mark.parametrize("given, expected", [
    (2, (2,)),                         # HF-style single eos id
    (np.int64(2), (2,)),
    (None, ()),                        # same as the default: no stop ids
    ([2, np.int32(5)], (2, 5)),
    (np.array([2, 5]), (2, 5)),
])
def test_stop_token_ids_forms(given, expected):
    sp = SP(stop_token_ids=given)
    assert sp.stop_token_ids == expected and all(type(t) is int for t in sp.stop_token_ids)
    assert sp == SP(stop_token_ids=expected)
    assert SP(stop_token_ids=None) == SP()


@pytest.mark.parametrize("given, match", [
    ("2", r"stop_token_ids='2': expected token ids"),
    (2.5, r"stop_token_ids=2.5: expected token ids"),
    (True, r"stop_token_ids=True: expected token ids"),
    ((2, None), r"stop_token_ids=\(2, None\): None is not an integer token id"),
    ([2.0], r"stop_token_ids=\(2.0,\): 2.0 is not an integer token id"),
])
def test_bad_stop_token_ids(given, match):
    with pytest.raises(ValueError, match=match):
        SP(stop_token_ids=given)


# ------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("prompts, match", [
    ([3, 4, 5], r"got a flat list of 3 ints; wrap a single prompt in a list"),
    (np.array([3, 4, 5]), r"got a 1-D array of shape \(3,\); wrap a single prompt in a list"),
    (jnp.array([3, 4, 5]), r"got a 1-D array of shape \(3,\); wrap a single prompt in a list"),
    (np.zeros((1, 2, 3), np.int32), r"or a 2-D array, got shape \(1, 2, 3\)"),
])
def test_flat_prompt_is_named(params, prompts, match):
    with pytest.raises(ValueError, match=match):
        sampling.generate(CFG, params, prompts, GREEDY, 0)


def test_jax_array_prompts_work_like_numpy(params):
    ids = [[3, 4, 5], [6, 7, 8]]
    ref = sampling.generate(CFG, params, np.array(ids), GREEDY, 0)
    out = sampling.generate(CFG, params, jnp.array(ids), GREEDY, 0)
    assert out.tokens == ref.tokens == sampling.generate(CFG, params, ids, GREEDY, 0).tokens
    assert len(out.tokens) == 2 and all(len(t) == 4 for t in out.tokens)


# ------------------------------------------------------------------------------------------ max_batch_size


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_bad_max_batch_size(params, bad):
    with pytest.raises(ValueError, match=f"max_batch_size={bad!r}: must be an integer >= 1"):
        sampling.generate(CFG, params, [[3], [4], [5]], GREEDY, 0, max_batch_size=bad)


def test_numpy_int_max_batch_size(params):
    ids = [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    out = sampling.generate(CFG, params, ids, GREEDY, 0, max_batch_size=np.int64(2))
    assert out.stats["chunks"] == 2
    assert out.tokens == sampling.generate(CFG, params, ids, GREEDY, 0).tokens


# ------------------------------------------------------------------------------------------ generate_text


def test_generate_text_per_prompt_params(params, monkeypatch):
    tok = word_tokenizer()
    inputs = ["w10 w11", "w12"]
    sps = [SP(max_new_tokens=3, temperature=0.0), SP(max_new_tokens=5, temperature=0.0, stop_token_ids=(7,))]
    passed = []

    def spy(cfg, params, prompt_ids, sp, *args, **kw):
        passed.append(sp)
        return sampling.generate(cfg, params, prompt_ids, sp, *args, **kw)

    monkeypatch.setattr(text, "generate", spy)
    out = sampling.generate_text(CFG, params, tok, inputs, sps, 0)
    # A row without stop ids gets the defaults (the tokenizer's eos; the config names none), as a single
    # SamplingParams does; a row with its own keeps them.
    assert [p.stop_token_ids for p in passed[0]] == [(2,), (7,)]
    ref = sampling.generate(CFG, params, out.prompt_ids, passed[0], 0)
    assert out.output.tokens == ref.tokens
    assert out.output.finish_reasons == ref.finish_reasons
    assert out.texts == [tok.decode(t, skip_special_tokens=True) for t in ref.tokens]
    # The same as each input with its own params (greedy, so the row's rng stream does not matter).
    for i, sp in enumerate(sps):
        one = sampling.generate_text(CFG, params, tok, [inputs[i]], sp, 0)
        assert one.output.tokens == [out.output.tokens[i]] and one.texts == [out.texts[i]]
    assert passed[1].stop_token_ids == (2,) and passed[2].stop_token_ids == (7,)
    with pytest.raises(ValueError, match="one per prompt"):
        sampling.generate_text(CFG, params, tok, inputs, sps[:1])


def test_a_message_without_role_names_the_input_and_message():
    """It surfaced as jinja's UndefinedError from inside the chat template."""
    from jaxrl_llm.sampling.text import encode_inputs

    tok = word_tokenizer()
    with pytest.raises(ValueError, match=r"input 1: message 0 needs a string 'role' and a 'content'"):
        encode_inputs(tok, ["w10", [{"content": "w11"}]])
    with pytest.raises(ValueError, match=r"input 0: message 1 needs"):
        encode_inputs(tok, [[{"role": "user", "content": "w1"}, "w2"]])
