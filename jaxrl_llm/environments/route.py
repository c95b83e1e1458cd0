"""Routing by task: each sample is scored by the environment its task names (NeMo RL's task_name -> env).

    env = RoutedEnvironment({"math": MathEnvironment(), "reasoning_gym": ReasoningGymEnvironment()})
    result = env.score(prompts, completions, [t.metadata for t in tasks])   # metadata[i]["env"] picks the route
    result.info[i]    # the route's own info of sample i plus {"env": "math"}
    result.counts     # {"math/no_answer": 1, ..., "math/samples": 5, "reasoning_gym/samples": 3,
                      #  "timeouts": 0, "errors": 0}

The samples of a batch are grouped by `metadata[i][key]` (tasks from `load_tasks` carry "env": "math" or
"reasoning_gym"); each route's environment is called once with its sub-batch (in the batch's order) and the
rewards and info are written back in the original order. A route with no sample in a batch is not called: its
counts are only "<route>/samples": 0. Counts are prefixed with the route name; "timeouts" and "errors" are also
summed over routes without a prefix (what evaluation and training log). A sample whose metadata names no
configured route (or lacks `key` when no `default` is set) is misuse: ValueError naming the sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxrl_llm.environments.base import Environment, EnvResult, check_batch, check_metadata

_TOTALS = ("timeouts", "errors")


class RoutedEnvironment:
    """routes: route name (the value of metadata[key]) -> the environment that scores those samples.
    key: the metadata field naming the route. default: the route of samples whose metadata lacks `key`
    (None: such a sample is an error)."""

    def __init__(self, routes: Mapping[str, Environment], key: str = "env", default: str | None = None,
                 name: str = "routed"):
        if not isinstance(routes, Mapping) or not routes:
            raise ValueError(f"{name}: 'routes' must be a non-empty mapping of route name -> environment, got "
                             f"{routes!r}")
        for route, env in routes.items():
            if not isinstance(route, str) or not route:
                raise ValueError(f"{name}: route names must be non-empty strings, got {route!r}")
            if not callable(getattr(env, "score", None)):
                raise ValueError(f"{name}: route {route!r} must be an environment (with a score method), got "
                                 f"{type(env).__name__}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}: 'key' must be a non-empty string (the metadata field naming the route), "
                             f"got {key!r}")
        if default is not None and default not in routes:
            raise ValueError(f"{name}: default route {default!r} is not one of the routes {sorted(routes)}")
        self.name = name
        self.routes = dict(routes)
        self.key = key
        self.default = default

    def route_of(self, i: int, meta: Any) -> str:
        """The route name of sample i with metadata `meta`; ValueError when it names no configured route."""
        valid = sorted(self.routes)
        if not isinstance(meta, Mapping):
            raise ValueError(f"{self.name}: metadata[{i}] must be a mapping with {self.key!r} naming one of the "
                             f"routes {valid}, got {type(meta).__name__}")
        if self.key not in meta:
            if self.default is not None:
                return self.default
            raise ValueError(f"{self.name}: metadata[{i}] has no {self.key!r} and no default route is set; "
                             f"valid routes: {valid}")
        value = meta[self.key]
        if not isinstance(value, str) or value not in self.routes:
            raise ValueError(f"{self.name}: metadata[{i}][{self.key!r}] is {value!r}, not a configured route; "
                             f"valid routes: {valid}")
        return value

    def check_metadata(self, metadata: list[dict[str, Any]]) -> None:
        """Every sample names a route, and each route's environment can score its own samples."""
        rows: dict[str, list[int]] = {route: [] for route in self.routes}
        for i, meta in enumerate(metadata):
            rows[self.route_of(i, meta)].append(i)
        for route, env in self.routes.items():
            if rows[route]:
                check_metadata(env, [metadata[i] for i in rows[route]])

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        check_batch(prompts, completions, metadata)
        n = len(completions)
        rows: dict[str, list[int]] = {route: [] for route in self.routes}
        for i, meta in enumerate(metadata):  # every sample checked before any environment runs
            rows[self.route_of(i, meta)].append(i)
        rewards_N = np.zeros(n, np.float32)
        info: list[dict[str, Any]] = [{} for _ in range(n)]
        counts = {k: 0 for k in _TOTALS}
        for route, env in self.routes.items():
            idx = rows[route]
            if not idx:
                counts[f"{route}/samples"] = 0
                continue
            part = env.score([prompts[i] for i in idx], [completions[i] for i in idx], [metadata[i] for i in idx])
            part_R = np.asarray(part.rewards, np.float32)
            if part_R.shape != (len(idx),):
                raise ValueError(f"{self.name}: route {route!r} returned rewards of shape {part_R.shape} for "
                                 f"{len(idx)} samples")
            if part.info and len(part.info) != len(idx):
                raise ValueError(f"{self.name}: route {route!r} returned {len(part.info)} info entries for "
                                 f"{len(idx)} samples")
            rewards_N[idx] = part_R
            for j, i in enumerate(idx):
                info[i] = {**(part.info[j] if part.info else {}), "env": route}
            for k, v in (part.counts or {}).items():
                counts[f"{route}/{k}"] = int(v)
                if k in _TOTALS:
                    counts[k] += int(v)
            counts[f"{route}/samples"] = len(idx)
        return EnvResult(rewards=rewards_N, info=info, counts=counts)

    def close(self) -> None:
        """Closes every route environment that can be closed (once, if one serves several routes)."""
        seen: set[int] = set()
        for env in self.routes.values():
            close = getattr(env, "close", None)
            if close is not None and id(env) not in seen:
                seen.add(id(env))
                close()

    def __enter__(self) -> RoutedEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
