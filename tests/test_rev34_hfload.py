"""HF folder loading against what transformers' own folders hold: a single file beside a stale shard index, an index
listing a tensor twice or naming a missing shard; end ids of generation_config.json outside the vocabulary; a
tokenizer pad id outside the model's vocabulary; a chat template kept in chat_template.json."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrl_llm import models, sampling

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig(family="llama", **SIZES)
    return cfg, models.init_params(cfg, jax.random.key(0), std=0.3)


def _sharded(cfg, params, folder) -> dict[str, str]:
    """`folder` as transformers saves it sharded: two shards and an index; returns the weight map."""
    models.save_pretrained(cfg, params, str(folder))
    tensors = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_single_file_beside_a_stale_index_is_loaded_as_transformers_loads_it(tiny, tmp_path, caplog):
    """transformers' save_pretrained of an unsharded model into a folder that held a sharded save removes the old
    shards and keeps the old index; transformers then loads model.safetensors. It was refused here (the index's
    first shard: file not found)."""
    cfg, params = tiny
    tensors = {}
    for f in sorted(set(_sharded(cfg, params, tmp_path).values())):
        tensors.update({k: v + 1 for k, v in load_file(str(tmp_path / f)).items()})  # the newer save's weights
        os.remove(tmp_path / f)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.models.hf_io"):
        _, got = models.load_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(got["embed"]), np.asarray(params["embed"]) + 1)
    assert "model.safetensors is loaded" in caplog.text and "0 of them present" in caplog.text


def test_index_naming_a_missing_shard_names_the_index_and_a_tensor(tiny, tmp_path):
    cfg, params = tiny
    weight_map = _sharded(cfg, params, tmp_path)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    first = next(k for k, f in weight_map.items() if f == "model-00002-of-00002.safetensors")
    with pytest.raises(models.CheckpointError, match=rf"index.json: lists tensor '{first}' in "
                                                     r"model-00002-of-00002.safetensors, which the folder lacks"):
        models.load_pretrained(str(tmp_path))


def test_index_listing_a_tensor_twice_is_refused(tiny, tmp_path):
    """json.load keeps the last of two entries silently: the stale shard's tensor was loaded when listed last."""
    cfg, params = tiny
    weight_map = _sharded(cfg, params, tmp_path)
    name, fname = next(iter(weight_map.items()))
    text = json.dumps({"weight_map": weight_map})
    text = text[:-2] + f', "{name}": "{fname}"' + "}}"
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(models.CheckpointError, match=f"not a valid safetensors index .*'{name}' appears twice"):
        models.load_pretrained(str(tmp_path))


def test_a_pad_token_past_the_models_rows_is_refused_before_training(tmp_path):
    """A tokenizer given a pad token of its own (`add_special_tokens({"pad_token": "<pad>"})`, the embedding not
    resized) passed the data check (no row holds the pad id) and stopped after the first step: 'loss is nan'."""
    from recipes import text_sft_recipe

    from jaxrl_llm import train
    from jaxrl_llm.data.chat import DataError

    c = text_sft_recipe(tmp_path)
    tok = models.load_tokenizer(c.tokenizer)
    vocab = len(tok)
    cfg = models.ModelConfig(family="qwen2", **{**SIZES, "vocab_size": vocab, "num_layers": 1})
    models.save_pretrained(cfg, models.init_params(cfg, jax.random.key(0)), str(tmp_path / "model"))
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(c.tokenizer)
    c.model.path = str(tmp_path / "model")
    with pytest.raises(DataError, match=rf"the tokenizer's pad token '<pad>' \(id {vocab}\) is outside the model's "
                                        rf"vocabulary of {vocab} \(the tokenizer has {vocab + 1} tokens\)"):
        train.run(c, str(tmp_path / "w"))


def test_end_ids_past_the_vocabulary_are_not_stop_ids(tiny, tmp_path, caplog):
    """generation_config.json's eos_token_id list (Llama 3's three ids) with an id past the embedding's rows:
    transformers' generate runs (it never samples it); generate_text, evaluation and GRPO rollouts refused every
    call ('stop token id 120 is outside the vocabulary', naming sampling params the user never gave)."""
    from jaxrl_llm.sampling.request import validate_stop_ids

    cfg, params = tiny
    models.save_pretrained(cfg, params, str(tmp_path), generation_config={"do_sample": True})
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 5, 120]}))
    cfg, _ = models.load_pretrained(str(tmp_path))
    assert cfg.eos_token_ids == (2, 5, 120)

    class Tok:
        eos_token_id = 130

    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.sampling.text"):
        stops = sampling.default_stop_ids(cfg, Tok())
    assert stops == (2, 5) and "eos id(s) [120, 130]" in caplog.text
    validate_stop_ids([sampling.SamplingParams(stop_token_ids=stops)], cfg.vocab_size)


def _word_tokenizer(folder, template: str):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "\n"]
    tk = Tokenizer(tm.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = template
    tok.save_pretrained(folder)
    return tok


def test_a_chat_template_kept_in_chat_template_json_is_read(tmp_path, caplog):
    """transformers 5 saves the template as chat_template.jinja (read); transformers 4.4x's processors kept it in
    chat_template.json, which its tokenizers never read: the run said 'has no chat template (a base model's?)'."""
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    _word_tokenizer(tmp_path, template)
    assert "chat_template.jinja" in os.listdir(tmp_path)  # where the installed transformers writes it
    assert models.load_tokenizer(str(tmp_path)).chat_template == template
    os.remove(tmp_path / "chat_template.jinja")
    assert models.load_tokenizer(str(tmp_path)).chat_template is None  # (no template: the run's error says so)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.models.gguf_io"):
        tok = models.load_tokenizer(str(tmp_path))
    assert tok.chat_template == template and "chat_template.json: the chat template" in caplog.text
    (tmp_path / "chat_template.json").write_text("[1]")
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.models.gguf_io"):
        assert models.load_tokenizer(str(tmp_path)).chat_template is None
    assert "chat_template.json: not read" in caplog.text


@pytest.mark.parametrize("drop", [("low_freq_factor",), ("low_freq_factor", "high_freq_factor")])
def test_llama3_rope_scaling_without_its_band_factors_is_refused(drop):
    """transformers refuses it (a KeyError naming the keys); it was read with Llama 3.1's 1 and 4 made up."""
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
    d = dict(architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=32, intermediate_size=48,
             num_hidden_layers=1, num_attention_heads=4, rope_scaling={k: v for k, v in rs.items() if k not in drop})
    with pytest.raises(models.UnsupportedModelError, match=rf"config.json: rope_scaling type 'llama3' needs "
                                                           rf"{' and '.join(drop)} > 0 \(got {drop[0]}=None"):
        models.config_from_hf(d)
    assert models.config_from_hf({**d, "rope_scaling": rs}).rope_scaling.low_freq_factor == 1.0


_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=32, intermediate_size=48,
              num_hidden_layers=1, num_attention_heads=4)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 500000.0},  # transformers: theta 10000 (rope_parameters left out)
    {"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0},  # transformers: factor 2
])
def test_rope_parameters_and_a_disagreeing_rope_scaling_are_refused(rope_parameters):
    """A transformers-5 config.json (rope_parameters) given a rope_scaling by hand, as model cards say to extend the
    context: transformers reads rope_scaling alone, this read rope_parameters' theta (or scaling): another model."""
    d = {**_LLAMA, "rope_parameters": rope_parameters, "rope_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(models.UnsupportedModelError, match="rope_parameters and rope_scaling are both set and "
                                                           "disagree: rope_theta="):
        models.config_from_hf(d)
    agree = {**d, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
    got = models.config_from_hf(agree)
    assert (got.rope_theta, got.rope_scaling.rope_type, got.rope_scaling.factor) == (10000.0, "linear", 2.0)
    assert models.config_from_hf({**d, "rope_scaling": None}).rope_theta == rope_parameters["rope_theta"]
