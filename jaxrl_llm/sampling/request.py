"""What a caller asks for: `SamplingParams`, input validation, and the shape buckets that bound compilation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import numpy as np

from jaxrl_llm.sampling.stop_strings import check_stop_strings


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling settings. All of them are per-row arrays inside jit: changing one never recompiles
    (except `max_new_tokens` crossing a power-of-two bucket, or more than 8 stop ids).

    temperature: 0 = greedy. top_k: 0 = off. top_p: 1 = off (must lie in (0, 1]).
    stop_token_ids: generation of a row ends at the first of these (the stop token is returned). A single id is
    taken as a one-id tuple; None is the same as () (no stop ids; `generate_text` then uses the eos ids).
    stop_strings: generation of a row ends at the first token with which its completion's text contains one of
    these (each at most 31 bytes in UTF-8; the token is returned, so the text ends with the string and any bytes of
    that token after it). `generate` then needs the tokenizer (`sampling/stop_strings.py`).
    return_raw_logprobs: log-probs of the raw model distribution (temperature 1, no top-k/top-p) instead of
    the processed distribution actually sampled from.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    return_raw_logprobs: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", _as_stop_ids(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", check_stop_strings(self.stop_strings))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0 or self.top_k >= 2**31:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r}: must lie in (0, 1] (1 = off)")
        # numpy scalars (budgets read from an array) as Python numbers: the shape buckets use int methods
        for name, kind in (("max_new_tokens", int), ("top_k", int), ("temperature", float), ("top_p", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _is_real(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool | np.bool_)


def _as_stop_ids(ids) -> tuple[int, ...]:
    """A tuple of ints from a tuple/list of ints, a single int, or None (no stop ids)."""
    if ids is None:
        return ()
    if _is_int(ids):
        return (int(ids),)
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise ValueError(f"stop_token_ids={ids!r}: expected token ids (a tuple of ints, a single int, or None)")
    ids = tuple(ids)
    bad = [t for t in ids if not _is_int(t)]
    if bad:
        raise ValueError(f"stop_token_ids={ids!r}: {bad[0]!r} is not an integer token id")
    return tuple(int(t) for t in ids)


def as_param_list(sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
                  ) -> list[SamplingParams]:
    """One SamplingParams per prompt (a single one is shared by all)."""
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    out = list(sampling_params)
    if len(out) != n or not all(isinstance(p, SamplingParams) for p in out):
        raise ValueError(f"sampling_params: expected one SamplingParams or a list of {n} (one per prompt)")
    return out


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[np.ndarray]:
    """int32 arrays, or a ValueError that names the prompt index (and the offending id).

    prompts: a list of token-id lists, or a 2-D numpy or jax array (one row per prompt)."""
    if isinstance(prompts, np.ndarray | jax.Array):
        prompts = np.asarray(prompts)
        if prompts.ndim == 1:
            raise ValueError(f"prompts: expected a list of token-id lists, got a 1-D array of shape {prompts.shape}; "
                             "wrap a single prompt in a list: [ids]")
        if prompts.ndim != 2:
            raise ValueError(f"prompts: expected a list of token-id lists or a 2-D array, got shape {prompts.shape}")
        prompts = list(prompts)
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts: expected a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate")
    if all(_is_int(p) for p in prompts):
        raise ValueError(f"prompts: expected a list of token-id lists, got a flat list of {len(prompts)} ints; "
                         "wrap a single prompt in a list: [[id, id, ...]]")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str | bytes):
            raise ValueError(f"prompt {i} is a string; tokenize it first (or use sampling.generate_text)")
        arr = np.asarray(p)
        if arr.ndim != 1:
            raise ValueError(f"prompt {i}: expected a flat list of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompt {i}: token ids must be integers, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
        if bad.size:
            raise ValueError(f"prompt {i}: token id {int(arr[bad[0]])} at position {int(bad[0])} is outside the "
                             f"vocabulary [0, {vocab_size})")
        out.append(arr.astype(np.int32))
    return out


def validate_stop_ids(params: list[SamplingParams], vocab_size: int) -> None:
    for i, p in enumerate(params):
        bad = [t for t in p.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sampling params of prompt {i}: stop token id {bad[0]} is outside the vocabulary "
                             f"[0, {vocab_size})")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(n: int, minimum: int = 16) -> int:
    """Powers of two up to 1024, then multiples of 1024: a handful of shapes for any length."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length() if n <= 1024 else round_up(n, 1024)


def bucket_new_tokens(n: int) -> int:
    """The generation slots of a cache for `n` new tokens: powers of two up to 256, then multiples of 256. A coarser
    rung (2048 slots for 1100 tokens) holds memory no row uses, and decode attends over every slot at each step; a
    run's max_new_tokens seldom changes, so finer rungs add few compiles."""
    return bucket_length(n) if n <= 256 else round_up(n, 256)


def bucket_batch(n: int, multiple: int = 1) -> int:
    """A power of two >= n, rounded up to a multiple of the mesh's batch shards."""
    return round_up(1 << (n - 1).bit_length(), multiple)


def bucket_stop_width(n: int) -> int:
    return max(8, round_up(n, 8))
