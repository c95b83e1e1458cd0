"""Where generation ends by default: the end ids of config.json and generation_config.json and the tokenizer's
EOS, the same in `generate_text`, evaluation, GRPO rollouts and validation, as transformers' generate."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest
import torch
from hf_models import build_hf_model, tiny_hf_config

from jaxrl_llm import models, sampling
from jaxrl_llm.data.chat import DataError
from jaxrl_llm.rl_train import rollout_stop_ids

PROMPT = [5, 17, 33, 8, 61, 40, 12]


def _greedy(cfg, params, stops, n=12):
    out = sampling.generate(cfg, params, [PROMPT], sampling.SamplingParams(
        max_new_tokens=n, temperature=0.0, stop_token_ids=stops), jax.random.key(0))
    return [int(t) for t in out.tokens[0]], out.finish_reasons[0]


def test_generation_config_end_ids_stop_generation_as_in_transformers(tmp_path):
    """Instruct checkpoints list turn-end ids in generation_config.json (Qwen2.5: <|im_end|> and <|endoftext|>;
    Gemma: <end_of_turn>) that config.json does not: transformers' generate stops at them, and so do the
    default stop ids now. Before, the file was not read and generation ran on to max_new_tokens."""
    hf = build_hf_model(tiny_hf_config("llama"), seed=3)
    hf.save_pretrained(tmp_path)
    cfg, params = models.load_pretrained(str(tmp_path))
    free, _ = _greedy(cfg, params, ())
    x = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i] and t != 2)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, x]}))

    cfg, params = models.load_pretrained(str(tmp_path))
    assert cfg.eos_token_ids == (2, x)
    stops = sampling.default_stop_ids(cfg, None)
    tokens, reason = _greedy(cfg, params, stops)
    assert tokens == free[:free.index(x) + 1] and reason == "stop"
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                           do_sample=False, max_new_tokens=12)
    assert out[0, len(PROMPT):].tolist() == tokens
    # an export keeps them: config.json then lists every end id
    models.save_pretrained(cfg, params, str(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["eos_token_id"] == [2, x]


@pytest.mark.parametrize("text, why", [
    ("{", "Expecting property name"),
    ("\ufeff{}", "Unexpected UTF-8 BOM"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"eos_token_id": "2"}', "eos_token_id='2' is not a token id"),
    ('{"eos_token_id": -1}', "eos_token_id=-1 is not a token id"),
])
def test_unreadable_generation_config_is_left_out_with_a_warning(tmp_path, caplog, text, why):
    """As transformers treats it: the model loads, with config.json's end ids (it was refused)."""
    hf = build_hf_model(tiny_hf_config("llama"), seed=0)
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(text)
    with caplog.at_level("WARNING"):
        cfg, _ = models.load_pretrained(str(tmp_path))
    assert cfg.eos_token_ids == (2,)
    assert "generation_config.json: left out, its end ids not used as stop ids" in caplog.text and why in caplog.text


def test_absent_eos_takes_the_family_default():
    """transformers' Llama and Mistral configs assume bos 1 / eos 2 when config.json leaves them out; Qwen's none."""
    d = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)
    for family, want in (("llama", (1, (2,))), ("mistral", (1, (2,))), ("qwen2", (None, ())), ("qwen3", (None, ()))):
        cfg = models.config_from_hf({**d, "model_type": family})
        assert (cfg.bos_token_id, cfg.eos_token_ids) == want, family
    cfg = models.config_from_hf({**d, "model_type": "llama", "eos_token_id": None})  # explicit null: none
    assert cfg.eos_token_ids == ()


class _Tok:
    def __init__(self, eos):
        self.eos_token_id = eos


def test_grpo_rollouts_stop_where_evaluation_does():
    """GRPO rollouts and validation stopped only at rollout.stop_token_ids and the tokenizer's EOS, evaluation
    also at the model's end ids (Llama 3.1 Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>): the same
    checkpoint ended its samples at different tokens in training and in evaluation."""
    cfg = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(11, 12, 13))
    config = ml_collections.ConfigDict({"rollout": {"stop_token_ids": (40,)}})
    assert rollout_stop_ids(config, cfg, _Tok(13)) == (40, 11, 12, 13)
    assert rollout_stop_ids(config, cfg, _Tok(None)) == (40, 11, 12, 13)
    none = models.ModelConfig(**{**cfg.__dict__, "eos_token_ids": ()})
    assert rollout_stop_ids(config, none, _Tok(7)) == (40, 7)
    with pytest.raises(DataError, match="rollout.stop_token_ids is empty"):
        rollout_stop_ids(ml_collections.ConfigDict({"rollout": {"stop_token_ids": ()}}), none, _Tok(None))
    assert np.array_equal(sampling.default_stop_ids(cfg, _Tok(5)), (11, 12, 13, 5))
