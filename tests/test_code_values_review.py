"""Review of code_values.py / code_split.py (the two-process transport): crafted pickles the tests' side refuses,
and what the transport lost or let through compared with running the program in its tests' process (each reproduced
on the first version of code_values.py, and passing since)."""

from __future__ import annotations

import pickle

import pytest

from jaxrl_llm.environments import CodeEnvironment, code_values

_MOD = code_values.__name__.encode()


def _global(module: bytes, name: bytes) -> bytes:
    return b"\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93"


@pytest.mark.parametrize("data", [
    b"cos\nsystem\n(S'true'\ntR.",  # GLOBAL + REDUCE
    b"(S'true'\nios\nsystem\n.",  # INST
    b"\x80\x02cos\nsystem\n(S'x'\no.",  # OBJ
    b"Pabc\n.",  # PERSID
    b"\x80\x02X\x01\x00\x00\x00aQ.",  # BINPERSID
    b"\x80\x04" + _global(b"builtins", b"getattr") + b".",  # STACK_GLOBAL
    b"\x80\x04" + _global(_MOD, b"_instance") + b"\x8c\x03Foo\x85R.",  # not a prelude class
    b"\x80\x04" + _global(_MOD, b"_ndarray") + b"\x8c\x02|O)C\x08\x00\x00\x00\x00\x00\x00\x00\x00\x87R.",
    b"\x80\x04" + _global(_MOD, b"_ndarray") + b"\x8c\x01T)C\x10" + b"\x01" * 16 + b"\x87R.",  # StringDType
])
def test_crafted_pickles_are_refused(data):
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        code_values.loads(data, {})


def test_build_cannot_change_the_receivers_functions():
    data = b"\x80\x05" + _global(_MOD, b"_ndarray") + b"N}\x8c\x0c__qualname__\x8c\x03zzz" + b"s\x86b."
    try:
        with pytest.raises(pickle.UnpicklingError):
            code_values.loads(data, {})
    finally:
        poisoned = code_values._ndarray.__qualname__ != "_ndarray"
        code_values._ndarray.__qualname__ = "_ndarray"
    assert not poisoned


LN = "class ListNode:\n    def __init__(self, val=0, next=None):\n        self.val = val\n        self.next = next\n\n"
HELP = ("def build(xs):\n    head = None\n    for x in reversed(xs):\n        head = ListNode(x, head)\n"
        "    return head\n\n"
        "def to_list(h):\n    out = []\n    while h is not None:\n        out.append(h.val)\n        h = h.next\n"
        "    return out\n\n")
# name: (prelude, tests, entry point, a correct solution); each passes in one process (check_returns=False)
CASES = {
    "cycles": (LN + "def has_cycle(head):\n    \"\"\"cycle\"\"\"\n",
               HELP + "def check(f):\n    h = build([1, 2, 3, 4])\n    h.next.next.next.next = h.next\n"
                      "    assert f(h) is True and f(build([1, 2])) is False\n    c = f(None, 3)\n"
                      "    assert c.next.next.next is c and c.next.val == 1\n",
               "has_cycle",
               "def has_cycle(head, make=0):\n    if make:\n        h = t = ListNode(0)\n"
               "        for i in range(1, make):\n            t.next = ListNode(i)\n            t = t.next\n"
               "        t.next = h\n        return h\n    seen = set()\n    while head:\n"
               "        if id(head) in seen:\n            return True\n        seen.add(id(head))\n"
               "        head = head.next\n    return False\n"),
    "short_list": (LN + "def reverse(head):\n    \"\"\"reverse\"\"\"\n",
                   HELP + "def check(f):\n    assert to_list(f(build([1, 2, 3]))) == [3, 2, 1]\n",
                   "reverse", "def reverse(head):\n    prev = None\n    while head:\n"
                              "        head.next, prev, head = prev, head, head.next\n    return prev\n"),
    "long_list": (LN + "def reverse(head):\n    \"\"\"reverse\"\"\"\n",
                  HELP + "def check(f):\n    xs = list(range(5000))\n    assert to_list(f(build(xs))) == xs[::-1]\n",
                  "reverse", "def reverse(head):\n    prev = None\n    while head:\n"
                             "        head.next, prev, head = prev, head, head.next\n    return prev\n"),
    "in_place": (LN + "def reorder(head):\n    \"\"\"in place: 1,2,3,4 -> 1,4,2,3; returns None\"\"\"\n",
                 HELP + "def check(f):\n    h = build([1, 2, 3, 4])\n    assert f(h) is None\n"
                        "    assert to_list(h) == [1, 4, 2, 3]\n",
                 "reorder", "def reorder(head):\n    xs = []\n    while head:\n        xs.append(head)\n"
                            "        head = head.next\n"
                            "    order = [x for p in zip(xs, xs[::-1]) for x in p][:len(xs)]\n"
                            "    for a, b in zip(order, order[1:]):\n        a.next = b\n    order[-1].next = None\n"),
    "slots": ("class P:\n    __slots__ = ('x', 'y')\n\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n"
              "def mk(a):\n    \"\"\"P\"\"\"\n",
              "def check(f):\n    p = f(2)\n    assert (p.x, p.y) == (2, 3)\n", "mk",
              "def mk(a):\n    return P(a, a + 1)\n"),
    "namedtuple": ("from typing import NamedTuple\n\nclass P(NamedTuple):\n    x: int\n    y: int\n\n"
                   "def mk(a):\n    \"\"\"P\"\"\"\n",
                   "def check(f):\n    assert f(2) == P(2, 3)\n", "mk", "def mk(a):\n    return P(a, a + 1)\n"),
    "enum": ("import enum\n\nclass Color(enum.Enum):\n    RED = 1\n    BLUE = 2\n\n"
             "def pick(a):\n    \"\"\"Color\"\"\"\n",
             "def check(f):\n    assert f(1) == Color.RED and f(2) is Color.BLUE\n", "pick",
             "def pick(a):\n    return Color(a)\n"),
    "list_subclass": ("class Stack(list):\n    pass\n\ndef mk(a):\n    \"\"\"Stack\"\"\"\n",
                      "def check(f):\n    assert f(2) == [0, 1]\n", "mk",
                      "def mk(a):\n    s = Stack()\n    s.extend(range(a))\n    return s\n"),
    "frozen_dataclass": ("from dataclasses import dataclass\n\n@dataclass(frozen=True)\n"
                         "class P:\n    x: int\n    y: int\n\n"
                         "def mk(a):\n    \"\"\"P\"\"\"\n",
                         "def check(f):\n    assert f(2) == P(2, 3)\n", "mk", "def mk(a):\n    return P(a, a + 1)\n"),
    "numpy": ("import numpy as np\n\ndef f(a):\n    \"\"\"sorts a in place, returns its sum as float32\"\"\"\n",
              "import numpy as np\n\ndef check(f):\n    a = np.array([3, 1, 2])\n"
              "    assert f(a) == np.float32(6) and a.tolist() == [1, 2, 3]\n", "f",
              "def f(a):\n    a.sort()\n    return np.float32(a.sum())\n"),
}
CANNOT_CROSS = {"namedtuple", "enum", "list_subclass"}  # a built-in base or a __new__ of its own: refused, named
# A program that raises an exception class of the tests' own (not the prelude's) by name: the tests catch it.
HACK_TASK = {"prelude": "def g(x):\n    \"\"\"x * 2\"\"\"\n", "entry_point": "g",
             "tests": "class Skip(Exception):\n    pass\n\ndef check(f):\n    try:\n        assert f(2) == 4\n"
                      "    except Skip:\n        return\n    assert f(3) == 6\n"}
HACK = "class Skip(Exception):\n    pass\n\ndef g(x):\n    raise Skip()\n"


@pytest.fixture(scope="module")
def scored():
    names = sorted(CASES)
    metas = [{"prelude": CASES[n][0], "tests": CASES[n][1], "entry_point": CASES[n][2]} for n in names] + [HACK_TASK]
    completions = [f"```python\n{CASES[n][3]}```" for n in names] + [f"```python\n{HACK}```"]
    with CodeEnvironment(num_workers=1, timeout_s=10) as env:
        r = env.score([""] * len(metas), completions, metas)
    return dict(zip([*names, "hack"], r.info, strict=True))


@pytest.mark.parametrize("name", sorted(set(CASES) - CANNOT_CROSS))
def test_prelude_classes_and_numpy_cross_as_in_one_process(scored, name):
    assert scored[name]["passed"], scored[name]


@pytest.mark.parametrize("name", sorted(CANNOT_CROSS))
def test_prelude_classes_that_cannot_cross_are_named(scored, name):
    assert not scored[name]["passed"] and "cannot cross between the processes" in scored[name]["error"], scored[name]


def test_program_cannot_raise_the_tests_own_exception_class(scored):
    assert not scored["hack"]["passed"]
