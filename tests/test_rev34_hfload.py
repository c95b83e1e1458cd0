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

from jaxrl_llm import models

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
