"""Reward hacks a policy finds without solving its task: code tasks without an entry point (the program runs in its
tests' process), an audit hook that reads the tests, and reasoning-gym datasets whose scorer pays one answer for every
task; with the correct programs and answers that must still pass."""

from __future__ import annotations

import contextlib
import io

import pytest

from jaxrl_llm.environments import CodeEnvironment
from jaxrl_llm.environments.code import refused_construct

ALWAYS = ("class A:\n    def __eq__(s, o): return True\n    def __sub__(s, o): return 0\n"
          "    __hash__ = object.__hash__\n")
# Each got reward 1 on assert-style tests (no entry point) without solving the task.
HACKS = {
    "class_equal": ("class add:\n    def __init__(s, *a): pass\n    def __eq__(s, o): return True\n",
                    "assert add(1, 2) == 3\n"),
    "callable_object": (ALWAYS + "class F:\n    def __call__(s, *a): return A()\nadd = F()\n",
                        "assert add(1, 2) == 3\n"),
    "partial": (ALWAYS + "import functools\ndef g(a, b, c): return A()\nadd = functools.partial(g, c=0)\n",
                "assert add(1, 2) == 3\n"),
    "attribute": (ALWAYS + "class Stack:\n    def __init__(s):\n        s.top = A()\n", "assert Stack().top == 5\n"),
    "difference": (ALWAYS + "class add:\n    def __init__(s, *a): pass\n    __sub__ = A.__sub__\n",
                   "assert abs(add(1, 2) - 3.5) < 1e-9\n"),
    "str_subclass": ("class S(str):\n    def __eq__(s, o): return True\n    __hash__ = str.__hash__\n"
                     "class add:\n    def __init__(s, *a): pass\n    def __str__(s): return S('no')\n",
                     "assert str(add(1, 2)) == '3'\n"),
    "scalar_lookalike": ("class M(type):\n    __hash__ = lambda c: hash(int)\n    __eq__ = lambda c, o: True\n"
                         "class add(metaclass=M):\n    def __init__(s, *a): pass\n    def __eq__(s, o): return True\n",
                         "assert add(1, 2) == 3\n"),  # its class equal to int, to a set lookup
    "shadow_len": ("def len(x):\n    return 3\ndef add(a, b):\n    return []\n", "assert len(add(1, 2)) == 3\n"),
    "shadow_all": ("def all(x):\n    return True\ndef add(a, b):\n    return 0\n",
                   "assert all(add(x, 1) == x + 1 for x in range(3))\n"),
    "fake_module": ("class _M:\n    def isclose(s, *a, **k): return True\nmath = _M()\n"
                    "def add(a, b):\n    return 0.0\n",
                    "assert math.isclose(add(1, 2), 3.0)\n"),
    "patched_module": ("import math\nmath.isclose = lambda *a, **k: True\ndef add(a, b):\n    return 0.0\n",
                       "assert math.isclose(add(1, 2), 3.0)\n"),
    "module_class": ("import math\nclass M(type(math)):\n    def __getattribute__(s, n):\n"
                     "        return (lambda *a, **k: True) if n == 'isclose' else object.__getattribute__(s, n)\n"
                     "math.__class__ = M\ndef add(a, b):\n    return 0.0\n",
                     "import math\nassert math.isclose(add(1, 2), 3.0)\n"),
    "audit_hook": ("import sys\nANS = {}\ndef hook(event, args):\n    if event == 'exec':\n"
                   "        ANS[(1, 2)] = [c for c in args[0].co_consts if isinstance(c, int)][-1]\n"
                   "sys.addaudithook(hook)\ndef add(a, b):\n    return ANS.get((a, b), 0)\n",
                   "assert add(1, 2) == 3\n"),
}
# Correct programs of assert-style tasks, which must keep passing (helper_node scored 0: its own helper's result was
# checked as if the tests had called it).
GOOD = {
    "helper_node": ("import heapq\nclass Node:\n    def __init__(s, v):\n        s.v = v\n    def __lt__(s, o):\n"
                    "        return s.v < o.v\ndef make(v):\n    return Node(v)\ndef smallest(xs):\n"
                    "    h = [make(x) for x in xs]\n    heapq.heapify(h)\n    return h[0].v\n",
                    "assert smallest([3, 1, 2]) == 1\n"),
    "solution_class": ("class Solution:\n    def twoSum(self, nums, t):\n        seen = {}\n"
                       "        for i, x in enumerate(nums):\n            if t - x in seen:\n"
                       "                return [seen[t - x], i]\n            seen[x] = i\n",
                       "assert Solution().twoSum([2, 7, 11], 9) == [0, 1]\n"),
    "stack": ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
              "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n"
              "    def __len__(self):\n        return len(self.items)\n",
              "s = Stack()\ns.push(1)\nassert len(s) == 1 and s.pop() == 1\n"),
    "tests_own_class": ("def f(x):\n    return 3.0000001\n",
                        "class Approx:\n    def __init__(s, v):\n        s.v = v\n    def __eq__(s, o):\n"
                        "        return abs(s.v - o) < 1e-3\nassert f(1) == Approx(3.0)\n"),
    "fraction": ("def f(a, b):\n    return a / b\n",
                 "from fractions import Fraction\nassert abs(f(1, 3) - Fraction(1, 3)) < 1e-9\n"),
    "namedtuple": ("def f():\n    return (1, 2)\n",
                   "from collections import namedtuple\nP = namedtuple('P', 'x y')\nassert f() == P(1, 2)\n"),
    "math_from_program": ("import math\ndef f(r):\n    return math.pi * r * r\n",
                          "assert math.isclose(f(1), 3.14159, rel_tol=1e-3)\n"),
    "program_constant": ("LIMIT = 7\n", "assert LIMIT + 1 == 8\n"),
}


@pytest.fixture(scope="module")
def env():
    with CodeEnvironment(num_workers=1, timeout_s=5) as e:
        yield e


def _score(env, rows):
    names = sorted(rows)
    r = env.score([""] * len(names), [f"```python\n{rows[n][0]}```" for n in names],
                  [{"tests": rows[n][1]} for n in names])
    return {n: (float(rw), i.get("error")) for n, rw, i in zip(names, r.rewards, r.info, strict=True)}


def test_assert_style_hacks_get_no_reward(env):
    got = _score(env, HACKS)
    assert {n: rw for n, (rw, _) in got.items()} == dict.fromkeys(HACKS, 0.0), got
    assert got["class_equal"][1].startswith("TypeError: the tests compare or compute with an instance of 'add'")
    assert got["module_class"][1] == "RuntimeError: the program replaced the module math, which its tests use"
    assert got["patched_module"][1] == "RuntimeError: the program changed math.isclose, which its tests use"
    assert got["audit_hook"][1].startswith("refused: the program uses the attribute addaudithook")


def test_assert_style_correct_programs_pass(env):
    got = _score(env, GOOD)
    assert got == dict.fromkeys(GOOD, (1.0, None)), got


def test_one_process_entry_point_mode_catches_a_swapped_module_class():
    code, _ = HACKS["module_class"]
    tests = "import math\n\ndef check(f):\n    assert math.isclose(f(1, 2), 3.0)\n"
    with CodeEnvironment(num_workers=1, timeout_s=5, isolate=False) as env:
        r = env.score([""], [f"```python\n{code}```"], [{"tests": tests, "entry_point": "add"}])
    assert r.rewards.tolist() == [0.0]
    assert r.info[0]["error"] == "RuntimeError: the program replaced the module math, which its tests use"


def test_audit_hooks_are_refused_also_by_a_built_name():
    assert refused_construct("import sys\nsys.addaudithook(print)") == "the attribute addaudithook"
    assert refused_construct("import sys\ngetattr(sys, 'addaudit' + 'hook')(print)") == "the string 'addaudithook'"


# --- reasoning-gym -----------------------------------------------------------------------------------------------

def _rg(name, n, seed=3):
    rg = pytest.importorskip("reasoning_gym")
    from jaxrl_llm.environments.procedural import _scorer, decode_entry, encode_entry

    ds = rg.create_dataset(name, size=n, seed=seed)
    return _scorer(name), [decode_entry(encode_entry(ds[i])) for i in range(n)]


def _quiet(score, answer, entry):
    with contextlib.redirect_stdout(io.StringIO()):  # puzzle24's scorer prints
        return score(answer, entry)


def test_puzzle24_needs_the_puzzles_own_numbers():
    score, entries = _rg("puzzle24", 3)
    for e in entries:
        assert _quiet(score, "1*2*3*4", e) == 0.01  # any four numbers that make 24 were 1.0 for every puzzle
        assert _quiet(score, e["answer"], e) == 1.0
    e = {"answer": "", "metadata": {"numbers": [3, 3, 8, 8]}}
    assert _quiet(score, "8 / (3 - 8 / 3)", e) == 1.0  # exact fractions
    assert _quiet(score, "8 * 3 + 3 / 8", e) == 0.01  # 24.375: int() made it 24


def test_coin_flip_zero_is_not_every_probability():
    score, entries = _rg("coin_flip", 6)
    for e in entries:
        if float(e["answer"]) < 1:
            assert score("0", e) < 0.2, e["answer"]  # 1.0 before: "0" matched the gold's first digit, of one
        assert score(e["answer"], e) == 1.0
    tiny = {"answer": "3.0517578125e-05"}
    assert score("0", tiny) == 0.0 and score("0.0000305", tiny) == 1.0  # 0 was within its absolute 1e-4


def test_game_of_life_halting_needs_the_right_word():
    score, entries = _rg("game_of_life_halting", 4)
    for e in entries:
        wrong = "False" if e["answer"] == "True" else "True"
        assert score(wrong, e) == 0.0 and score("anything", e) == 0.0  # any non-empty answer was 1.0
        assert score(e["answer"], e) == 1.0 and score(e["answer"].lower(), e) == 1.0
