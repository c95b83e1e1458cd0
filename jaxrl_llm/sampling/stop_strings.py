"""Stop strings: a row ends at the first token with which its completion's text contains one of its strings.

Matched inside the jitted decode loop, on token ids, with no detokenization: as in transformers'
`StopStringCriteria`, a table built once on the host says, for every token id and every stop string, how the
token's bytes can sit in a match. After each sampled token the loop walks back over the row's last tokens:

- the newest token either holds a whole stop string, or its first bytes end one (bit j of `end`: the string's
  first j bytes are still to be matched by the tokens before it);
- each earlier token either sits wholly inside the string, ending where the match still has to reach (bit j of
  `inner`: its bytes are the string's bytes j - len .. j; the match then still needs j - len bytes, a right
  shift), or covers the rest of the string's start, possibly with bytes of its own before it (bit j of `front`).

The sets of possible positions are bit masks (uint32), so a stop string has at most MAX_STOP_BYTES bytes and the
walk at most that many tokens; it ends early once no position is left (nearly always after the newest token).
Only generated tokens are looked at (as vLLM does; a string begun in the prompt does not count). Text is what
`tokenizer.decode(..., skip_special_tokens=True)` shows: special tokens have no bytes (a match runs through). The
stop string's last token is returned (as with stop ids), so the decoded completion ends with the stop string and
any bytes of that token after it.

Shape suffixes: V vocabulary (the model's), S stop strings (padded to a bucket), B rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

MAX_STOP_BYTES = 31  # bits 1..30 of a uint32 name the bytes still to match
_ALL = (1 << MAX_STOP_BYTES) - 1


def check_stop_strings(strings: Any) -> tuple[str, ...]:
    """A tuple of non-empty strings of at most MAX_STOP_BYTES UTF-8 bytes, from a string, a sequence or None."""
    if strings is None:
        return ()
    if isinstance(strings, str):
        strings = (strings,)
    if isinstance(strings, bytes) or not isinstance(strings, Sequence):
        raise ValueError(f"stop_strings={strings!r}: expected a tuple of strings")
    out = tuple(strings)
    for s in out:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_strings={out!r}: {s!r} is not a non-empty string")
        if len(s.encode()) > MAX_STOP_BYTES:
            raise ValueError(f"stop_strings: {s!r} is {len(s.encode())} bytes in UTF-8; at most {MAX_STOP_BYTES}")
    return out


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 for
    the code points 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def _piece_bytes(piece: str, byte_level: bool, table: dict[str, int]) -> bytes:
    if byte_level:
        try:
            return bytes(table[c] for c in piece)
        except KeyError:  # not a byte-level piece (an added token's text): its text as written
            return piece.encode()
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode()  # SentencePiece's word boundary is a space


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenBytes:
    """The bytes each token id adds to decoded text (b"" for special tokens and ids the tokenizer lacks).
    Build it once per tokenizer with `token_bytes` and pass it where a tokenizer is asked for: it also keeps the
    tables it has built (a GRPO run asks for the same one at every step)."""

    pieces: tuple[bytes, ...]
    specials: dict[str, int] = dataclasses.field(default_factory=dict)  # a special token's text -> its id
    tables: dict = dataclasses.field(default_factory=dict, repr=False)

    def table(self, strings: tuple[str, ...], vocab_size: int) -> StopTable:
        key = (strings, vocab_size)
        if key not in self.tables:
            self.tables.clear()  # one at a time: a run seldom changes its strings
            for s in strings:
                for text, i in self.specials.items():
                    if text in s:
                        log.warning("stop string %r holds the text of special token %d (%r), which is no text in a "
                                    "completion (special tokens decode to nothing): the token itself never matches "
                                    "it; stop_token_ids=(%d,) stops at it", s, i, text, i)
            self.tables[key] = build_table(self, strings, vocab_size, stop_width(len(strings)))
        return self.tables[key]


def token_bytes(tokenizer: Any) -> TokenBytes:
    """`TokenBytes` of an HF tokenizer: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) exactly; SentencePiece
    pieces with their byte-fallback tokens; added tokens by their text, special tokens as nothing."""
    if isinstance(tokenizer, TokenBytes):
        return tokenizer
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    byte_level, table = _is_byte_level(tokenizer), _byte_decoder()
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}))  # id -> AddedToken
    special = set(getattr(tokenizer, "all_special_ids", ())) | {i for i, t in added.items()
                                                                if getattr(t, "special", False)}
    out, texts = [], {}
    for i, piece in enumerate(pieces):
        if piece is not None and i in special:
            texts.setdefault(piece, i)
        if piece is None or i in special:
            out.append(b"")
        elif i in added:
            out.append(piece.encode())
        else:
            out.append(_piece_bytes(piece, byte_level, table))
    return TokenBytes(tuple(out), texts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopTable:
    """Per token id and stop string: `whole` the token holds the string; `end`, `inner`, `front` the bit masks
    of the module docstring (`inner` all ones for a token without text); `len_V` the token's byte count.
    Arrays: other strings (as many, within a bucket) never recompile."""

    whole_VS: jax.Array  # bool
    end_VS: jax.Array  # uint32
    inner_VS: jax.Array  # uint32
    front_VS: jax.Array  # uint32
    len_V: jax.Array  # int32, capped at 31 (a longer token never sits inside a string)


def _positions(s: bytes, b: int) -> list[int]:
    return [k for k, c in enumerate(s) if c == b]


def build_table(tokens: TokenBytes, strings: Sequence[str], vocab_size: int, width: int) -> StopTable:
    """The numpy table of `strings` (columns beyond them inert) over ids [0, vocab_size)."""
    V, S = vocab_size, width
    whole, end = np.zeros((V, S), bool), np.zeros((V, S), np.uint32)
    inner, front = np.zeros((V, S), np.uint32), np.zeros((V, S), np.uint32)
    pieces = tokens.pieces[:V]
    lengths = np.zeros(V, np.int32)
    lengths[:len(pieces)] = [min(len(w), MAX_STOP_BYTES) for w in pieces]
    for col, text in enumerate(strings):
        s = text.encode()
        n = len(s)
        at = {b: _positions(s, b) for b in set(s)}
        for i, w in enumerate(pieces):
            if not w:  # a special token: no text, so a match runs through it
                inner[i, col] = _ALL
                continue
            m = len(w)
            if s in w:
                whole[i, col] = True
            bits_end = bits_inner = bits_front = 0
            for k in at.get(w[0], ()):  # w starts at byte k of s: does w's beginning end s (k >= 1, k + m >= n)?
                if k and n - k <= m and w[:n - k] == s[k:]:
                    bits_end |= 1 << k  # the first k bytes of s are still to be matched
                if k and k + m < n and s[k:k + m] == w:  # w sits inside s, not at its start or end
                    bits_inner |= 1 << (k + m)
            for q in range(max(0, m - (n - 1)), m):  # w's last m - q bytes are s's first ones (j = m - q < n)
                if w[q] == s[0] and w[q:] == s[:m - q]:
                    bits_front |= 1 << (m - q)
            end[i, col], inner[i, col], front[i, col] = bits_end, bits_inner, bits_front
    return StopTable(whole_VS=whole, end_VS=end, inner_VS=inner, front_VS=front, len_V=lengths)


def stop_width(n: int) -> int:
    """Stop-string columns of a table: a multiple of 4 (a few more strings reuse the compiled program)."""
    return max(4, -(-n // 4) * 4)


def hits(table: StopTable, use_BS: jax.Array, tokens_BN: jax.Array, step: jax.Array) -> jax.Array:
    """Rows [B] whose generated text first contains one of their stop strings with token `step` (the newest).

    use_BS: which strings each row stops at. tokens_BN: the generated tokens so far (column `step` the newest)."""
    newest_B = jnp.maximum(jax.lax.dynamic_index_in_dim(tokens_BN, step, axis=1, keepdims=False), 0)
    done_BS = table.whole_VS[newest_B] & use_BS
    open_BS = jnp.where(use_BS, table.end_VS[newest_B], jnp.uint32(0))

    def cond(c):
        k, open_BS, _ = c
        return (k <= jnp.minimum(step, MAX_STOP_BYTES - 1)) & jnp.any(open_BS != 0)

    def body(c):
        k, open_BS, done_BS = c
        tok_B = jnp.maximum(jax.lax.dynamic_index_in_dim(tokens_BN, step - k, axis=1, keepdims=False), 0)
        done_BS = done_BS | ((open_BS & table.front_VS[tok_B]) != 0)
        shift_B1 = table.len_V[tok_B].astype(jnp.uint32)[:, None]
        return k + 1, (open_BS & table.inner_VS[tok_B]) >> shift_B1, done_BS

    _, _, done_BS = jax.lax.while_loop(cond, body, (jnp.int32(1), open_BS, done_BS))
    return jnp.any(done_BS, axis=-1)


def first_stop(text: bytes, strings: Sequence[str]) -> int:
    """Reference for tests and callers: the end (exclusive byte offset) of the earliest-ending occurrence of any
    of `strings` in `text`, or -1."""
    ends = [text.find(s.encode()) + len(s.encode()) for s in strings if s.encode() in text]
    return min(ends) if ends else -1
