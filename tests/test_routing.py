"""Routing by task: RoutedEnvironment (one call per environment with its sub-batch, results in the batch's order),
make_environment's "routed" spec, and mixed task sources ("gsm8k+rg:chain_sum") scored by a routed environment."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrl_llm.data import DataError
from jaxrl_llm.data.tasks import MATH_INSTRUCTION, load_tasks
from jaxrl_llm.environments import (
    CombinedEnvironment,
    EnvResult,
    FormatEnvironment,
    MathEnvironment,
    ReasoningGymEnvironment,
    RoutedEnvironment,
    make_environment,
)


class Recorder:
    """Records every score() call; reward = offset + len(completion); counts from the completions."""

    def __init__(self, name: str, offset: float):
        self.name = name
        self.offset = offset
        self.calls: list[tuple[list, list, list]] = []
        self.closed = 0

    def score(self, prompts, completions, metadata):
        self.calls.append((list(prompts), list(completions), list(metadata)))
        return EnvResult(rewards=np.array([self.offset + len(c) for c in completions], np.float32),
                         info=[{"seen": c, "by": self.name} for c in completions],
                         counts={"calls": 1, "errors": sum("err" in c for c in completions), "timeouts": 1})

    def close(self):
        self.closed += 1


def _batch(routes: list[str | None], key: str = "env"):
    prompts = [f"p{i}" for i in range(len(routes))]
    completions = ["x" * (i + 1) + ("err" if i == 3 else "") for i in range(len(routes))]
    metadata = [({} if r is None else {key: r}) | {"i": i} for i, r in enumerate(routes)]
    return prompts, completions, metadata


def test_routes_each_sub_batch_in_one_call_and_restores_order():
    a, b, c = Recorder("A", 100.0), Recorder("B", 200.0), Recorder("C", 300.0)
    env = RoutedEnvironment({"a": a, "b": b, "c": c})
    routes = ["b", "a", "a", "b", "a", "b", "a"]
    prompts, completions, metadata = _batch(routes)
    res = env.score(prompts, completions, metadata)
    # each environment called once with exactly its samples, in the batch's relative order; an unused one never
    assert a.calls == [([prompts[i] for i in (1, 2, 4, 6)], [completions[i] for i in (1, 2, 4, 6)],
                        [metadata[i] for i in (1, 2, 4, 6)])]
    assert b.calls == [([prompts[i] for i in (0, 3, 5)], [completions[i] for i in (0, 3, 5)],
                        [metadata[i] for i in (0, 3, 5)])]
    assert c.calls == []
    offsets = {"a": 100.0, "b": 200.0}
    np.testing.assert_array_equal(res.rewards, [offsets[r] + len(c) for r, c in zip(routes, completions, strict=True)])
    assert res.rewards.dtype == np.float32
    assert res.info == [{"seen": c, "by": r.upper(), "env": r} for r, c in zip(routes, completions, strict=True)]
    assert res.counts == {"a/calls": 1, "a/errors": 0, "a/timeouts": 1, "a/samples": 4,
                          "b/calls": 1, "b/errors": 1, "b/timeouts": 1, "b/samples": 3,
                          "c/samples": 0, "timeouts": 2, "errors": 1}


def test_real_environments_routed_by_metadata():
    env = RoutedEnvironment({"math": MathEnvironment(answer_format="answer_tag", num_workers=0, sandbox=False),
                             "format": FormatEnvironment(pattern=r"^<b>", reward=0.5)})
    texts = ["<answer>4</answer>", "<b>x", "<answer>5</answer>", "no"]
    meta = [{"env": "math", "answer": "4"}, {"env": "format"}, {"env": "math", "answer": "4"}, {"env": "format"}]
    res = env.score([""] * 4, texts, meta)
    np.testing.assert_array_equal(res.rewards, [1.0, 0.5, 0.0, 0.0])
    assert [i["env"] for i in res.info] == ["math", "format", "math", "format"]
    assert res.info[0]["extracted"] == "4" and res.info[3]["format_ok"] is False and "format_ok" not in res.info[0]
    assert res.counts["math/samples"] == 2 and res.counts["format/format_miss"] == 1
    assert res.counts["math/no_answer"] == 0 and res.counts["timeouts"] == 0 and res.counts["errors"] == 0


def test_default_route_and_custom_key():
    a, b = Recorder("A", 0.0), Recorder("B", 10.0)
    env = RoutedEnvironment({"a": a, "b": b}, key="task", default="b")
    prompts, completions, metadata = _batch(["a", None, "b", None], key="task")
    metadata[1]["env"] = "a"  # not the routing key: ignored
    res = env.score(prompts, completions, metadata)
    assert [i["env"] for i in res.info] == ["a", "b", "b", "b"]
    assert a.calls[0][1] == [completions[0]] and b.calls[0][1] == completions[1:]
    np.testing.assert_array_equal(res.rewards, [1, 12, 13, 17])
    assert res.counts["a/samples"] == 1 and res.counts["b/samples"] == 3


def test_unknown_or_missing_route_is_an_error_before_any_scoring():
    a, b = Recorder("A", 0.0), Recorder("B", 0.0)
    env = RoutedEnvironment({"a": a, "b": b})
    prompts, completions, metadata = _batch(["a", "b", "mathh", "a"])
    with pytest.raises(ValueError, match=r"metadata\[2\]\['env'\] is 'mathh'.*valid routes: \['a', 'b'\]"):
        env.score(prompts, completions, metadata)
    prompts, completions, metadata = _batch(["a", None])
    with pytest.raises(ValueError, match=r"metadata\[1\] has no 'env' and no default.*\['a', 'b'\]"):
        env.score(prompts, completions, metadata)
    with pytest.raises(ValueError, match=r"metadata\[0\]\['env'\] is None"):
        env.score([""], [""], [{"env": None}])
    with pytest.raises(ValueError, match=r"metadata\[0\] must be a mapping"):
        env.score([""], [""], ["a"])
    with pytest.raises(ValueError, match="lengths"):
        env.score(["", ""], [""], [{"env": "a"}])
    assert a.calls == [] and b.calls == []


def test_empty_batch_and_bad_route_results():
    a = Recorder("A", 0.0)
    res = RoutedEnvironment({"a": a}).score([], [], [])
    assert res.rewards.shape == (0,) and res.rewards.dtype == np.float32 and res.info == []
    assert res.counts == {"timeouts": 0, "errors": 0, "a/samples": 0} and a.calls == []

    class Short(Recorder):
        def score(self, prompts, completions, metadata):
            out = super().score(prompts, completions, metadata)
            return EnvResult(out.rewards[:-1], out.info[:-1], out.counts)

    with pytest.raises(ValueError, match=r"route 's' returned rewards of shape \(1,\) for 2 samples"):
        RoutedEnvironment({"s": Short("S", 0.0)}).score(["", ""], ["x", "y"], [{"env": "s"}] * 2)


def test_construction_validation():
    with pytest.raises(ValueError, match="non-empty mapping"):
        RoutedEnvironment({})
    with pytest.raises(ValueError, match="route 'b' must be an environment"):
        RoutedEnvironment({"a": Recorder("A", 0), "b": "math"})
    with pytest.raises(ValueError, match=r"default route 'c' is not one of the routes \['a'\]"):
        RoutedEnvironment({"a": Recorder("A", 0)}, default="c")
    with pytest.raises(ValueError, match="'key' must be a non-empty string"):
        RoutedEnvironment({"a": Recorder("A", 0)}, key="")


def test_close_and_context_manager():
    a, b = Recorder("A", 0), Recorder("B", 0)
    with RoutedEnvironment({"a": a, "b": b, "also_a": a, "fmt": FormatEnvironment()}) as env:
        assert env.name == "routed"
    assert a.closed == 1 and b.closed == 1  # a shared environment is closed once


def test_make_environment_routed():
    from ml_collections import ConfigDict

    spec = ConfigDict({"name": "routed", "key": "kind", "default": "fmt", "label": "by_kind", "routes": {
        "math": {"name": "math", "answer_format": "boxed", "num_workers": 0, "sandbox": False},
        "fmt": {"name": "combined", "components": [{"name": "format", "weight": 0.5}]}}})
    env = make_environment(spec)
    assert isinstance(env, RoutedEnvironment) and env.name == "by_kind"
    assert env.key == "kind" and env.default == "fmt" and sorted(env.routes) == ["fmt", "math"]
    assert isinstance(env.routes["math"], MathEnvironment) and env.routes["math"].answer_format == "boxed"
    assert isinstance(env.routes["fmt"], CombinedEnvironment)
    res = env.score(["", ""], [r"\boxed{3}", "<answer>3</answer>"], [{"kind": "math", "answer": "3"}, {}])
    np.testing.assert_allclose(res.rewards, [1.0, 0.5])
    assert res.counts["math/samples"] == 1 and res.counts["fmt/format/format_miss"] == 0

    plain = make_environment({"name": "routed", "routes": {"format": {"name": "format"}}})
    assert plain.key == "env" and plain.default is None and plain.name == "routed"
    with pytest.raises(ValueError, match="unknown key 'routs'.*valid keys.*'routes'"):
        make_environment({"name": "routed", "routs": {"format": {"name": "format"}}})
    with pytest.raises(ValueError, match=r"routes\['math'\] \(math\): unknown key 'timeout'.*timeout_s"):
        make_environment({"name": "routed", "routes": {"math": {"name": "math", "timeout": 5}}})
    with pytest.raises(ValueError, match=r"routes\['m'\]: unknown environment name 'mathh'.*'routed'"):
        make_environment({"name": "routed", "routes": {"m": {"name": "mathh"}}})
    with pytest.raises(ValueError, match=r"routes\['m'\]: missing key 'name'"):
        make_environment({"name": "routed", "routes": {"m": {"answer_format": "boxed"}}})
    with pytest.raises(ValueError, match=r"'default' 'x' is not one of the routes \['format'\]"):
        make_environment({"name": "routed", "default": "x", "routes": {"format": {"name": "format"}}})
    with pytest.raises(ValueError, match="'routes' must be a non-empty mapping"):
        make_environment({"name": "routed", "routes": [{"name": "format"}]})


# --- mixed task sources ------------------------------------------------------------------------------------------


def _key(tasks):
    return sorted(repr((t.messages, t.metadata)) for t in tasks)


def test_mixed_source_loads_both_kinds_interleaved_and_deterministic():
    mixed = load_tasks("gsm8k+rg:chain_sum", num=4, seed=0)
    kinds = [t.metadata["env"] for t in mixed]
    assert sorted(kinds) == ["math"] * 4 + ["reasoning_gym"] * 4
    assert kinds != ["math"] * 4 + ["reasoning_gym"] * 4  # interleaved, not concatenated
    math_tasks = [t for t in mixed if t.metadata["env"] == "math"]
    rg_tasks = [t for t in mixed if t.metadata["env"] == "reasoning_gym"]
    assert _key(math_tasks) == _key(load_tasks("gsm8k", num=4, seed=0))
    assert _key(rg_tasks) == _key(load_tasks("rg:chain_sum", num=4, seed=0))
    assert mixed == load_tasks("gsm8k+rg:chain_sum", num=4, seed=0)
    other = load_tasks("gsm8k+rg:chain_sum", num=4, seed=1)
    assert [t.metadata["env"] for t in other] != kinds
    # the gsm8k part does not depend on the seed (no shuffle): only the order does
    assert [t for t in other if t.metadata["env"] == "math"] != math_tasks
    assert _key([t for t in other if t.metadata["env"] == "math"]) == _key(math_tasks)


def test_mixed_source_shares_arguments_and_gives_part_errors():
    tasks = load_tasks("aime2025 + rg:chain_sum", num=2, seed=5, system_prompt="Be brief.", instruction="Go.",
                       max_terms=2, min_terms=2)
    assert len(tasks) == 4 and all(t.messages[0] == {"role": "system", "content": "Be brief."} for t in tasks)
    assert all(t.messages[-1]["content"].endswith("Go.") for t in tasks)
    rg = [t for t in tasks if t.metadata["env"] == "reasoning_gym"]
    assert len(rg) == 2 and all(t.metadata["rg_entry"]["question"].count("+") + t.metadata["rg_entry"]["question"]
                                .count("-") == 1 for t in rg)  # max_terms=2: one operator
    assert len(load_tasks("aime2025+gsm8k", num=100)) == 30 + 100  # at most num per part
    assert all(MATH_INSTRUCTION in t.messages[-1]["content"] for t in load_tasks("aime2025+gsm8k", num=2))
    with pytest.raises(DataError, match="'nope': not a builtin"):
        load_tasks("gsm8k+nope", num=2)
    with pytest.raises(DataError, match="rg:chain_sum: .*no_such_option"):
        load_tasks("gsm8k+rg:chain_sum", num=2, no_such_option=1)
    with pytest.raises(DataError, match=r"options \['max_terms'\] apply only to reasoning-gym"):
        load_tasks("gsm8k+aime2025", num=2, max_terms=2)
    with pytest.raises(DataError, match="empty part"):
        load_tasks("gsm8k+", num=2)
    with pytest.raises(DataError, match="rg:chain_sum: a procedural source needs num >= 1"):
        load_tasks("gsm8k+rg:chain_sum")


def test_mixed_tasks_scored_by_routed_environment():
    tasks = load_tasks("gsm8k+rg:chain_sum", num=4, seed=0)
    meta = [t.metadata for t in tasks]

    def answer(m, value):  # each kind in the format its own environment reads (wrongly routed: no answer found)
        return f"So the answer is \\boxed{{{value}}}." if m["env"] == "math" else f"Thus <answer>{value}</answer>"

    gold = [answer(m, m["answer"]) for m in meta]
    wrong = [answer(m, int(m["answer"]) + 1) for m in meta]
    env = make_environment({"name": "routed", "routes": {
        "math": {"name": "math", "answer_format": "boxed", "num_workers": 0, "sandbox": False},
        "reasoning_gym": {"name": "reasoning_gym", "num_workers": 0, "sandbox": False}}})
    with env:
        res = env.score([""] * 16, gold + wrong, meta + meta)
    np.testing.assert_array_equal(res.rewards, [1.0] * 8 + [0.0] * 8)
    assert [i["env"] for i in res.info] == [m["env"] for m in meta + meta]
    assert [i["extracted"] for i in res.info[:8]] == [m["answer"] for m in meta]
    assert res.counts["math/samples"] == 8 and res.counts["reasoning_gym/samples"] == 8
    assert res.counts["timeouts"] == 0 and res.counts["errors"] == 0
    assert isinstance(env.routes["reasoning_gym"], ReasoningGymEnvironment)
