"""Bad model input gives a clear error that names the bad thing; nothing half-written on export."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from hf_models import build_hf_model, tiny_hf_config

from jaxrl_llm import models
from jaxrl_llm.models.safetensors_io import SafetensorsFile, write_safetensors


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    build_hf_model(tiny_hf_config("llama")).save_pretrained(d)
    return d


def _copy(good, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(good, d)
    return d


def test_missing_folder_and_missing_config(good, tmp_path):
    with pytest.raises(models.CheckpointError, match="no such model folder"):
        models.load_pretrained(str(tmp_path / "nope"))
    d = _copy(good, tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(models.CheckpointError, match="missing config.json"):
        models.load_pretrained(str(d))


def test_unsupported_architecture_is_named_with_the_supported_list(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.UnsupportedModelError, match="GPT2LMHeadModel") as e:
        models.load_pretrained(str(d))
    assert "LlamaForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_wrong_shape_names_tensor_and_both_shapes(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.CheckpointError) as e:
        models.load_pretrained(str(d))
    msg = str(e.value)
    assert "mlp.gate_proj.weight" in msg and "[80, 48]" in msg and "[64, 48]" in msg


def test_missing_tensor_is_named(good, tmp_path):
    d = _copy(good, tmp_path)
    src = SafetensorsFile(str(good / "model.safetensors"))
    drop = "model.layers.1.self_attn.v_proj.weight"
    keep = [k for k in src.keys() if k != drop]
    write_safetensors(str(d / "model.safetensors"), [(k, src.shape(k), src.dtype(k)) for k in keep], src.get)
    with pytest.raises(models.CheckpointError, match=f"missing tensor '{drop}'"):
        models.load_pretrained(str(d))


def test_truncated_and_corrupted_safetensors(good, tmp_path):
    d = _copy(good, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(models.CheckpointError, match="truncated") as e:
        models.load_pretrained(str(d))
    assert "model.safetensors" in str(e.value)
    path.write_bytes(data[:4])
    with pytest.raises(models.CheckpointError, match="truncated"):
        models.load_pretrained(str(d))
    bad = bytearray(data)
    bad[8:20] = b"\xff" * 12  # garbage inside the JSON header
    path.write_bytes(bytes(bad))
    with pytest.raises(models.CheckpointError, match="corrupted"):
        models.load_pretrained(str(d))


def test_sharded_index_pointing_at_missing_file(good, tmp_path):
    d = _copy(good, tmp_path)
    os.remove(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(models.CheckpointError, match="model-00001-of-00002.safetensors"):
        models.load_pretrained(str(d))


def test_pickle_checkpoints_are_refused(good, tmp_path):
    d = _copy(good, tmp_path)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(models.CheckpointError, match="never loaded"):
        models.load_pretrained(str(d))


def test_unknown_dtype_string(good):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        models.load_pretrained(str(good), dtype="float8")
    with pytest.raises(ValueError, match="compute_dtype|unknown dtype"):
        models.ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=4, compute_dtype="half-ish")


def test_unsupported_rope_and_activation(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.UnsupportedModelError, match="yarn"):
        models.load_pretrained(str(d))
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg["hidden_act"] = "gelu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.UnsupportedModelError, match="gelu"):
        models.load_pretrained(str(d))


def test_export_with_wrong_params_writes_nothing(good, tmp_path):
    cfg, params = models.load_pretrained(str(good))
    del params["layers"]["w_up"]
    with pytest.raises(ValueError, match="w_up"):
        models.save_pretrained(cfg, params, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
    cfg, params = models.load_pretrained(str(good))
    params["final_norm"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError, match="final_norm"):
        models.save_pretrained(cfg, params, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update(num_attention_heads=0), "num_attention_heads=0: must be a positive integer"),
    (lambda d: d.update(num_key_value_heads=0), "num_key_value_heads=0: must be a positive integer"),
    (lambda d: d.update(num_hidden_layers=None), "num_hidden_layers=None: must be a positive integer"),
    (lambda d: d.update(head_dim=0), "head_dim=0: must be a positive integer"),
    (lambda d: d.update(vocab_size=-1), "vocab_size=-1: must be a positive integer"),
    (lambda d: d.update(rope_scaling="linear"), "rope_scaling='linear': must be an object"),
    (lambda d: d.update(rope_scaling={"rope_type": "linear"}), "rope_scaling type 'linear' needs a factor > 0"),
])
def test_malformed_config_values_name_the_key(good, tmp_path, edit, needle):
    """Each was a bare ZeroDivisionError / TypeError / AttributeError, or (head_dim 0, vocab -1) accepted."""
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.UnsupportedModelError, match=f"config.json: {needle}".replace("(", r"\(")):
        models.load_pretrained(str(d))
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(models.CheckpointError, match="config.json: a JSON list, not an object"):
        models.load_pretrained(str(d))


def test_null_kv_heads_means_one_per_query_head_as_in_transformers():
    from jaxrl_llm.models.config import config_from_hf

    base = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=64, hidden_size=32,
                intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    assert config_from_hf({**base, "num_key_value_heads": None}).num_kv_heads == 4  # was the family default, 32


@pytest.mark.parametrize("header", [
    [1, 2], "x", {"w": {"dtype": "F32", "shape": [2], "data_offsets": 8}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}},
    {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
])
def test_safetensors_headers_of_the_wrong_shape_name_the_file(tmp_path, header):
    """Valid JSON of the wrong structure raised bare TypeError / AttributeError / ValueError."""
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(models.CheckpointError, match="model.safetensors: corrupted"):
        SafetensorsFile(str(path))


def test_checkpoint_tensors_the_config_leaves_out_are_logged(good, tmp_path, caplog):
    """A q_proj.bias beside attention_bias=false was dropped without a word (transformers warns)."""
    d = _copy(good, tmp_path)
    src = SafetensorsFile(str(good / "model.safetensors"))
    names = src.keys()
    extra = "model.layers.0.self_attn.q_proj.bias"
    shape = (src.shape("model.layers.0.self_attn.q_proj.weight")[0],)
    write_safetensors(str(d / "model.safetensors"), [(k, src.shape(k), src.dtype(k)) for k in names]
                      + [(extra, shape, np.dtype(np.float32))],
                      lambda k: np.ones(shape, np.float32) if k == extra else src.get(k))
    with caplog.at_level("WARNING", logger="jaxrl_llm.models.hf_io"):
        models.load_pretrained(str(d))
    assert f"1 tensor(s) of the checkpoint are not used by this model's config and were left out: ['{extra}']" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxrl_llm.models.hf_io"):
        models.load_pretrained(str(good))
    assert "not used" not in caplog.text
