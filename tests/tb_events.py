"""TensorBoard event files read for tests with the record format written out (8-byte length, its crc, an `Event`
proto, its crc), independently of any TensorBoard reader."""

from __future__ import annotations

import os
import struct


def read_events(path) -> list:
    """The Event protos of an event file, or of every event file in a folder (in name order)."""
    from tensorboardX.proto import event_pb2

    path = os.fspath(path)
    files = [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    out = []
    for name in files:
        data, i = open(name, "rb").read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return out
