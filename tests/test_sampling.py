"""The sampler: greedy parity with HF generate, log-probs vs a full forward, stop ids, compile counts, errors.

Most tests share one tiny Llama and one shape bucket (batch 4, prompt 16, 16 new tokens), so the file
compiles the sampler only a few times.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import build_hf_model, tiny_hf_config

from jaxrl_llm import models, sampling

PROMPT_LENGTHS = (5, 11, 3, 8)
NEW = 12
STOP = 2


def load_tiny(family: str, **extra):
    hf = build_hf_model(tiny_hf_config(family, **extra))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, params = models.load_pretrained(d)
    return hf, cfg, params


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 0, vocab: int = 97) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llama():
    return load_tiny("llama")


def hf_greedy(hf, prompts, max_new: int, stop: int | None) -> list[list[int]]:
    """HF generate(do_sample=False) with left padding; each row cut after its first stop id."""
    T = max(map(len, prompts))
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                          eos_token_id=stop, pad_token_id=0)
    rows = []
    for r in out[:, T:].tolist():
        rows.append(r[:r.index(stop) + 1] if stop is not None and stop in r else r)
    return rows


# ------------------------------------------------------------------------------------ greedy parity


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_hf_generate(family, llama):
    # mistral with a sliding window shorter than prompt + completion exercises the window in decode.
    hf, cfg, params = llama if family == "llama" else load_tiny(
        family, **({"sliding_window": 6} if family == "mistral" else {}))
    prompts = make_prompts()
    out = sampling.generate(cfg, params, prompts, sampling.SamplingParams(
        max_new_tokens=NEW, temperature=0.0, stop_token_ids=(STOP,)), jax.random.key(0))
    assert out.tokens == hf_greedy(hf, prompts, NEW, STOP)
    for toks, reason, lps in zip(out.tokens, out.finish_reasons, out.logprobs, strict=True):
        assert reason == ("stop" if toks[-1] == STOP else "length")
        assert lps == [0.0] * len(toks)  # greedy: a point mass


@pytest.mark.parametrize("rope_scaling", [{"rope_type": "linear", "factor": 2.0},
                                          {"rope_type": "dynamic", "factor": 2.0}])
def test_greedy_matches_hf_generate_with_rope_scaling(rope_scaling):
    """The decode loop's rotary tables (gathered from one table of every cache slot, or computed per step for
    dynamic NTK, which grows the base once a step's longest position passes max_position_embeddings = 16 here)."""
    hf, cfg, params = load_tiny("llama", max_position_embeddings=16, rope_scaling=rope_scaling)
    prompts = make_prompts((5, 11, 3, 8), seed=4)
    out = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0),
                            jax.random.key(0), max_prompt_len=16)
    assert out.tokens == hf_greedy(hf, prompts, NEW, None)


# ------------------------------------------------------------------------------ log-probs vs forward


ROW_PARAMS = [
    dict(temperature=0.7, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, top_k=5, top_p=0.9),
    dict(temperature=0.0),
]


def recompute_logprobs(cfg, params, prompts, tokens, sps, raw: bool) -> list[np.ndarray]:
    """Log-probs of the completions from one `models.forward` over prompt + completion (right padded)."""
    seqs = [p + t for p, t in zip(prompts, tokens, strict=True)]
    T = 32
    ids = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    logits_BTV = jax.jit(models.forward, static_argnums=0)(cfg, params, ids, mask)
    out = []
    for i, (p, t, sp) in enumerate(zip(prompts, tokens, sps, strict=True)):
        rows_NV = logits_BTV[i, len(p) - 1:len(p) - 1 + len(t)]
        n = len(t)
        if not raw:
            rows_NV = sampling.process_logits(rows_NV, jnp.full(n, sp.temperature), jnp.full(n, sp.top_k),
                                              jnp.full(n, sp.top_p))
        out.append(np.asarray(sampling.token_logprobs(rows_NV, jnp.asarray(t))))
    return out


@pytest.mark.parametrize("raw", [False, True])
def test_logprobs_match_full_forward(llama, raw):
    _, cfg, params = llama
    prompts = make_prompts(seed=1)
    sps = [sampling.SamplingParams(max_new_tokens=NEW, return_raw_logprobs=raw, **kw) for kw in ROW_PARAMS]
    out = sampling.generate(cfg, params, prompts, sps, jax.random.key(3))
    assert [len(t) for t in out.tokens] == [NEW] * 4
    want = recompute_logprobs(cfg, params, prompts, out.tokens, sps, raw)
    for got_row, want_row in zip(out.logprobs, want, strict=True):
        np.testing.assert_allclose(got_row, want_row, atol=1e-5, rtol=0)
    if not raw:
        assert out.logprobs[3] == [0.0] * NEW
        assert all(lp < 0 for lp in out.logprobs[1])
    # The same key gives the same samples whichever log-probs are asked for.
    again = sampling.generate(cfg, params, prompts, [sampling.SamplingParams(
        max_new_tokens=NEW, return_raw_logprobs=not raw, **kw) for kw in ROW_PARAMS], jax.random.key(3))
    assert again.tokens == out.tokens


def test_top_k_1_and_tiny_top_p_equal_greedy(llama):
    _, cfg, params = llama
    prompts = make_prompts(seed=2)
    greedy = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0))
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        out = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=NEW, temperature=1.5,
                                                                              **kw), jax.random.key(7))
        assert out.tokens == greedy.tokens
        np.testing.assert_allclose(np.concatenate(out.logprobs), 0.0, atol=1e-6)


def test_rng_reproducible_and_per_row(llama):
    _, cfg, params = llama
    prompts = [make_prompts(seed=4)[0]] * 4  # the same prompt on every row
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=1.0)
    a = sampling.generate(cfg, params, prompts, sp, jax.random.key(11))
    b = sampling.generate(cfg, params, prompts, sp, jax.random.key(11))
    c = sampling.generate(cfg, params, prompts, sp, jax.random.key(12))
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert len({tuple(t) for t in a.tokens}) > 1  # rows draw from their own streams
    assert a.tokens != c.tokens


def test_chunks_equal_one_batch(llama):
    _, cfg, params = llama
    prompts = make_prompts((5, 11, 3, 8), seed=5)
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=1.0, top_k=20, stop_token_ids=(STOP,))
    whole = sampling.generate(cfg, params, prompts, sp, jax.random.key(1))
    chunked = sampling.generate(cfg, params, prompts, sp, jax.random.key(1), max_batch_size=2)
    three = sampling.generate(cfg, params, prompts[:3], sp, jax.random.key(1), max_batch_size=2)
    assert chunked.stats["chunks"] == 2 and three.stats["chunks"] == 2
    assert {s[0] for s in chunked.stats["shapes"] + three.stats["shapes"]} == {2}  # the last chunk is padded
    assert three.tokens == whole.tokens[:3]
    assert chunked.tokens == whole.tokens and chunked.finish_reasons == whole.finish_reasons
    for x, y in zip(chunked.logprobs, whole.logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_a_long_generate_says_how_far_it_is(llama, monkeypatch, caplog):
    """A line per chunk once chunks take longer than the progress interval (30 s; 0 here): a large evaluation
    said nothing between its task count and its table."""
    import sys

    from jaxrl_llm.data import bulk

    _, cfg, params = llama
    module = sys.modules["jaxrl_llm.sampling.generate"]
    monkeypatch.setattr(module, "Progress", lambda n, what, verb: bulk.Progress(n, what, every_s=0.0, verb=verb))
    sp = sampling.SamplingParams(max_new_tokens=4)
    with caplog.at_level("INFO", logger="jaxrl_llm.data.bulk"):
        sampling.generate(cfg, params, make_prompts((5, 11, 3, 8, 6), seed=5), sp, jax.random.key(1), max_batch_size=2)
    lines = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert lines[:3] == [f"sampling: generated for {k} of 5 prompts" for k in (2, 4, 5)], lines
    assert len(lines) == 4 and lines[3].startswith("sampling: generated for 5 prompts in "), lines


def test_phase_timings_are_disjoint(llama, monkeypatch):
    """stats: prefill, decode-layout and decode seconds time disjoint parts of the call (the decode layout is not
    also counted as prefill), so their sum stays within the call's wall time and tokens_per_second is right."""
    import time

    from jaxrl_llm.sampling import loop

    _, cfg, params = llama
    real = loop.prepare_decode_params

    def slow_layout(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(loop, "prepare_decode_params", slow_layout)
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0)
    sampling.generate(cfg, params, make_prompts(), sp, 0, unroll_layers=True)  # compile first
    t0 = time.perf_counter()
    out = sampling.generate(cfg, params, make_prompts(), sp, 0, unroll_layers=True)
    wall = time.perf_counter() - t0
    s = out.stats
    assert s["decode_layout_seconds"] >= 0.3 and s["prefill_seconds"] < 0.3
    assert s["prefill_seconds"] + s["decode_layout_seconds"] + s["decode_seconds"] <= wall
    elapsed = s["prefill_seconds"] + s["decode_layout_seconds"] + s["decode_seconds"]
    assert s["tokens_per_second"] == pytest.approx(s["generated_tokens"] / elapsed)


def test_repeated_prompts_are_prefilled_once(llama):
    """GRPO groups and pass@k repeat prompts: each distinct prompt of a chunk is prefilled once and its cache copied
    to its rows; completions, log-probs and finish reasons equal prefilling every row, with per-row settings."""
    _, cfg, params = llama
    a, b, c = make_prompts((5, 11, 3), seed=6)
    prompts = [a, b, a, c, b, a, a, b, c]
    sps = [sampling.SamplingParams(max_new_tokens=NEW - i % 3, temperature=[1.0, 0.0, 0.7][i % 3],
                                   top_k=[0, 0, 5][i % 3], stop_token_ids=(STOP,)) for i in range(len(prompts))]
    shared = sampling.generate(cfg, params, prompts, sps, jax.random.key(3))
    every = sampling.generate(cfg, params, prompts, sps, jax.random.key(3), share_prefill=False)
    assert shared.stats["prefill_rows"] == 4 and every.stats["prefill_rows"] == 16  # 3 distinct -> bucket 4
    assert shared.tokens == every.tokens and shared.finish_reasons == every.finish_reasons
    for x, y in zip(shared.logprobs, every.logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert shared.tokens[0] != shared.tokens[2]  # repeated prompts still draw from their own streams
    # chunks of 4 rows, sorted by prompt length: c c a a | a a b b | b -> 2 + 2 + 1 distinct prompts prefilled
    chunked = sampling.generate(cfg, params, prompts, sps, jax.random.key(3), max_batch_size=4)
    assert chunked.tokens == every.tokens and chunked.stats["prefill_rows"] == 2 + 2 + 1
    distinct = sampling.generate(cfg, params, [a, b, c], sps[:3], jax.random.key(3))
    assert distinct.stats["prefill_rows"] == 4  # nothing to share: the usual batch


# -------------------------------------------------------------------------------- stop ids and limits


def test_stop_ids_and_max_new_tokens(llama):
    _, cfg, params = llama
    prompts = make_prompts(seed=6)
    free = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0))
    g = free.tokens
    assert all(len(t) == NEW for t in g) and free.finish_reasons == ["length"] * 4
    absent = next(t for t in range(3, 97) if all(t not in row for row in g))
    stops = [
        (g[0][3],),  # stops at the first occurrence of this id
        (absent, g[1][5], g[1][2]),  # several ids: the earliest hit wins
        (absent,),  # never hit: the length limit
        (g[3][0],),  # the very first token
    ]
    max_new = [NEW, NEW, 7, NEW]
    sps = [sampling.SamplingParams(max_new_tokens=m, temperature=0.0, stop_token_ids=s)
           for m, s in zip(max_new, stops, strict=True)]
    out = sampling.generate(cfg, params, prompts, sps)
    for row, (full, stop_ids, m) in enumerate(zip(g, stops, max_new, strict=True)):
        hits = [j for j, t in enumerate(full[:m]) if t in stop_ids]
        want = full[:hits[0] + 1] if hits else full[:m]
        assert out.tokens[row] == want
        assert out.finish_reasons[row] == ("stop" if hits else "length")
        assert len(out.logprobs[row]) == len(want)
    assert len(out.tokens[2]) == 7 and out.tokens[3] == [g[3][0]]
    # The loop ends as soon as the last row is done.
    assert out.stats["decode_steps"] == max(len(t) for t in out.tokens) < NEW
    early = sampling.generate(cfg, params, prompts, [dataclasses.replace(sps[3], stop_token_ids=(t[0],)) for t in g])
    assert early.stats["decode_steps"] == 1 and early.finish_reasons == ["stop"] * 4


def test_changing_request_values_never_recompiles(llama):
    _, cfg, params = llama
    prompts = make_prompts(seed=8)
    sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=NEW))  # warm
    before = sampling.compile_count()
    variants = [
        dict(temperature=0.3, top_p=0.5, stop_token_ids=(5,)),
        dict(temperature=2.0, top_k=3, stop_token_ids=(5, 6, 7)),
        dict(temperature=0.0, max_new_tokens=9),
        dict(temperature=1.0, top_k=50, top_p=0.95, stop_token_ids=(2,), return_raw_logprobs=True),
    ]
    for i, kw in enumerate(variants):
        kw = {"max_new_tokens": NEW, **kw}
        out = sampling.generate(cfg, params, prompts[: 3 + i % 2], sampling.SamplingParams(**kw), i)
        assert out.stats["compiles"] == 0
    assert sampling.compile_count() == before


# ------------------------------------------------------------------------------------ long prompts


def test_prompt_too_long_raises_or_truncates(llama, caplog):
    _, cfg, params = llama
    prompts = make_prompts((5, 14, 3, 8), seed=9)
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0)
    with pytest.raises(ValueError, match=r"prompt 1 has 14 tokens, more than the 10"):
        sampling.generate(cfg, params, prompts, sp, max_prompt_len=10)
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.sampling.generate"):
        out = sampling.generate(cfg, params, prompts, sp, max_prompt_len=10, truncate_prompts=True)
    assert out.stats["truncated_prompts"] == 1
    assert "truncated 1 prompt" in caplog.text
    ref = sampling.generate(cfg, params, [prompts[0], prompts[1][-10:], *prompts[2:]], sp)
    assert out.tokens == ref.tokens
    # The default limit is max_position_embeddings - max_new_tokens.
    with pytest.raises(ValueError, match="prompt 0 has 250 tokens, more than the 244"):
        sampling.generate(cfg, params, [[3] * 250], sp)


# -------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("prompts, match", [
    ([], "prompts is empty"),
    ([[3, 4], []], "prompt 1 is empty"),
    ([[3, 4], [5, 97, 6]], r"prompt 1: token id 97 at position 1 is outside the vocabulary \[0, 97\)"),
    ([[3, -1]], "prompt 0: token id -1"),
    (["hello"], "prompt 0 is a string"),
    ([[3.5, 2.0]], "prompt 0: token ids must be integers"),
    ("hello", "expected a list of token-id lists"),
])
def test_bad_prompts(llama, prompts, match):
    _, cfg, params = llama
    with pytest.raises(ValueError, match=match):
        sampling.generate(cfg, params, prompts, sampling.SamplingParams())


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(top_p=0.0), r"top_p=0.0: must lie in \(0, 1\]"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(temperature=float("nan")), "temperature=nan"),
    # a None (a recipe's placeholder) or a bool was a TypeError from math / a silent top_k of 1
    (dict(temperature=None), "temperature=None: must be >= 0"),
    (dict(top_p=None), r"top_p=None: must lie in \(0, 1\]"),
    (dict(top_k=True), "top_k=True: must be an integer"),
    (dict(top_k=2**31), "top_k=2147483648"),
    (dict(max_new_tokens=True), "max_new_tokens=True"),
])
def test_bad_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        sampling.SamplingParams(**kw)


def test_bad_call_options(llama):
    _, cfg, params = llama
    with pytest.raises(ValueError, match="stop token id 500 is outside the vocabulary"):
        sampling.generate(cfg, params, [[3]], sampling.SamplingParams(stop_token_ids=(500,)))
    with pytest.raises(ValueError, match="max_batch_size=0"):
        sampling.generate(cfg, params, [[3]], max_batch_size=0)
    with pytest.raises(ValueError, match="one per prompt"):
        sampling.generate(cfg, params, [[3], [4]], [sampling.SamplingParams()])
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        sampling.generate(cfg, params, [[3]], sampling.SamplingParams(max_new_tokens=256))


# ------------------------------------------------------------------------------------------ text layer


def word_tokenizer():
    """A 97-word tokenizer with a chat template, built locally (no hub)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "user", "assistant", "system"] + [f"w{i}" for i in range(6, 97)]
    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = WhitespaceSplit()
    template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}assistant {% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=template)


def test_generate_text(llama):
    _, cfg, params = llama
    tok = word_tokenizer()
    inputs = ["w10 w11 w12", [{"role": "system", "content": "w7"}, {"role": "user", "content": "w8 w9"}],
              "w40", "w50 w51 w52 w53 w54 w55"]
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0)
    out = sampling.generate_text(cfg, params, tok, inputs, sp, 0)
    assert out.prompt_ids[0] == [3, 10, 11, 12, 4] and out.prompt_ids[1] == [5, 7, 3, 8, 9, 4]
    ref = sampling.generate(cfg, params, out.prompt_ids, dataclasses.replace(sp, stop_token_ids=(STOP,)))
    assert out.output.tokens == ref.tokens
    assert out.texts == [tok.decode(t, skip_special_tokens=True) for t in ref.tokens]
    assert all(isinstance(t, str) for t in out.texts)
    plain = sampling.generate_text(cfg, params, tok, ["w10 w11 w12", "w13", "w14", "w15"], sp, 0,
                                   chat_template=False)
    assert plain.prompt_ids == [[10, 11, 12], [13], [14], [15]]
    with pytest.raises(ValueError, match="input 0 is a conversation"):
        sampling.generate_text(cfg, params, tok, [[{"role": "user", "content": "w8"}]], sp, chat_template=False)
