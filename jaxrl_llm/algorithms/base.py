"""What every offline algorithm (SFT, DPO, RM) gives the trainer: data preparation, collation and a step."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The pieces `jaxrl_llm.train` composes.

    prepare(config, tokenizer) -> (examples: list, stats: dict)   host-side tokenization, once per run
    widths(examples: list, config) -> dict[str, int]   the padded widths of a global batch (from all its
        examples, so that every process pads its rows alike; a handful of rungs, see data.buckets)
    collate(examples: list, config, pad_id, widths=None) -> dict[str, np.ndarray]   (this process's rows of)
        one global batch, padded to `widths` (default: those of the given examples)
    batch_axes: dict[str, tuple[str, ...]]   logical axes of each collated array (for its sharding)
    make_step(cfg, optimizer, config, rules) -> step(state, batch, ref_params) -> (state, metrics)
    needs_reference(config) -> bool   whether a frozen reference copy of the initial params is kept
    num_labels: 0 for LM heads; > 0 builds/loads a score head of that width
    make_eval(cfg, config, rules) -> eval(params, batch, ref_params) -> (sums: dict, count)   validation:
        the batch carries "example_weight" [B] (0 for filler rows of the last batch); the reported
        metric is val_<name> = sum over batches of sums[name] / sum of counts
    """

    name: str
    prepare: Callable[..., tuple[list, dict[str, int]]]
    widths: Callable[[list, Any], dict[str, int]]
    collate: Callable[..., dict[str, np.ndarray]]
    batch_axes: dict[str, tuple[str, ...]]
    make_step: Callable[..., Callable]
    needs_reference: Callable[[Any], bool] = lambda config: False
    num_labels: int = 0
    make_eval: Callable[..., Callable] | None = None
    validate: Callable[[Any], None] = lambda config: None  # raises ValueError naming the bad config key


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples in global batch `step` (0-based): a fresh seeded permutation each epoch.

    A pure function of (seed, step), so the data position in a checkpoint is just the step.
    """
    out = []
    for j in range(batch_size):
        epoch, offset = divmod(step * batch_size + j, num_examples)
        out.append(int(_permutation(num_examples, seed, epoch)[offset]))
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
