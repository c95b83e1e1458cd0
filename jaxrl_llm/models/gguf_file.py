"""A GGUF file's metadata and tensor directory, read in one pass over the memory-mapped header.

`gguf.GGUFReader` builds a numpy view for every part of every metadata value: for a tokenizer's vocabulary and
merges (about 100k strings for SmolLM2) that took 3-5 s of each model or tokenizer load. Here a value is read
with `struct` straight from the mapped bytes (about 0.1 s); tensors stay numpy views of the mapped file, shaped
as GGUFReader shapes them (so `gguf.quants.dequantize` takes them). Files in the other byte order, or of a
version this reader does not know, are read with GGUFReader.

Format (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; each metadata entry a
string key (u64 length + UTF-8), a u32 value type and the value (an array: item type u32, count u64, items);
then per tensor its name, u32 dims count, u64 dims (innermost first), u32 ggml type and u64 offset into the data
section, which starts at the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """name; tensor_type (a `gguf.GGMLQuantizationType`); shape (dims innermost first, as in the file); data: a
    view of the mapped file (plain types: their values, numpy order; quantized: the blocks' bytes)."""

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """fields: metadata key -> Python value (str, int, float, bool, or a list of them); tensors in file order."""

    fields: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"a string of {n} bytes at offset {self.pos - 8} runs past the end of the file")
        text = str(self.buf[self.pos:end], "utf-8")
        self.pos = end
        return text

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _NUMPY:
            item = np.frombuffer(self.buf, _NUMPY[vtype], 1, self.pos)
            self.pos += item.nbytes
            return item[0].item()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype} at offset {self.pos - 4}")
        itype, count = self.unpack("<I"), self.unpack("<Q")
        if itype in _NUMPY:
            items = np.frombuffer(self.buf, _NUMPY[itype], count, self.pos)
            self.pos += items.nbytes
            return items.tolist()
        return [self.value(itype) for _ in range(count)]


def read_gguf(path: str) -> GGUFFile:
    """The metadata and tensors of a little-endian GGUF v2/v3 file (others: through `gguf.GGUFReader`).
    Raises ValueError/struct.error on a malformed file (the caller names it)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    mapped = np.memmap(path, mode="r")
    buf = memoryview(mapped)
    if bytes(buf[:4]) != _MAGIC:
        raise ValueError("GGUF magic invalid")
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        return _through_gguf_reader(path)
    n_tensors, n_fields = cur.unpack("<Q"), cur.unpack("<Q")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        if key in fields:
            raise ValueError(f"metadata key {key!r} appears twice")
        fields[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
        infos.append((name, dims, GGMLQuantizationType(cur.unpack("<I")), cur.unpack("<Q")))
    align = fields.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment={align!r}: must be a power of two")
    start = -(-cur.pos // align) * align
    tensors, names, spans = [], set(), []
    for name, dims, qtype, offset in infos:
        if name in names:
            raise ValueError(f"tensor {name!r} appears twice")
        names.add(name)
        if offset % align:  # (as llama.cpp refuses it)
            raise ValueError(f"tensor {name!r} has offset {offset}, not a multiple of general.alignment={align}")
        n = math.prod(dims)  # (exact: np.prod wraps at 2**63)
        np_dims = tuple(reversed(dims))
        if qtype.name in _PLAIN:
            dtype, count = np.dtype(_PLAIN[qtype.name]).newbyteorder("<"), n
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            dtype, count, np_dims = np.dtype(np.uint8), n * size // block, quant_shape_to_byte_shape(np_dims, qtype)
        at = start + offset
        if at + count * dtype.itemsize > len(mapped):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        tensors.append(GGUFTensor(name, qtype, dims, mapped[at:at + count * dtype.itemsize].view(dtype)
                                  .reshape(np_dims)))
        spans.append((offset, offset + count * dtype.itemsize, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:  # (two tensors reading the same bytes: a corrupted directory, never written so)
            raise ValueError(f"tensors {a!r} and {b!r} overlap in the data section")
    return GGUFFile(fields, tensors)


def _through_gguf_reader(path: str) -> GGUFFile:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [GGUFTensor(t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.data) for t in reader.tensors]
    return GGUFFile(fields, tensors)
