"""A small, strict safetensors reader/writer on numpy (bf16 via ml_dtypes), one tensor at a time.

Reading memory-maps the file and validates the header against the file size, so a truncated or corrupted
file is a clear error naming the file (and tensor) instead of garbage weights. Writing streams tensors in
header order, so exporting never holds more than one tensor in host memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024



def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object's pairs as a dict; a key given twice is an error (json.loads would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise ValueError(f"key {next(k for k, _ in pairs if k in seen or seen.add(k))!r} appears twice")
    return out


def _int_list(x) -> bool:
    """A list of non-negative ints (a safetensors shape or offsets pair)."""
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)

class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or does not match the model."""


class SafetensorsFile:
    """Lazy view of one .safetensors file: `keys()`, `shape(name)`, `get(name) -> np.ndarray`."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{path}: corrupted or truncated safetensors header (declares {n} header bytes, "
                        f"file has {size})")
                header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
        except CheckpointError:
            raise
        except (ValueError, RecursionError) as e:  # (JSON, UTF-8, a 5000-digit number, [[[[... nested too deep)
            raise CheckpointError(f"{path}: corrupted safetensors header: {type(e).__name__}: {e}") from e
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: file not found") from e
        except OSError as e:  # (a folder, no permission)
            raise CheckpointError(f"{path}: cannot read the safetensors file ({e.strerror or e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupted safetensors header (a JSON {type(header).__name__}, not an "
                                  "object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = header
        data_len = size - self._data_start
        for name, e in header.items():
            if (not isinstance(e, dict) or {"dtype", "shape", "data_offsets"} - set(e)
                    or not isinstance(e["dtype"], str) or not _int_list(e["shape"])
                    or not _int_list(e["data_offsets"]) or len(e["data_offsets"]) != 2):
                raise CheckpointError(f"{path}: corrupted header entry for tensor {name!r}")
            if e["dtype"] not in ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']!r}")
            start, end = e["data_offsets"]
            want = math.prod(e["shape"]) * ST_DTYPES[e["dtype"]].itemsize  # (exact: np.prod wraps at 2**63)
            if end - start != want or start < 0:
                raise CheckpointError(
                    f"{path}: tensor {name!r} header is inconsistent (shape {e['shape']} {e['dtype']} needs "
                    f"{want} bytes, offsets span {end - start})")
            if end > data_len:
                raise CheckpointError(
                    f"{path}: truncated file: tensor {name!r} ends at byte {self._data_start + end}, "
                    f"file has {size} bytes")
        spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items()
                       if e["data_offsets"][1] > e["data_offsets"][0])
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            if start < end:  # (two tensors reading the same bytes: a corrupted header, never written so)
                raise CheckpointError(f"{path}: corrupted safetensors header: tensors {a!r} and {b!r} overlap")
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return ST_DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file (no copy until used)."""
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self._entries[name]
        start, end = e["data_offsets"]
        buf = self._mm[self._data_start + start: self._data_start + end]
        return buf.view(ST_DTYPES[e["dtype"]]).reshape(e["shape"])


def write_safetensors(
    path: str,
    entries: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write `entries` (name, shape, dtype) to `path`, calling `produce(name)` for each tensor in turn.

    Returns the number of data bytes written. A produced array whose shape or dtype differs from its
    entry is an error (the header was already promised).
    """
    entries = list(entries)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype in entries:
        dt = np.dtype(dtype)
        if dt not in _NP_TO_ST:
            raise ValueError(f"cannot write tensor {name!r}: unsupported dtype {dt}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _NP_TO_ST[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, shape, dtype in entries:
            arr = np.ascontiguousarray(produce(name))
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r}: produced {arr.shape} {arr.dtype}, promised {shape} {dtype}")
            f.write(arr.tobytes())
    return offset
