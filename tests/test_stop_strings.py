"""Stop strings: a row ends with the first token whose bytes complete one of its strings in the completion's text.

References: the completion's bytes searched with `bytes.find` (written out here), and transformers'
`generate(stop_strings=...)` for greedy parity."""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import build_hf_model, tiny_hf_config

from jaxrl_llm import models, parallel, sampling
from jaxrl_llm.sampling import stop_strings as ss

PIECES = (b"", b"a", b"b", b"ab", b"</", b"ans", b"wer", b">", b"r>", b"</answer>\n", b"x", b"</a", b"nswer>x",
          b"bbb", b"ba", b"\xe3\x80", b"\x82", b"\xe3\x80\x82")  # b"" a special token; the last three make "。"
STRINGS = ("</answer>", "bb", "aba", "。")


def _first_stop(pieces, seq, strings) -> int | None:
    """Index of the token with which the text first contains one of `strings` (the reference)."""
    for i in range(len(seq)):
        text = b"".join(pieces[t] for t in seq[:i + 1])
        if any(s.encode() in text for s in strings):
            return i
    return None


def test_table_finds_the_first_token_that_completes_a_string():
    """Strings across several tokens, inside one token, overlapping themselves ("aba"), split inside a UTF-8
    character, and through a special token (no text), for each row's own subset of strings."""
    table = jax.tree.map(jnp.asarray, ss.build_table(ss.TokenBytes(PIECES), STRINGS, len(PIECES), 4))
    hits = jax.jit(ss.hits)
    rng = np.random.default_rng(0)
    B, N = 256, 14
    seqs = rng.integers(0, len(PIECES), (B, N))
    use = rng.random((B, 4)) < 0.6
    got = np.full(B, -1)
    for step in range(N):
        h = np.asarray(hits(table, jnp.asarray(use), jnp.asarray(seqs, jnp.int32), jnp.int32(step)))
        got[(got < 0) & h] = step
    want = [_first_stop(PIECES, s, [t for t, u in zip(STRINGS, row, strict=True) if u]) for s, row in zip(seqs, use,
                                                                                                       strict=True)]
    assert got.tolist() == [-1 if w is None else w for w in want]
    assert (got >= 0).sum() > B // 3 and (got < 0).sum() > 10  # both kinds of rows occur


def test_token_bytes_decode_as_the_tokenizer_does(tokenizer):
    """SmolLM2's byte-level BPE: each token's bytes, joined, are `decode(skip_special_tokens=True)` (special and
    added special tokens have none)."""
    tb = sampling.token_bytes(tokenizer)
    assert len(tb.pieces) == len(tokenizer) and tb.pieces[tokenizer.eos_token_id] == b""
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, len(tokenizer), rng.integers(1, 20)).tolist()
        assert b"".join(tb.pieces[i] for i in ids).decode("utf-8", "replace") == \
            tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_token_bytes_of_a_sentencepiece_tokenizer():
    from test_chat_templates import _sentencepiece_tokenizer

    tok = _sentencepiece_tokenizer(legacy=False)
    tb = sampling.token_bytes(tok)
    ids = tok("Hello world, how are you today?", add_special_tokens=False)["input_ids"]
    assert b"".join(tb.pieces[i] for i in ids).decode() == " Hello world, how are you today?"


@pytest.fixture(scope="module")
def smol_vocab_model(tokenizer):
    """A tiny random Llama over SmolLM2's vocabulary (the tokenizer's ids are the model's)."""
    hf = build_hf_model(tiny_hf_config("llama", vocab=len(tokenizer), layers=1, hidden=48), scale=0.5)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, params = models.load_pretrained(d)
    return hf, cfg, params


def _prompts(tokenizer):
    texts = ["The answer is", "Question: what is 2+2?", "Hello", "Write a poem about the sea"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _ascii_strings(tokenizer, tokens: list[int]) -> list[str]:
    """Stop strings read off a completion: 4 bytes across each boundary of its generated tokens 1.. (so they never
    begin in the prompt), where those bytes are printable ASCII."""
    tb = sampling.token_bytes(tokenizer)
    out = []
    for k in range(1, len(tokens) - 1):
        a, b = tb.pieces[tokens[k]], tb.pieces[tokens[k + 1]]
        if len(a) >= 2 and len(b) >= 2:
            s = a[-2:] + b[:2]
            if all(32 < c < 127 for c in s):
                out.append(s.decode())
    return out


def test_greedy_with_stop_strings_equals_transformers(smol_vocab_model, tokenizer):
    hf, cfg, params = smol_vocab_model
    prompts = _prompts(tokenizer)
    free = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=24, temperature=0.0))
    checked = 0
    for p, toks in zip(prompts, free.tokens, strict=True):
        strings = _ascii_strings(tokenizer, toks)[:2]
        if not strings:
            continue
        sp = sampling.SamplingParams(max_new_tokens=24, temperature=0.0, stop_strings=tuple(strings))
        ours = sampling.generate(cfg, params, [p], sp, tokenizer=tokenizer)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=24, stop_strings=strings, tokenizer=tokenizer,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert ours.tokens[0] == ref, strings
        assert ours.finish_reasons == ["stop"] and len(ref) < 24
        checked += 1
    assert checked >= 3


def test_sampled_rows_end_at_their_first_stop_string(smol_vocab_model, tokenizer):
    """Temperature 1, each row its own strings (none, one, two): every row's tokens are the prefix of the same
    request without stop strings up to its first completed string, with the same log-probs (stopping changes
    neither the random stream nor the distribution); generate_text's completions end with the string."""
    _, cfg, params = smol_vocab_model
    tb = sampling.token_bytes(tokenizer)
    prompts = _prompts(tokenizer) * 2
    base = sampling.SamplingParams(max_new_tokens=32, temperature=1.0)
    free = sampling.generate(cfg, params, prompts, base, rng=3)
    per_row = [()] + [tuple(dict.fromkeys(c for c in b"".join(tb.pieces[t] for t in toks[1:]).decode(
        "utf-8", "ignore") if c.isalpha()))[:k] for toks, k in zip(free.tokens[1:], [1, 2, 1, 2, 1, 2, 1],
                                                                     strict=True)]
    sps = [dataclasses.replace(base, stop_strings=s) for s in per_row]
    out = sampling.generate(cfg, params, prompts, sps, rng=3, tokenizer=tb)
    stopped = 0
    for toks, lps, full, full_lps, strings, reason in zip(out.tokens, out.logprobs, free.tokens, free.logprobs,
                                                          per_row, out.finish_reasons, strict=True):
        cut = _first_stop(tb.pieces, full, strings) if strings else None
        want = full if cut is None else full[:cut + 1]
        assert toks == want and np.allclose(lps, full_lps[:len(want)], atol=1e-6)
        assert reason == ("stop" if cut is not None else "length")
        stopped += cut is not None
    assert stopped >= 5
    text = sampling.generate_text(cfg, params, tokenizer, ["Hello"], dataclasses.replace(base, stop_strings=sps[1]
                                  .stop_strings), rng=3, chat_template=False)
    assert text.output.finish_reasons == ["stop"] and sps[1].stop_strings[0] in text.texts[0][-4:]


def test_other_stop_strings_do_not_recompile_and_a_mesh_gives_the_same(smol_vocab_model, tokenizer):
    _, cfg, params = smol_vocab_model
    tb = sampling.token_bytes(tokenizer)
    prompts = _prompts(tokenizer)
    run = lambda strings, **kw: sampling.generate(
        cfg, kw.pop("p", params), prompts, sampling.SamplingParams(max_new_tokens=16, temperature=1.0,
                                                                   stop_strings=strings), rng=1, tokenizer=tb, **kw)
    first = run(("e", "a"))
    before = sampling.compile_count()
    again = run((" t", "o", "x"))
    assert sampling.compile_count() == before and again.stats["compiles"] == 0
    assert first.tokens != again.tokens
    if jax.device_count() >= 8:
        mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
        rules = parallel.ShardingRules()
        placed = jax.device_put(params, models.param_shardings(cfg, mesh, rules))
        sharded = run(("e", "a"), p=placed, mesh=mesh, rules=rules)
        assert sharded.tokens == first.tokens and sharded.finish_reasons == first.finish_reasons


@pytest.mark.parametrize("strings,match", [
    (("",), "not a non-empty string"),
    ((3,), "not a non-empty string"),
    (b"</a>", "expected a tuple of strings"),
    (("x" * 32,), "32 bytes in UTF-8; at most 31"),
])
def test_bad_stop_strings(strings, match):
    with pytest.raises(ValueError, match=match):
        sampling.SamplingParams(stop_strings=strings)


def test_stop_strings_need_the_tokenizer(smol_vocab_model):
    _, cfg, params = smol_vocab_model
    with pytest.raises(ValueError, match=r"stop_strings \['</a>'\]: matching them needs the tokenizer"):
        sampling.generate(cfg, params, [[5, 6]], sampling.SamplingParams(stop_strings="</a>"))
    assert sampling.SamplingParams(stop_strings="</a>").stop_strings == ("</a>",)


def test_recipes_take_stop_strings():
    """GRPO's rollout.stop_strings is checked with the recipe, and evaluation's sampling.stop_strings reaches the
    sampler's parameters."""
    import importlib.util

    from jaxrl_llm import evaluate
    from jaxrl_llm.algorithms import grpo

    def recipe(name):
        spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.get_config()

    c = recipe("grpo_tiny")
    c.rollout.stop_strings = ("</answer>", "")
    with pytest.raises(ValueError, match="rollout.stop_strings=.*'' is not a non-empty string"):
        grpo.validate_config(c)
    e = recipe("eval_tiny")
    e.sampling.stop_strings = ("</answer>",)
    assert evaluate.validate(e).stop_strings == ("</answer>",)


def test_grpo_rollouts_and_validation_stop_at_the_recipes_strings(tmp_path, monkeypatch):
    """rollout.stop_strings reaches the rollouts' and the validation's sampler: every completion that was stopped
    ends with the first token that completes "e" (most tokens of the random tiny policy hold one)."""
    from recipes import GRPO_ONE_STEP, recipe

    from jaxrl_llm import evaluation, rl_train, train

    seen = []
    real = sampling.generate

    def spy(cfg, params, prompts, sp, *a, **kw):
        out = real(cfg, params, prompts, sp, *a, **kw)
        seen.append((sp, kw.get("tokenizer"), out))
        return out

    monkeypatch.setattr(rl_train.sampling, "generate", spy)
    monkeypatch.setattr(evaluation, "generate", spy)
    c = recipe("grpo_tiny", {**GRPO_ONE_STEP, "checkpoint.every_steps": 0, "rollout.stop_strings": ("e",),
                             "rollout.max_new_tokens": 16, "val_every": 1, "eval.num_examples": 2})
    train.run(c, str(tmp_path / "run"))
    assert len(seen) == 2  # the step's rollouts, then validation
    assert all(isinstance(tok, sampling.TokenBytes) for _, tok, _ in seen)  # built once, not at each call
    tb = seen[0][1]
    stopped = 0
    for sp, _, out in seen:
        assert sp.stop_strings == ("e",)
        for toks, reason in zip(out.tokens, out.finish_reasons, strict=True):
            cut = _first_stop(tb.pieces, toks, ("e",))
            assert (reason, len(toks)) == (("stop", cut + 1) if cut is not None else (reason, len(toks)))
            stopped += cut is not None
    assert stopped >= 4


def test_a_special_tokens_text_as_a_stop_string_is_warned_about(tokenizer, caplog):
    """"<|im_end|>" is SmolLM2's special token 2: it decodes to nothing, so as a stop string it never matches that
    token (transformers' stop_strings would): the warning names the stop id to use."""
    tb = sampling.token_bytes(tokenizer)
    with caplog.at_level("WARNING", logger="jaxrl_llm.sampling.stop_strings"):
        tb.table(("</answer>",), len(tokenizer))
        assert not caplog.text
        tb.table(("<|im_end|>",), len(tokenizer))
    assert "special token 2 ('<|im_end|>')" in caplog.text and "stop_token_ids=(2,)" in caplog.text
