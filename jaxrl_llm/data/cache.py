"""Tokenized data kept in the workdir, so that a resumed run (a preempted job's next start) does not read and
tokenize its whole dataset again: minutes for a million rows, at every start.

`DataCache(folder).cached(kind, source, settings, tokenizer, compute)` returns compute()'s (rows, info), where
rows are each data row's sides as (ids, mask) (one side for SFT; chosen and rejected for a preference pair), from
`<workdir>/data_cache/<kind>-<key>.npz` when one was written for the same key, else computed (and written there
by `flush()`). The key is a SHA-256 over what the tokens depend on: the data file's bytes (or a datasets.Dataset's
fingerprint), the settings that reach tokenization (data.num_examples, the chat template and its variables,
the EOS added after learned turns and texts, data.last_assistant_only), the tokenizer's whole definition (vocabulary,
merges, normalizer, special tokens) and this format's version. What comes after tokenization (data.max_len,
data.overlong, packing, the validation split, shared prefixes) is not in it: it is redone from the cached
tokens. A builtin dataset name (small, from a package) and a tokenizer without a serialisable definition are
not cached. The file is read with allow_pickle=False (arrays and one JSON string, nothing that runs); one
that does not read, or holds another key, is ignored and written again. data.cache=False turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 3  # 2: replies after a newline tokenized after their prompt for tokenizers that prefix each text;
# 3: assistant messages with weight 0 out of the loss
Sides = list[tuple[np.ndarray, np.ndarray]]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    h = hashlib.sha256(backend.to_str().encode())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps([special, getattr(tokenizer, "chat_template", None)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def source_digest(source: Any) -> str | None:
    """What a data source holds, as a string that changes when any of it does: "file:<SHA-256 of its bytes>" or
    "dataset:<fingerprint>" (a datasets.Dataset); None for a builtin name."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str) and os.path.isfile(source):
        return "file:" + _file_digest(source)
    if hasattr(source, "_fingerprint") and hasattr(source, "num_rows"):
        return f"dataset:{source._fingerprint}"
    return None


def cache_key(kind: str, source: Any, settings: dict[str, Any], tokenizer: Any, digest: Callable[[Any], str | None]
              = source_digest) -> str | None:
    """The key of `kind`'s tokens of `source` under `settings` and `tokenizer`, or None when they are not cached."""
    data = digest(source)
    if data is None:
        return None
    tok = _tokenizer_digest(tokenizer)
    if tok is None:
        return None
    blob = json.dumps({"format": FORMAT, "kind": kind, "data": data, "settings": settings, "tokenizer": tok},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _path(cache_dir: str, kind: str, key: str) -> str:
    return os.path.join(cache_dir, f"{kind}-{key[:24]}.npz")


def load(cache_dir: str, kind: str, key: str) -> tuple[list[Sides], dict[str, Any]] | None:
    """The rows and info written for `key`, or None (none written, or a file that does not read as one)."""
    path = _path(cache_dir, kind, key)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key or meta.get("format") != FORMAT:
                return None
            ids, mask, lengths = z["ids"], z["mask"].astype(np.uint8, copy=False), z["lengths"]
            if ids.dtype not in (np.uint16, np.int32):
                ids = ids.astype(np.int32)  # (as written: the narrow ids `bulk.compact` keeps, one buffer for all)
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: tokenized again, and written again)
        log.warning("data: %s does not read (%s: %s); tokenizing again", path, type(e).__name__, e)
        return None
    per_row = meta["sides"]
    if lengths.ndim != 1 or len(lengths) % per_row or int(lengths.sum()) != len(ids) or len(ids) != len(mask):
        log.warning("data: %s is inconsistent; tokenizing again", path)
        return None
    cuts = np.cumsum(lengths)[:-1]
    sides = list(zip(np.split(ids, cuts), np.split(mask, cuts), strict=True))
    rows = [sides[i:i + per_row] for i in range(0, len(sides), per_row)]
    return rows, meta["info"]


def save(cache_dir: str, kind: str, key: str, rows: list[Sides], info: dict[str, Any]) -> str:
    """Write `rows` and `info` for `key` (atomically: a kill leaves no half file under the final name) and remove
    `kind`'s files of other keys (the data or settings changed: they would only take space). Returns the path."""
    os.makedirs(cache_dir, exist_ok=True)
    flat = [side for row in rows for side in row]
    ids = np.concatenate([s[0] for s in flat]) if flat else np.zeros(0, np.int32)
    narrow = np.uint16 if ids.size == 0 or (ids.min() >= 0 and ids.max() < 2**16) else np.int32
    meta = {"format": FORMAT, "key": key, "sides": len(rows[0]) if rows else 1, "info": info}
    path = _path(cache_dir, kind, key)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, ids=ids.astype(narrow), mask=np.concatenate([s[1] for s in flat]).astype(np.uint8) if flat
                 else np.zeros(0, np.uint8), lengths=np.array([len(s[0]) for s in flat], np.int64),
                 meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    for name in os.listdir(cache_dir):
        other = os.path.join(cache_dir, name)
        if name.startswith(f"{kind}-") and name.endswith(".npz") and other != path:
            os.remove(other)
    return path


class DataCache:
    """The tokenized rows of a run's datasets in `folder` (see the module doc). `cached(...)` reads at once; what it
    tokenizes is written by `flush()`, which the run calls once its workdir is its own (a run refused for another
    run's checkpoints writes nothing there). writer: whether this process writes (process 0 of a job; the others
    read what it wrote on an earlier start)."""

    def __init__(self, folder: str, writer: bool = True) -> None:
        self.folder, self.writer = folder, writer
        self._pending: list[tuple[str, str, list[Sides], dict[str, Any]]] = []
        self._digests: dict[tuple, str | None] = {}

    def source_digest(self, source: Any) -> str | None:
        """`source_digest`, each file read once per run (the cache key and the checkpoint's data digest both need
        it: a file of many GB is hashed once), again if it changed on disk since (size, mtime, inode)."""
        path = os.fspath(source) if isinstance(source, os.PathLike) else source
        if not (isinstance(path, str) and os.path.isfile(path)):
            return source_digest(source)
        st = os.stat(path)
        stamp = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if stamp not in self._digests:
            self._digests[stamp] = source_digest(path)
        return self._digests[stamp]

    def cached(self, kind: str, source: Any, settings: dict[str, Any], tokenizer: Any,
               compute: Callable[[], tuple[list[Sides], dict[str, Any]]]) -> tuple[list[Sides], dict[str, Any]]:
        """compute()'s (rows, info), from the folder when it holds them for this key."""
        key = cache_key(kind, source, settings, tokenizer, self.source_digest)
        if key is not None:
            hit = load(self.folder, kind, key)
            if hit is not None:
                log.info("data: %d rows as tokenized by an earlier start, from %s (data.cache=False: tokenize "
                         "again)", len(hit[0]), _path(self.folder, kind, key))
                return hit
        rows, info = compute()
        if key is not None and self.writer:
            self._pending.append((kind, key, rows, info))
        return rows, info

    def flush(self) -> None:
        """Write what `cached` tokenized; a folder that cannot be written costs only the next start's time."""
        for kind, key, rows, info in self._pending:
            try:
                path = save(self.folder, kind, key, rows, info)
            except OSError as e:
                log.warning("data: could not keep the tokenized rows in %s (%s); the next start tokenizes again",
                            self.folder, e)
            else:
                log.info("data: tokenized rows kept in %s for the next start", path)
        self._pending = []


def cached(cache: DataCache | None, enabled: bool, kind: str, source: Any, settings: dict[str, Any], tokenizer: Any,
           compute: Callable[[], tuple[list[Sides], dict[str, Any]]]) -> tuple[list[Sides], dict[str, Any]]:
    """`cache.cached(...)`, or compute() when there is no cache or `enabled` (data.cache) is False."""
    if cache is None or not enabled:
        return compute()
    return cache.cached(kind, source, settings, tokenizer, compute)
