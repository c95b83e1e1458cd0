"""Scoring split across the processes of a multi-host job: every process holds the whole batch (the sampler
returns every completion everywhere), scores its contiguous share in its own worker pool, and the rewards,
per-sample info and counts are gathered, so every process ends with what `env.score` on the whole batch gives."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxrl_llm.environments.base import Environment, EnvResult, check_batch


def score_across_processes(env: Environment, prompts: list[str], completions: list[str],
                           metadata: list[dict[str, Any]]) -> EnvResult:
    """`env.score` of the whole batch with the work split over the processes (a collective: every process must
    call it with the same batch). One process: `env.score` itself."""
    import jax  # here, so that importing the environments stays light

    from jaxrl_llm.distributed import allgather_json, process_span

    if jax.process_count() == 1:
        return env.score(prompts, completions, metadata)
    check_batch(prompts, completions, metadata)
    lo, hi = process_span(len(completions))
    if hi > lo:
        part = env.score(prompts[lo:hi], completions[lo:hi], metadata[lo:hi])
        mine = {"rewards": np.asarray(part.rewards, np.float64).tolist(), "info": list(part.info),
                "counts": {k: int(v) for k, v in part.counts.items()}}
    else:
        mine = {"rewards": [], "info": [], "counts": {}}
    parts = allgather_json(mine)
    counts: dict[str, int] = {}
    for p in parts:
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + int(v)
    rewards = np.asarray([r for p in parts for r in p["rewards"]], np.float32)
    if rewards.shape[0] != len(completions):
        raise RuntimeError(f"gathered {rewards.shape[0]} rewards for {len(completions)} completions: the processes "
                           "did not score the same batch")
    return EnvResult(rewards=rewards, info=[i for p in parts for i in p["info"]], counts=counts)
