"""Review of code_values.py v2 (5260cc4): instances of the prelude's classes inside sets and dict keys (hashed while
still bare on load, fixed by loading each instance's state before its holders), an exception's own attributes, and
a program that shadows the prelude's methods with the built-in callables a reply may carry (refused since)."""

from __future__ import annotations

import pytest

from jaxrl_llm.environments import CodeEnvironment, code_values

FROZEN = "from dataclasses import dataclass\n\n@dataclass(frozen=True)\nclass P:\n    x: int\n\n"
HASHED = ("class P:\n    def __init__(self, x):\n        self.x = x\n\n"
          "    def __eq__(self, o):\n        return self.x == o.x\n\n"
          "    def __hash__(self):\n        return hash(self.x)\n\n")


@pytest.mark.parametrize("prelude", [FROZEN, HASHED], ids=["frozen_dataclass", "own_hash"])
def test_instances_in_sets_and_dict_keys_cross(prelude):
    ns: dict = {}
    exec(prelude, ns)  # noqa: S102
    classes = {"P": ns["P"]}
    P = ns["P"]
    value = ({P(1), P(2)}, frozenset({P(3)}), {P(4): [P(5)]}, [P(6)])
    data, _ = code_values.dumps(value, classes)
    got, insts = code_values.loads(data, classes)
    assert got == value and P(1) in got[0] and P(3) in got[1] and got[2][P(4)] == [P(5)] and len(insts) == 6


def test_nested_hashed_instances_cross():  # a frozen instance holding a frozen instance, in a set
    ns: dict = {}
    exec(FROZEN.replace("x: int", "x: object"), ns)  # noqa: S102
    P = ns["P"]
    value = {P(P(1)), P(P(P(2)))}
    got, _ = code_values.loads(code_values.dumps(value, {"P": P})[0], {"P": P})
    assert got == value and P(P(1)) in got


EXC = ("class Bad(Exception):\n    def __init__(self, code):\n        super().__init__(f'code {code}')\n"
       "        self.code = code\n\ndef g(a):\n    \"\"\"raises Bad(a)\"\"\"\n")
SHADOW = ("class Tree:\n    def __init__(self):\n        self.items = []\n\n    def contains(self, v):\n"
          "        return v in self.items\n\ndef build(xs):\n    \"\"\"a Tree holding xs\"\"\"\n")
CASES = {  # name: (prelude, tests, entry point, completion, passes in one process)
    "set_of_frozen": (FROZEN + "def mk(a):\n    \"\"\"set\"\"\"\n",
                      "def check(f):\n    assert f(3) == {P(0), P(1), P(2)}\n", "mk",
                      "def mk(a):\n    return {P(i) for i in range(a)}\n", True),
    "set_argument": (HASHED + "def g(s):\n    \"\"\"len\"\"\"\n",
                     "def check(f):\n    s = {P(1), P(2)}\n    assert f(s) == 2 and P(1) in s\n", "g",
                     "def g(s):\n    return len(s) if P(1) in s else -1\n", True),
    "exception_attrs": (EXC, "def check(f):\n    try:\n        f(1)\n    except Bad as e:\n"
                             "        assert e.code == 1\n    else:\n        assert False\n", "g",
                        "def g(a):\n    raise Bad(a)\n", True),
    "shadowed_method": (SHADOW, "def check(f):\n    t = f([5, 3, 8])\n    assert t.contains(3) and t.contains(8)\n",
                        "build", "def build(xs):\n    t = Tree()\n    t.contains = complex\n    return t\n", False),
}


@pytest.fixture(scope="module")
def scored():
    names = sorted(CASES)
    metas = [{"prelude": CASES[n][0], "tests": CASES[n][1], "entry_point": CASES[n][2]} for n in names]
    completions = [f"```python\n{CASES[n][3]}```" for n in names]
    with CodeEnvironment(num_workers=1, timeout_s=10) as env:
        r = env.score([""] * len(metas), completions, metas)
    return {n: i["passed"] for n, i in zip(names, r.info, strict=True)}


@pytest.mark.parametrize("name", ["set_of_frozen", "set_argument"])
def test_sets_of_instances_score_as_in_one_process(scored, name):
    assert scored[name] == CASES[name][4]


def test_exception_attributes_cross(scored):
    assert scored["exception_attrs"]


def test_methods_cannot_be_shadowed_by_builtin_callables(scored):
    assert not scored["shadowed_method"]
