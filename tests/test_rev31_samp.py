"""Review 31 (sampler as a notebook / evaluation user calls it): numpy budgets, truncated prompts in
generate_text's output, a single conversation passed where a list of them is expected."""

from __future__ import annotations

import numpy as np
import pytest
from test_sampling import load_tiny, word_tokenizer

from jaxrl_llm import sampling


@pytest.fixture(scope="module")
def llama():
    return load_tiny("llama")


def test_numpy_budgets_sample_as_python_ints(llama):
    """max_new_tokens read from a numpy array (per-row budgets) was accepted by SamplingParams, then generate
    failed with AttributeError: 'numpy.int64' object has no attribute 'bit_length' (the shape buckets)."""
    _, cfg, params = llama
    budgets = np.array([16, 5])
    sps = [sampling.SamplingParams(max_new_tokens=m, temperature=np.float32(0.0), top_k=np.int64(0),
                                   top_p=np.float64(1.0)) for m in budgets]
    assert type(sps[0].max_new_tokens) is int and type(sps[0].temperature) is float
    out = sampling.generate(cfg, params, [[3, 4], [5]], sps)
    assert [len(t) for t in out.tokens] == [16, 5]


def test_generate_text_reports_the_truncated_prompt(llama):
    """With truncate_prompts, prompt_ids are the tokens the completion was generated from (vLLM's
    prompt_token_ids), not the whole prompt: prompt_ids + tokens is the sequence the sampler saw."""
    _, cfg, params = llama
    tok = word_tokenizer()
    sp = sampling.SamplingParams(max_new_tokens=4, temperature=0.0)
    long = " ".join(f"w{10 + i % 80}" for i in range(20))
    out = sampling.generate_text(cfg, params, tok, [long, "w40"], sp, 0, chat_template=False,
                                 max_prompt_len=8, truncate_prompts=True)
    full = tok(long)["input_ids"]
    assert out.output.stats["truncated_prompts"] == 1
    assert out.prompt_ids == [full[-8:], [40]] and out.output.prompt_lengths == [8, 1]
    cut = sampling.generate(cfg, params, [full[-8:], [40]], sp, 0)
    assert out.output.tokens == cut.tokens


def test_a_single_conversation_says_to_wrap_it(llama):
    _, cfg, params = llama
    with pytest.raises(ValueError, match=r"input 0 is a message .*wrap one conversation in a list"):
        sampling.generate_text(cfg, params, word_tokenizer(), [{"role": "user", "content": "w8"}])
