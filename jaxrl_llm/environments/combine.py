"""A weighted sum of environments: reward_i = sum_k w_k * r_k,i, with each component kept for logging.

    env = CombinedEnvironment([(MathEnvironment(), 1.0), (FormatEnvironment(), 0.1)])
    result.info[i]    # {"reward/math": 1.0, "reward/format": 1.0, "math/extracted": "72", "format/format_ok": True}
    result.counts     # {"math/timeouts": 0, ..., "format/format_miss": 0, "timeouts": 0, "errors": 0}

Components are scored one after the other on the whole batch. Counts are prefixed with the component's name;
"timeouts" and "errors" are also summed over components without a prefix (what evaluation and training log).
Component names must differ (give two environments of one kind distinct `name`s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrl_llm.environments.base import Environment, EnvResult, check_batch, check_metadata

_TOTALS = ("timeouts", "errors")


class CombinedEnvironment:
    def __init__(self, components: Sequence[tuple[Environment, float]], name: str = "combined"):
        if not components:
            raise ValueError("combined: needs at least one (environment, weight) component")
        names = [getattr(env, "name", None) for env, _ in components]
        if any(not isinstance(n, str) or not n for n in names):
            raise ValueError(f"combined: every component needs a non-empty string name, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"combined: component names must differ, got {names} (pass name=... to tell them apart)")
        self.name = name
        self.components = [(env, float(w)) for env, w in components]

    def check_metadata(self, metadata: list[dict[str, Any]]) -> None:
        """Every component's check (each scores every sample)."""
        for env, _ in self.components:
            check_metadata(env, metadata)

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        check_batch(prompts, completions, metadata)
        n = len(completions)
        total_N = np.zeros(n, np.float32)
        info: list[dict[str, Any]] = [{} for _ in range(n)]
        counts = {k: 0 for k in _TOTALS}
        for env, weight in self.components:
            part = env.score(prompts, completions, metadata)
            rewards_N = np.asarray(part.rewards, np.float32)
            if rewards_N.shape != (n,):
                raise ValueError(f"combined: component {env.name!r} returned rewards of shape {rewards_N.shape}, "
                                 f"expected ({n},)")
            total_N += weight * rewards_N
            for i in range(n):
                info[i][f"reward/{env.name}"] = float(rewards_N[i])
                for k, v in (part.info[i] if part.info else {}).items():
                    info[i][f"{env.name}/{k}"] = v
            for k, v in (part.counts or {}).items():
                counts[f"{env.name}/{k}"] = int(v)
                if k in _TOTALS:
                    counts[k] += int(v)
        return EnvResult(rewards=total_N, info=info, counts=counts)

    def close(self) -> None:
        """Closes every component that can be closed."""
        for env, _ in self.components:
            close = getattr(env, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> CombinedEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
