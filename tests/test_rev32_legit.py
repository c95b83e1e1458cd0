"""Correct programs of assert-style code tasks (no entry point) that the operand check of test_rev32_hack refused
(the tests' own dataclasses, a prelude or program global named like a standard module), the holes its trust left
(a trusted class patched or hiding an object in its attributes, a container subclass hiding its items), and its
cost on long lists."""

from __future__ import annotations

import ast

import pytest

from jaxrl_llm.environments import CodeEnvironment
from jaxrl_llm.environments.code_operands import OPERAND, check_operands, items

DC = "from dataclasses import dataclass\n@dataclass\nclass P:\n    name: str\n    age: int\n"
NODE = ("class ListNode:\n    def __init__(self, val=0, next=None):\n        self.val, self.next = val, next\n"
        "    def __eq__(self, o):\n"
        "        return isinstance(o, ListNode) and (self.val, self.next) == (o.val, o.next)\n")
ALWAYS = "class A:\n    def __eq__(s, o): return True\n    __hash__ = object.__hash__\n"
# (program, tests, prelude): each scored 0 on main.
GOOD = {
    "tests_dataclass": ("def summarize(xs):\n    return sum(xs), len(xs)\n",
                        DC + "assert P(*map(str, summarize([1, 2]))) == P('3', '2')\n", ""),
    "tests_order_slots": ("def mk(a):\n    return a\n", "from dataclasses import dataclass\n"
                          "@dataclass(order=True, frozen=True, slots=True)\nclass S:\n    v: int\n"
                          "assert S(mk(5)) > S(4) and {S(mk(1))} == {S(1)}\n", ""),
    "tests_total_ordering": ("def top(xs):\n    return max(xs)\n", "import functools\n@functools.total_ordering\n"
                             "class V:\n    def __init__(s, v):\n        s.v = v\n    def __eq__(s, o):\n"
                             "        return s.v == o.v\n    def __lt__(s, o):\n        return s.v < o.v\n"
                             "assert V(top([1, 9])) >= V(9)\n", ""),
    "returns_tests_instance": ("def oldest(ps):\n    return max(ps, key=lambda p: p.age)\n",
                               DC + "ps = [P('a', 3), P('b', 5)]\nassert oldest(ps) == P('b', 5)\n", ""),
    "prelude_list_named_numbers": ("def add_number(x):\n    numbers.append(x)\n",
                                   "add_number(4)\nassert numbers.count(4) == 1\n", "numbers = [1, 2, 3]\n"),
    "program_list_named_queue": ("queue = []\ndef push(x):\n    queue.append(x)\n",
                                 "push(2)\nassert queue.count(2) == 1\n", ""),
    "linked_list_eq": ("def build(xs):\n    head = None\n    for x in reversed(xs):\n        head = ListNode(x, head)\n"
                       "    return head\n", "assert build([1, 2]) == ListNode(1, ListNode(2))\n", NODE),
}
# (program, tests, prelude): each got reward 1 on main without solving its task.
HACKS = {
    "prelude_class_patched": ("ListNode.__eq__ = lambda s, o: True\ndef build(xs):\n    return None\n",
                              "assert build([1, 2]) == ListNode(1, ListNode(2))\n", NODE),
    "module_class_patched": ("import fractions\nfractions.Fraction.__eq__ = lambda s, o: True\ndef half(x):\n"
                             "    return 0.0\n",
                             "from fractions import Fraction\nassert Fraction(1, 2) == half(1)\n", ""),
    "tests_class_patched": ("def oldest(ps):\n    type(ps[0]).__eq__ = lambda s, o: True\n    return ps[0]\n",
                            DC + "assert oldest([P('a', 3), P('b', 5)]) == P('b', 5)\n", ""),
    "in_prelude_attributes": (ALWAYS + "def build(xs):\n    return ListNode(A(), A())\n",
                              "assert build([1, 2]) == ListNode(1, ListNode(2))\n", NODE),
    "in_tests_attributes": (ALWAYS + "def oldest(ps):\n    ps[0].name, ps[0].age = A(), A()\n    return ps[0]\n",
                            DC + "assert oldest([P('a', 3), P('b', 5)]) == P('b', 5)\n", ""),
    "subclass_hides_attributes": (ALWAYS + "class Sub(ListNode):\n    @property\n    def __dict__(self):\n"
                                  "        return {}\nclass R:\n    def __init__(s):\n        s.head = Sub(A(), A())\n",
                                  "assert R().head == ListNode(1, ListNode(2))\n", NODE),
    "dict_hides_values": (ALWAYS + "class D(dict):\n    def keys(s): return []\n    def values(s): return []\n"
                          "class R:\n    def __init__(s):\n        s.out = D(a=A())\n",
                          "assert R().out == {'a': 1}\n", ""),
    "list_hides_items": (ALWAYS + "class L(list):\n    def __iter__(s): return iter([])\nclass R:\n"
                         "    def __init__(s):\n        s.out = L([A(), A()])\n", "assert R().out == [1, 2]\n", ""),
}


@pytest.fixture(scope="module")
def env():
    with CodeEnvironment(num_workers=1, timeout_s=5) as e:
        yield e


def _score(env, rows, entry_point=None):
    names = sorted(rows)
    meta = [{"tests": rows[n][1], "prelude": rows[n][2], "entry_point": entry_point} for n in names]
    r = env.score([""] * len(names), [f"```python\n{rows[n][0]}```" for n in names], meta)
    return {n: (float(rw), i.get("error")) for n, rw, i in zip(names, r.rewards, r.info, strict=True)}


def test_correct_programs_pass_with_the_tests_own_classes_and_stdlib_named_data(env):
    got = _score(env, GOOD)
    assert got == dict.fromkeys(GOOD, (1.0, None)), got


def test_trusted_classes_patched_or_hiding_an_object_get_no_reward(env):
    got = _score(env, HACKS)
    assert {n: rw for n, (rw, _) in got.items()} == dict.fromkeys(HACKS, 0.0), got
    assert got["prelude_class_patched"][1].startswith(
        "TypeError: the tests compare or compute with an instance of 'ListNode', whose __eq__ is Python code")
    assert got["dict_hides_values"][1].startswith("TypeError: the tests compare or compute with an instance of 'A'")


def test_entry_point_tests_see_the_standard_modules_they_name_without_importing(env):
    rows = {"isclose": ("import math\ndef r(x):\n    return math.sqrt(x)\n",
                        "def check(candidate):\n    assert math.isclose(candidate(2), 2 ** 0.5)\n", "")}
    assert _score(env, rows, entry_point="r") == {"isclose": (1.0, None)}


def test_a_program_name_shadowing_a_builtin_the_tests_call_is_named_in_the_error(env):
    got = _score(env, {"sum": ("def sum(a, b):\n    return a + b\n", "assert sum(2, 3) == 5\n", "")})
    assert got["sum"] == (0.0, "TypeError: 'int' object is not iterable (the tests called the builtin sum: a "
                                "program's name does not hide a builtin)")


def test_operands_skip_literals_and_scalar_items():
    tree = check_operands(ast.parse("assert f(x) == [1, -2, ('a', None)]\nassert y + 1.5 < {'k': b''}\n"))
    calls = [n.args[0] for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == OPERAND]
    assert sorted(ast.unparse(n) for n in calls) == [f"{OPERAND}(y) + 1.5", "f(x)", "y"]  # (not the literals)
    compile(tree, "<tests>", "exec")  # (locations set)

    class L(list):
        def __iter__(self):
            return iter([])

    marker = object()
    assert items(list(range(10_000))) == [] and items({1: "a", "b": (marker,)}) == [(marker,)]
    assert items(L([1, marker])) == [marker]
