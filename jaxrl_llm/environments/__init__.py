"""Verifiable-reward environments for GRPO/PPO: math (math-verify), reasoning-gym tasks, code (tests run in the
sandboxed pool), format, weighted sums, routing by task, and multi-turn games (number_guess: `step` answers each
turn, see multiturn.py).

    env = make_environment({"name": "math", "answer_format": "boxed", "timeout_s": 5.0, "num_workers": 2})
    env = make_environment({"name": "code", "answer_format": "fenced", "timeout_s": 5.0})  # metadata "tests"
    env = make_environment({"name": "combined", "components": [
        {"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1, "pattern": r"<answer>.*?</answer>"}]})
    env = make_environment({"name": "routed", "key": "env", "default": None, "routes": {  # by metadata["env"]
        "math": {"name": "math"}, "reasoning_gym": {"name": "reasoning_gym"}}})
    env = make_environment({"name": "number_guess", "lo": 1, "hi": 100, "turn_discount": 1.0, "invalid_penalty": 0.0})
    result = env.score(prompts, completions, metadata)   # EnvResult(rewards [N], info, counts)
    env.close()                                          # stops scoring workers (also done at exit)

Every environment takes an optional "label" key: the name it reports (info "reward/<label>", count prefixes);
two components of one kind in a combined environment need different labels.
Reasoning models: math, reasoning_gym, code and format read the text after the completion's last </think>
(extract.after_thinking; a completion cut off inside its think block has no answer); "strip_thinking": False reads
the whole completion (format's default None: the whole completion when its pattern mentions "think").
Importing this package is cheap: math_verify and reasoning_gym are imported only where they are used.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from jaxrl_llm.environments.base import Environment, EnvResult, Task, check_batch, check_metadata
from jaxrl_llm.environments.code import CodeEnvironment, extract_code
from jaxrl_llm.environments.combine import CombinedEnvironment
from jaxrl_llm.environments.extract import extract_answer, normalize_answer, normalize_number
from jaxrl_llm.environments.format import FormatEnvironment
from jaxrl_llm.environments.math import MathEnvironment, answers_match
from jaxrl_llm.environments.multiturn import (
    MultiTurnEnvironment,
    NumberGuessEnvironment,
    TurnResult,
    is_multi_turn,
    multi_turn_names,
)
from jaxrl_llm.environments.pool import Outcome, ScoringPool
from jaxrl_llm.environments.procedural import (
    ReasoningGymEnvironment,
    decode_entry,
    encode_entry,
    reasoning_gym_datasets,
    reasoning_gym_tasks,
)
from jaxrl_llm.environments.route import RoutedEnvironment
from jaxrl_llm.environments.split import score_across_processes

__all__ = [
    "CodeEnvironment", "CombinedEnvironment", "EnvResult", "Environment", "FormatEnvironment", "MathEnvironment",
    "MultiTurnEnvironment", "NumberGuessEnvironment", "Outcome", "ReasoningGymEnvironment", "RoutedEnvironment",
    "ScoringPool", "Task", "TurnResult", "answers_match", "check_batch", "check_metadata", "decode_entry",
    "encode_entry", "environment_kind", "extract_answer", "extract_code", "is_multi_turn", "make_environment",
    "multi_turn_names", "normalize_answer", "normalize_number", "reasoning_gym_datasets", "reasoning_gym_tasks",
    "score_across_processes",
]

ENVIRONMENTS: dict[str, type] = {
    "math": MathEnvironment,
    "reasoning_gym": ReasoningGymEnvironment,
    "code": CodeEnvironment,
    "format": FormatEnvironment,
    "number_guess": NumberGuessEnvironment,
}
_COMBINED_KEYS = ("components", "label", "name")
_ROUTED_KEYS = ("default", "key", "label", "name", "routes")


def _plain(spec: Any) -> Any:
    """ConfigDicts (and ConfigDicts inside lists) as plain dicts."""
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    if isinstance(spec, Mapping):
        return {k: _plain(v) for k, v in spec.items()}
    if isinstance(spec, list | tuple):
        return [_plain(v) for v in spec]
    return spec


def environment_kind(spec: Any, where: str) -> str:
    """The spec's environment name; ValueError naming `where` when it is missing or unknown."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: an environment spec must be a mapping with a 'name', got {type(spec).__name__}")
    kind = spec.get("name")
    valid = sorted([*ENVIRONMENTS, "combined", "routed"])
    if kind is None:
        raise ValueError(f"{where}: missing key 'name' (one of {valid})")
    if kind not in valid:
        raise ValueError(f"{where}: unknown environment name {kind!r}; valid: {valid}")
    return kind


def _valid_keys(cls: type) -> list[str]:
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "name")]
    return sorted([*params, "label", "name"])


def _check_keys(spec: Mapping[str, Any], valid: list[str], where: str) -> None:
    for key in spec:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}; valid keys: {valid}")


def _make(spec: Mapping[str, Any], where: str) -> Environment:
    kind = environment_kind(spec, where)
    where = f"{where} ({kind})"
    if kind == "combined":
        _check_keys(spec, list(_COMBINED_KEYS), where)
        comps = spec.get("components")
        if not isinstance(comps, list) or not comps:
            raise ValueError(f"{where}: 'components' must be a non-empty list of environment specs")
        parts = []
        for j, comp in enumerate(comps):
            cwhere = f"{where}.components[{j}]"
            if not isinstance(comp, Mapping):
                raise ValueError(f"{cwhere}: expected a mapping, got {type(comp).__name__}")
            weight = comp.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ValueError(f"{cwhere}: 'weight' must be a number, got {weight!r}")
            parts.append((_make({k: v for k, v in comp.items() if k != "weight"}, cwhere), float(weight)))
        return CombinedEnvironment(parts, name=spec.get("label", "combined"))
    if kind == "routed":
        _check_keys(spec, list(_ROUTED_KEYS), where)
        routes = spec.get("routes")
        if not isinstance(routes, Mapping) or not routes:
            raise ValueError(f"{where}: 'routes' must be a non-empty mapping of route name -> environment spec")
        key = spec.get("key", "env")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: 'key' must be a non-empty string (the metadata field naming the route), "
                             f"got {key!r}")
        default = spec.get("default")
        if default is not None and default not in routes:
            raise ValueError(f"{where}: 'default' {default!r} is not one of the routes {sorted(routes)}")
        for route in routes:
            if not isinstance(route, str) or not route:
                raise ValueError(f"{where}: route names must be non-empty strings, got {route!r}")
        envs = {route: _make(rspec, f"{where}.routes[{route!r}]") for route, rspec in routes.items()}
        return RoutedEnvironment(envs, key=key, default=default, name=spec.get("label", "routed"))
    cls = ENVIRONMENTS[kind]
    _check_keys(spec, _valid_keys(cls), where)
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "label")}
    if "label" in spec:
        kwargs["name"] = spec["label"]
    return cls(**kwargs)


def make_environment(spec: Mapping[str, Any]) -> Environment:
    """An environment from a plain mapping (or an ml_collections ConfigDict): {"name": "math" | "reasoning_gym" |
    "code" | "format" | "number_guess" | "combined" | "routed", ...constructor keywords, "label": optional reported
    name};
    "combined" takes "components": a list of such specs, each with an optional "weight" (default 1.0); "routed"
    takes "routes": a mapping of route name (a value of metadata[key]) -> such a spec, "key" (default "env") and
    "default" (the route of samples without `key`; default None: they are an error). "number_guess" also has
    `step` (multi-turn episodes, rollout.max_turns > 1).
    Unknown names or keys: ValueError naming them and listing the valid ones."""
    return _make(_plain(spec), "environment spec")
