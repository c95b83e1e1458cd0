"""Padded widths of training batches: a few compiled shapes, little padding.

An unpacked batch padded to `data.max_len` wastes the columns its longest row does not use (a batch of
150-token chat rows padded to 2048 does 13x the work). Padding each batch instead to the smallest width of a
short ladder that holds its longest row keeps the work close to the rows' own length (at most a third more)
while the train step compiles once per rung it meets: powers of two and the midpoints 1.5 x 2^k between them,
32, 48, 64, 96, 128, ..., and max_len itself as the top rung (two rungs per doubling: 13 shapes from 32 to 2048).
"""

from __future__ import annotations


def bucket_width(n: int, cap: int, minimum: int = 32) -> int:
    """The smallest rung >= n of (minimum, 1.5 x minimum, 2 x minimum, 3 x minimum, 4 x minimum, ...), or `cap`
    when that rung would exceed it.

    n > cap is a caller's bug (rows are cut or dropped to the cap before batching): ValueError."""
    if n > cap:
        raise ValueError(f"a row of {n} tokens does not fit the width cap {cap}")
    w = minimum  # a power of two
    while w < n:
        w = w + w // 2 if w & (w - 1) == 0 else w // 3 * 4  # 2^k -> 1.5 x 2^k -> 2^(k+1)
    return min(w, cap)
