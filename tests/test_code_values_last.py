"""Review of code_values.py (2637bcc): a reply's last pickle (the value) can make prelude instances of its own, through
the `_instance` global, and BUILD any state into them; `_no_callables` checks only the instances of the reply's first
pickle, so a built-in callable set as such an instance's attribute shadowed a prelude method again (t.contains =
complex: every `t.contains(v)` is truthy), and a program that did not solve the task passed. The instance list is
now sealed before the value loads."""

from __future__ import annotations

import pickle

import pytest

from jaxrl_llm.environments import CodeEnvironment, code_values

SHADOW = ("class Tree:\n    def __init__(self):\n        self.items = []\n\n    def contains(self, v):\n"
          "        return v in self.items\n")


def _s(b: bytes) -> bytes:
    return b"\x8c" + bytes([len(b)]) + b


def _shadowing_reply() -> bytes:
    """No instance in the first pickle; ("ok", <a Tree made and BUILT in the value: contains=complex>, (None,), {})
    as the value."""
    tree = (_s(code_values.__name__.encode()) + _s(b"_instance") + b"\x93" + _s(b"Tree") + b"\x85R}"
            + _s(b"items") + b"]s" + _s(b"contains") + _s(b"builtins") + _s(b"complex") + b"\x93sb")
    return b"\x80\x04]." + b"\x80\x04(" + _s(b"ok") + tree + b"N\x85}t."


def test_instances_made_in_the_value_cannot_carry_callables():
    ns: dict = {}
    exec(SHADOW, ns)  # noqa: S102
    with pytest.raises(pickle.UnpicklingError):
        msg, _ = code_values.loads(_shadowing_reply(), {"Tree": ns["Tree"]})
        assert msg[1].contains(3) and msg[1].contains(8)  # (what the tests would see)


HACK = f'''
import jaxrl_llm.environments.code_values as cv

_R = {_shadowing_reply()!r}

def build(xs):
    cv.dumps = lambda *a, **k: (_R, [])  # (the program's process sends what it likes)
    return None
'''


def test_a_program_cannot_pass_by_shadowing_a_method_in_its_own_reply():
    meta = {"prelude": SHADOW + "def build(xs):\n    \"\"\"a Tree holding xs\"\"\"\n", "entry_point": "build",
            "tests": "def check(f):\n    t = f([5, 3, 8])\n    assert t.contains(3) and t.contains(8)\n"}
    with CodeEnvironment(num_workers=1, timeout_s=10) as env:
        r = env.score([""], [f"```python\n{HACK}```"], [meta])
    assert not r.info[0]["passed"], r.info[0]
