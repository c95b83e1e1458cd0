"""Padded widths of training batches: a few compiled shapes, little padding.

An unpacked batch padded to `data.max_len` wastes the columns its longest row does not use (a batch of
150-token chat rows padded to 2048 does 13x the work). Padding each batch instead to the smallest width of a
short ladder that holds its longest row keeps the work close to the rows' own length, while the train step
compiles once per shape it meets. `data.length_buckets` = rungs per doubling of the length: with 4 (default) the
ladder is 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, ..., 256, 320, 384, 448, 512, ... (above 32 tokens at most
25% padding over the longest row, 4 rungs per doubling), with 2 it is 32, 48, 64, 96, 128, ... (at most 50%, 2
per doubling), with 1 powers of two; max_len is always the top rung. 0: every batch padded to max_len.
"""

from __future__ import annotations

RUNGS = (0, 1, 2, 4, 8)  # valid data.length_buckets
MINIMUM = 32


def bucket_width(n: int, cap: int, per_doubling: int = 4, minimum: int = MINIMUM) -> int:
    """The smallest rung >= n of the ladder `per_doubling` rungs per doubling from `minimum` (a power of two),
    capped at `cap`; per_doubling 0: `cap`. n > cap is a caller's bug (rows are cut or dropped to the cap
    before batching): ValueError."""
    if n > cap:
        raise ValueError(f"a row of {n} tokens does not fit the width cap {cap}")
    if per_doubling not in RUNGS:
        raise ValueError(f"length_buckets={per_doubling}: expected one of {RUNGS}")
    if per_doubling == 0:
        return cap
    base = minimum
    while 2 * base < n:
        base *= 2
    step = base // per_doubling
    return min(max(-(-n // step) * step, minimum), cap)
