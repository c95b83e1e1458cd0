"""Malformed model files are one-line errors naming the file, never a silent wrong load or a huge allocation: a
safetensors header with a tensor name twice, overlapping tensors, dims whose product passes 2**63, JSON nested too
deep or a 5000-digit number; a config.json or index that is not UTF-8 JSON; a GGUF tensor at a misaligned offset or
overlapping another, dims whose product wraps; GGUF head_count 0; a config whose num_hidden_layers or
intermediate_size is far beyond its checkpoint's (named before a [layers, ...] buffer is allocated)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from jaxrl_llm import models
from jaxrl_llm.models.gguf_file import GGUFFile, GGUFTensor
from jaxrl_llm.models.gguf_io import gguf_config, open_gguf
from jaxrl_llm.models.hf_io import HFFolderSource, read_hf_config
from jaxrl_llm.models.safetensors_io import CheckpointError, SafetensorsFile


def _st(path, header: bytes, data: bytes = b"") -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def _entry(name: str, shape, offsets) -> str:
    return f'"{name}":{{"dtype":"F32","shape":{json.dumps(shape)},"data_offsets":{json.dumps(offsets)}}}'


@pytest.mark.parametrize("header, data, why", [
    ("{" + _entry("a", [1], [0, 4]) + "," + _entry("a", [1], [4, 8]) + "}", 8, "key 'a' appears twice"),
    ("{" + _entry("a", [2], [0, 8]) + "," + _entry("b", [2], [4, 12]) + "}", 12, "tensors 'a' and 'b' overlap"),
    ("{" + _entry("a", [2**32, 2**32], [0, 0]) + "}", 0, "needs 73786976294838206464 bytes, offsets span 0"),
    ("{" + _entry("a", [2**70], [0, 4]) + "}", 4, "header is inconsistent"),
    ('{"a":' + "[" * 100_000, 0, "RecursionError"),
    ('{"a":' + "9" * 5000 + "}", 0, "Exceeds the limit"),
], ids=["duplicate", "overlap", "dims-wrap", "dims-past-int64", "nested", "5000-digits"])
def test_a_malformed_safetensors_header_is_named(tmp_path, header, data, why):
    path = _st(tmp_path / "m.safetensors", header.encode(), b"\0" * data)
    with pytest.raises(CheckpointError, match=rf"^{path}: .*{why}"):
        SafetensorsFile(path)


def test_a_folder_named_model_safetensors_is_named(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read the safetensors file"):
        HFFolderSource(str(tmp_path))


@pytest.mark.parametrize("content", [json.dumps({"model_type": "llama"}).encode("utf-16"), b"[" * 100_000],
                         ids=["utf-16", "nested"])
def test_a_config_or_index_that_is_not_utf8_json_is_named(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        read_hf_config(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid safetensors index"):
        HFFolderSource(str(tmp_path))


def _gguf(path, tensors: list[tuple[str, tuple[int, ...], int]], data: bytes) -> str:
    """A little-endian GGUF v3 file of F32 tensors (name, dims innermost first, offset) and no metadata."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 0) + b"".join(
        s(n) + struct.pack("<I", len(d)) + b"".join(struct.pack("<Q", x) for x in d) + struct.pack("<IQ", 0, off)
        for n, d, off in tensors)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return str(path)


@pytest.mark.parametrize("tensors, why", [
    ([("t", (4,), 4)], "tensor 't' has offset 4, not a multiple of general.alignment=32"),
    ([("a", (16,), 0), ("b", (8,), 32)], "tensors 'a' and 'b' overlap"),
    ([("t", (2**32, 2**32), 0)], "tensor 't' runs past the end of the file"),
], ids=["misaligned", "overlap", "dims-wrap"])
def test_a_malformed_gguf_tensor_directory_is_named(tmp_path, tensors, why):
    path = _gguf(tmp_path / "m.gguf", tensors, np.arange(32, dtype=np.float32).tobytes())
    with pytest.raises(CheckpointError, match=rf"^{path}: not a readable GGUF file.*{why}"):
        open_gguf(path)
    assert len(open_gguf(_gguf(tmp_path / "ok.gguf", [("a", (8,), 0), ("b", (8,), 32)], bytes(128))).tensors) == 2


def test_gguf_head_count_zero_is_named():
    fields = {"general.architecture": "llama", "llama.embedding_length": 16, "llama.attention.head_count": 0,
              "llama.feed_forward_length": 32, "llama.block_count": 1}
    embed = GGUFTensor("token_embd.weight", None, (16, 32), np.zeros((32, 16), np.float32))
    with pytest.raises(models.UnsupportedModelError, match="P: num_attention_heads=0: must be a positive integer"):
        gguf_config(GGUFFile(fields, [embed]), "P")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = models.ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny") / "hf"
    models.save_pretrained(cfg, models.init_params(cfg, 0), str(d))
    return d


@pytest.mark.parametrize("key, value, why", [
    ("num_hidden_layers", 10**12, "missing tensor 'model.layers.1.input_layernorm.weight'"),
    ("intermediate_size", 10**12, r"'model.layers.0.mlp.gate_proj.weight' has shape \[32, 16\] in the checkpoint"),
], ids=["layers", "intermediate"])
def test_a_config_far_beyond_its_checkpoint_is_named_before_allocating(tiny_folder, tmp_path, key, value, why):
    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_folder.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=why):  # (was: a [10**12, ...] buffer of zeros allocated first)
        models.load_pretrained(str(d))
