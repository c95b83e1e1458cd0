"""Review 32 (model folder zoo): HF folders as they come from the Hub or from other tools load as transformers
loads them, or are refused with one line naming the file and key: quantized checkpoints (never read as floats),
a tie_word_embeddings=true config beside a distinct lm_head.weight (untied, as transformers >= 5), tensor names
without the `model.` prefix and tied checkpoints that kept only lm_head.weight (safetensors' save_model), Mistral
configs with `layer_types` (built as Ministral by transformers) and Qwen's use_sliding_window; tokenizer folders
with no tokenizer in them, or one the installed `tokenizers` cannot read."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrl_llm import models
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.models.params import unflatten
from jaxrl_llm.run_tokenizer import load_tokenizer

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8)


def _export(tmp_path, tie: bool = False):
    cfg = models.ModelConfig(family="llama", tie_word_embeddings=tie, **SIZES)
    rng = np.random.default_rng(0)  # (init_params would compile for each config)
    params = unflatten({k: jnp.asarray(rng.normal(0, 0.3, spec.shape), jnp.float32)
                        for k, spec in models.param_specs(cfg).items()})
    models.save_pretrained(cfg, params, str(tmp_path))
    return cfg, params


def _same_params(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _edit(folder, tensors=None, config=None) -> None:
    if tensors is not None:
        t = tensors(load_file(str(folder / "model.safetensors")))
        save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        d = json.loads((folder / "config.json").read_text())
        config(d)
        (folder / "config.json").write_text(json.dumps(d))


def test_quantized_checkpoints_are_refused_not_read_as_floats(tmp_path):
    """int8 weights of the right shape (compressed-tensors W8A8) loaded as floats: a model of garbage, silently."""
    _export(tmp_path)

    def quantize(t):
        for k in [k for k in t if k.endswith("proj.weight")]:
            scale = np.abs(t[k]).max(axis=1, keepdims=True) / 127
            t[k], t[k[:-len("weight")] + "weight_scale"] = np.round(t[k] / scale).astype(np.int8), scale
        return t

    _edit(tmp_path, tensors=quantize)
    with pytest.raises(models.CheckpointError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' is int8 in "
                                                     r"the checkpoint, not floating point \(a quantized"):
        models.load_pretrained(str(tmp_path))
    _edit(tmp_path, config=lambda d: d.update(quantization_config={"quant_method": "compressed-tensors"}))
    with pytest.raises(models.UnsupportedModelError, match=r"config.json: quantization_config \(quant_method="
                                                           r"'compressed-tensors'\): quantized checkpoints"):
        models.load_pretrained(str(tmp_path))


def test_a_tied_config_beside_a_distinct_lm_head_loads_untied_as_transformers_does(tmp_path, caplog):
    """transformers >= 5 keeps both tensors (and warns): the logits are the untied model's, not those of the
    embedding used as the head (28 apart on the tiny models of the review)."""
    cfg, params = _export(tmp_path)  # untied: its own lm_head.weight
    _edit(tmp_path, config=lambda d: d.update(tie_word_embeddings=True))
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.models.hf_io"):
        got_cfg, got = models.load_pretrained(str(tmp_path))
    assert not got_cfg.tie_word_embeddings and "lm_head.weight differs from" in caplog.text
    _same_params(got, params)  # its own lm_head

    # an lm_head.weight that is a copy of the embedding: the same model tied, no warning
    caplog.clear()
    _edit(tmp_path, tensors=lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()})
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.models.hf_io"):
        assert models.load_pretrained(str(tmp_path))[0].tie_word_embeddings
    assert "differs" not in caplog.text


def test_names_without_the_model_prefix_and_a_tied_head_kept_as_lm_head_load(tmp_path):
    cfg, params = _export(tmp_path / "a")
    _edit(tmp_path / "a", tensors=lambda t: {k.removeprefix("model."): v for k, v in t.items()})
    _same_params(models.load_pretrained(str(tmp_path / "a"))[1], params)

    # safetensors.torch.save_model keeps a tied model's lm_head.weight and drops model.embed_tokens.weight
    cfg, params = _export(tmp_path / "b", tie=True)
    _edit(tmp_path / "b", tensors=lambda t: {("lm_head.weight" if k == "model.embed_tokens.weight" else k): v
                                             for k, v in t.items()})
    _same_params(models.load_pretrained(str(tmp_path / "b"))[1], params)


_BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("family,extra,window", [
    ("mistral", dict(sliding_window=8, layer_types=["full_attention", "full_attention"]), None),
    ("mistral", dict(sliding_window=8, layer_types=["sliding_attention", "sliding_attention"]), 8),
    ("mistral", dict(sliding_window=64, layer_types=["full_attention", "sliding_attention"]), None),  # never binds
    ("mistral", dict(sliding_window=8), 8),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), None),  # no layer slides
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, layer_types=["full_attention"] * 2), None),
    ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=0), None),  # never binds
    ("qwen2", dict(use_sliding_window=False, sliding_window=8, max_window_layers=0), None),
])
def test_sliding_windows_are_read_per_layer_as_transformers_builds_them(family, extra, window):
    """A Mistral config with layer_types is built by transformers as Ministral (each layer as its type says): read
    as a window on every layer before, a model that transformers does not run."""
    assert models.config_from_hf({**_BASE, "model_type": family, **extra}).sliding_window == window


@pytest.mark.parametrize("family,extra,match", [
    ("mistral", dict(sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
     r"config.json: layer_types mixes sliding_attention \(sliding_window=8\) and full_attention layers"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
     r"config.json: use_sliding_window=true \(sliding_window=8 on 1 of 2 layers\) is not supported for qwen2"),
    ("mistral", dict(sliding_window=8, layer_types=["full_attention"]), r"layer_types=\['full_attention'\]: "
                                                                         "expected 2 entries"),
    ("qwen2", dict(num_attention_heads=6, hidden_size=48, num_key_value_heads=4),
     r"config.json: num_attention_heads=6 is not a multiple of num_key_value_heads=4$"),
])
def test_configs_we_cannot_build_are_refused_naming_the_file_and_key(family, extra, match):
    with pytest.raises(models.UnsupportedModelError, match=match):
        models.config_from_hf({**_BASE, "model_type": family, **extra})


def test_an_absent_key_whose_default_does_not_fit_is_named_as_absent():
    d = {k: v for k, v in _BASE.items() if k != "num_key_value_heads"} | {"num_attention_heads": 6,
                                                                          "hidden_size": 48}
    with pytest.raises(models.UnsupportedModelError, match=r"config.json: num_attention_heads=6 is not a multiple "
                                                           r"of num_key_value_heads=32 \(num_key_value_heads absent"):
        models.config_from_hf({**d, "model_type": "qwen2"})


def test_a_tokenizer_folder_without_a_tokenizer_or_unreadable_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ConfigError, match=r"the folder holds no tokenizer \(none of tokenizer.json, tokenizer.model"
                                          r".*found \['config.json', 'tokenizer_config.json'\]"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ConfigError, match="no such folder or .gguf file"):
        load_tokenizer(str(tmp_path / "missing"))
    # valid JSON that the installed tokenizers cannot read (a newer tokenizers wrote it): a plain Exception before
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    doc = json.loads(Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).to_str())
    doc["model"]["type"] = "FutureModel"
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="its tokenizer.json could not be read by tokenizers .*upgrade tokenizers"):
        load_tokenizer(str(tmp_path))
