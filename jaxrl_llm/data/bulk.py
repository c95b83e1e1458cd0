"""Tokenizing a whole dataset: in chunks of rows, one tokenizer call per chunk, saying how far it is.

Tokenizing a large dataset takes minutes (thousands of chat rows/s per process), before the first step and again
at every resume; a run that prints nothing for that long looks hung. `tokenize_rows` renders each row's chat
template pieces and encodes a chunk's pieces in one call (a fast tokenizer encodes a batch on all cores);
`Progress` logs how far it is, at most once per `every_s` seconds; `from_source` puts the data file's name in
front of a row's error, which is found before any tokenizing starts (the rows' fields are checked first)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jaxrl_llm.data.chat import DataError, Pieces, pieces_tokenize_alone, tokenize_pieces

log = logging.getLogger(__name__)


class Progress:
    """`tick(done)` after each item: every `every_s` seconds a line "<verb> 12000 of 100000 rows (1650 rows/s, about
    53 s left)" (verb "data: tokenized"; the sampler's "sampling: generated for"); `finish()` a last one when
    anything was said before it (so a short run says nothing)."""

    def __init__(self, total: int, what: str = "rows", every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, verb: str = "data: tokenized") -> None:
        self.total, self.what, self.every_s, self.clock, self.verb = total, what, every_s, clock, verb
        self.start = self.last = clock()
        self.said = False

    def tick(self, done: int) -> None:
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last, self.said = now, True
        rate = done / max(now - self.start, 1e-9)
        log.info("%s %d of %d %s (%.0f %s/s, about %.0f s left)", self.verb, done, self.total, self.what, rate,
                 self.what, (self.total - done) / max(rate, 1e-9))

    def finish(self) -> None:
        if self.said:
            took = self.clock() - self.start
            log.info("%s %d %s in %.0f s (%.0f %s/s)", self.verb, self.total, self.what, took,
                     self.total / max(took, 1e-9), self.what)


@contextlib.contextmanager
def from_source(source: Any) -> Iterator[None]:
    """A DataError raised inside names `source` (data.source) first, unless it already does."""
    try:
        yield
    except DataError as e:
        if str(e).startswith("data.source="):
            raise
        raise DataError(f"data.source={source!r}: {e}") from None


def compact(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A side as a dataset holds it for the whole run: ids as uint16 when they all fit (every id of a vocabulary of
    up to 65,536 tokens), else int32 (`tokenize_rows` then widens every side's), and the loss mask as uint8: 3
    bytes a token instead of 8 (a million rows of 500 tokens: 1.5 GB of host memory instead of 4). Batches are
    built as int32 from them (`collate`)."""
    narrow = np.uint16 if ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) < 2**16) else np.int32
    return ids.astype(narrow), mask.astype(np.uint8)


def tokenize_rows(tokenizer: Any, n: int, pieces_of: Callable[[int], list[tuple[Pieces, int | None]]],
                  what: str = "rows", chunk: int = 256) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """[(ids, mask) of each side] for rows 0..n-1, where `pieces_of(i)` gives row i's sides as
    (pieces, eos_id) (`chat.conversation_pieces`: one side for SFT, chosen and rejected for a preference pair).
    The same tokens as `tokenize_pieces` of each row alone, `compact`ed; `chunk` rows per tokenizer call."""
    alone = pieces_tokenize_alone(tokenizer)
    progress = Progress(n, what)
    out: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for start in range(0, n, chunk):
        rows = [pieces_of(i) for i in range(start, min(n, start + chunk))]
        flat = iter(tokenize_pieces(tokenizer, [side for row in rows for side in row], alone))
        out += [[compact(*next(flat)) for _ in row] for row in rows]
        progress.tick(len(out))
    progress.finish()
    return one_dtype(out)


def one_dtype(rows: list[list[tuple[np.ndarray, np.ndarray]]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """One ids dtype for the whole data set, as the data cache writes and reads it back (`cache.save`): a process
    that tokenized and one that read the cache hold the same arrays (`distributed.check_same_everywhere`)."""
    if any(ids.dtype != np.uint16 for row in rows for ids, _ in row):
        rows = [[(ids.astype(np.int32, copy=False), mask) for ids, mask in row] for row in rows]
    return rows


def tokenize_texts(tokenizer: Any, texts: list[str], chunk: int = 256, add_eos: bool = True
                   ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """[(ids, mask)] of each plain text (SFT's language-modeling rows, TRL's "text" layout): the tokenizer's own
    encoding with its special tokens (Llama's BOS), then EOS when the text does not end with it, so that the model
    learns to stop (add_eos=False, data.add_eos: not, for texts that are pieces of longer documents); every token
    learned but the special ones the tokenizer put first. A text of only whitespace gets no EOS: nothing to learn
    (the caller drops it, counted). `compact`ed; `chunk` texts per call."""
    eos = tokenizer.eos_token_id
    special = set(getattr(tokenizer, "all_special_ids", ()))
    progress = Progress(len(texts), "texts")
    out: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        for text, ids in zip(part, tokenizer(part)["input_ids"], strict=True):
            ids = list(ids)
            lead = next((k for k, t in enumerate(ids) if t not in special), len(ids))
            if add_eos and text.strip() and eos is not None and ids[-1] != eos:
                ids.append(eos)
            mask = [0] * lead + [1] * (len(ids) - lead) if text.strip() else [0] * len(ids)
            out.append([compact(np.asarray(ids, np.int64), np.asarray(mask, np.int32))])
        progress.tick(len(out))
    progress.finish()
    return one_dtype(out)
