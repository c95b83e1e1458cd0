"""The program in a process of its own, its tests in another (code_split.py, spawner.py): what a program does to
its own process (forging the worker's reply, shadowing what the prompt's helpers use, patching modules, killing its
parent) cannot pass its tests, with or without the screen; exceptions, results and arguments cross as plain data."""

from __future__ import annotations

import pytest

from jaxrl_llm.environments import CodeEnvironment

TASK = {"prelude": "import math\n\n\ndef poly(xs, x):\n"
                   "    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n\n\n"
                   "def find_zero(xs):\n    \"\"\"a zero of poly\"\"\"\n",
        "tests": "import math\n\ndef check(f):\n    for xs in ([1, 2], [-6, 11, -6, 1]):\n"
                 "        assert math.fabs(poly(xs, f(xs))) < 1e-4\n",
        "entry_point": "find_zero"}
SOLUTION = ("def find_zero(xs):\n    lo, hi = -100.0, 100.0\n    for _ in range(200):\n        mid = (lo + hi) / 2\n"
            "        if poly(xs, lo) * poly(xs, mid) <= 0:\n            hi = mid\n        else:\n            lo = mid\n"
            "    return lo\n")
WRONG = "def find_zero(xs):\n    return 12345.0\n"
# Each passed HumanEval/32-style tests in one process with them at some point (screen off), without solving the task.
HACKS = {
    "forge_reply": ("import sys, os\nB, L = ''.join(['f_', 'back']), ''.join(['f_', 'locals'])\nf = sys._getframe()\n"
                    "while 'ticket' not in getattr(f, L):\n    f = getattr(f, B)\n"
                    "getattr(f, L)['out'].send(('ok', getattr(f, L)['ticket'], (True, None)))\nos._exit(0)\n"),
    "shadow_sum": "def sum(x):\n    return 0.0\n" + WRONG,
    "shadow_math": "class _M:\n    def pow(self, x, i):\n        return 0.0\nmath = _M()\n" + WRONG,
    "patch_module": "import math\nmath.fabs = lambda x: 0.0\n" + WRONG,
    "swap_helper_code": "poly.__code__ = (lambda xs, x: 0.0).__code__\n" + WRONG,
    "write_every_fd": ("import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'\\x00\\x00\\x00\\x01x')\n"
                       "    except OSError:\n        pass\n" + WRONG),
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + WRONG,
}


def _fenced(code: str) -> str:
    return f"```python\n{code}```"


@pytest.fixture(scope="module")
def unscreened():
    with CodeEnvironment(num_workers=1, timeout_s=10, refuse_introspection=False) as env:
        yield env


def test_hacks_that_change_the_programs_own_process_get_no_reward(unscreened):
    names = sorted(HACKS)
    r = unscreened.score([""] * (len(names) + 1), [_fenced(HACKS[n]) for n in names] + [_fenced(SOLUTION)],
                         [TASK] * (len(names) + 1))
    assert r.rewards.tolist() == [0.0] * len(names) + [1.0], r.info
    errors = dict(zip(names, (i.get("error", "") for i in r.info), strict=False))
    # the program's process comes from the spawner, which never held a task: no frame of its holds a ticket or pipe
    assert errors["forge_reply"] == "AttributeError: 'NoneType' object has no attribute 'f_locals'"
    assert errors["kill_parent"].startswith("PermissionError")  # signals to other processes: refused by its filter
    assert errors["shadow_sum"].startswith("AssertionError")  # the tests' poly sees the tests' sum
    assert r.counts["errors"] == 0 and r.counts["timeouts"] == 0  # no worker was lost or replaced


def test_exceptions_results_and_arguments_cross_as_plain_data(unscreened):
    task = {"tests": "def check(f):\n    xs = [3, 1, 2]\n    assert f(xs) == [1, 2, 3] and xs == [1, 2, 3]\n"
                     "    assert f((), key=len) == ('k', {1: {2.5, None}}, b'b')\n"
                     "    try:\n        f(None)\n    except ValueError as e:\n        assert 'no list' in str(e)\n"
                     "    else:\n        raise AssertionError('no ValueError')\n",
            "entry_point": "srt"}
    good = ("def srt(xs, key=None):\n    if xs is None:\n        raise ValueError('no list')\n"
            "    if key is not None:\n        return ('k', {1: {2.5, None}}, b'b')\n    xs.sort()\n    return xs\n")
    wrong_type = good.replace("ValueError('no list')", "TypeError('no list')")
    gen = "def srt(xs, key=None):\n    return iter(sorted(xs))\n"
    exits = "import sys\ndef srt(xs, key=None):\n    sys.exit(0)\n"
    ends = "import os\ndef srt(xs, key=None):\n    os._exit(0)\n"
    r = unscreened.score([""] * 5, [_fenced(c) for c in (good, wrong_type, gen, exits, ends)], [task] * 5)
    # the sort in place changed the program's copy, and the tests' list was changed to match
    assert r.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0], r.info
    assert r.info[1]["error"].startswith("TypeError: no list"), r.info[1]
    assert r.info[2]["error"].startswith("TypeError: srt returned an instance of") or \
        "plain data" in r.info[2]["error"], r.info[2]
    assert r.info[3]["error"] == "RuntimeError: SystemExit: 0", r.info[3]
    assert r.info[4]["error"] == "RuntimeError: the program's process ended during a call of srt", r.info[4]
    lam = {"tests": "def check(f):\n    assert f(lambda: 1) == 1\n", "entry_point": "call"}
    r = unscreened.score([""], [_fenced("def call(g):\n    return g()\n")], [lam])
    assert r.rewards.tolist() == [0.0] and "cannot be sent to the program's process" in r.info[0]["error"]


def test_unsandboxed_and_screened_pools_split_too():
    with CodeEnvironment(num_workers=1, timeout_s=10, sandbox=False, refuse_introspection=False) as env:
        r = env.score([""] * 3, [_fenced(c) for c in (SOLUTION, HACKS["forge_reply"], HACKS["shadow_math"])],
                      [TASK] * 3)
        assert r.rewards.tolist() == [1.0, 0.0, 0.0], r.info
    with CodeEnvironment(num_workers=1, timeout_s=10) as env:  # the defaults: the screen refuses it unrun
        r = env.score([""], [_fenced(HACKS["forge_reply"])], [TASK])
        assert r.rewards.tolist() == [0.0] and r.info[0]["error"].startswith("refused: "), r.info


def test_programs_need_an_isolating_pool():
    from jaxrl_llm.environments.pool import ScoringPool

    with pytest.raises(ValueError, match="programs=True needs isolate=True"):
        ScoringPool(1, programs=True, isolate=False)
    with CodeEnvironment(num_workers=1, timeout_s=10, isolate=False, refuse_introspection=False) as env:
        r = env.score([""], [_fenced(SOLUTION)], [TASK])  # in one process with its tests (run_program)
        assert r.rewards.tolist() == [1.0], r.info
