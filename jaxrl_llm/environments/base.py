"""The environment interface: a batch of (prompt, completion, metadata) in, rewards and per-sample info out.

A task (one prompt of a dataset) carries everything its environment needs to score a completion in
`metadata` (plain JSON-able values: the gold answer, a reasoning-gym entry, ...), so scoring can run in
worker processes and tasks can be written to and read from files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Task:
    """One prompt of a dataset: chat messages (the prompt) and what its environment needs to score answers.

    messages: [{"role": "system"|"user"|..., "content": str}, ...], ending before the assistant's turn.
    metadata: JSON-able; "answer" holds the gold answer for math tasks; "env" names the environment that
    scores it when several are mixed; reasoning-gym tasks carry "rg_dataset" and "rg_entry".
    """

    messages: tuple[dict[str, str], ...]
    metadata: dict[str, Any]


@dataclasses.dataclass
class EnvResult:
    """rewards [N] float32; info[i]: per-sample details (e.g. the extracted answer, components);
    counts: events worth a logged count (e.g. {"timeouts": 2, "errors": 1}), summed over the batch."""

    rewards: np.ndarray
    info: list[dict[str, Any]]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


def check_metadata(env: Any, metadata: list[dict[str, Any]]) -> None:
    """ValueError when `env` cannot score tasks with this metadata (e.g. the math environment on tasks without a
    gold answer), from its optional `check_metadata`: run on a data set's tasks before any sampling."""
    check = getattr(env, "check_metadata", None)
    if callable(check):
        check(list(metadata))


class Environment(Protocol):
    """Scores completions. Never raises for a bad completion or a failing scorer: that sample gets reward 0
    and a count in EnvResult.counts; raises only for misuse (mismatched lengths, bad configuration)."""

    name: str

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        ...


def check_batch(prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> None:
    """ValueError unless the three lists of a score() call have one entry per sample each."""
    if not (len(prompts) == len(completions) == len(metadata)):
        raise ValueError(f"score(): prompts, completions and metadata must have one entry per sample, got lengths "
                         f"{len(prompts)}, {len(completions)}, {len(metadata)}")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise ValueError(f"score(): completions[{i}] must be a string, got {type(c).__name__}")
