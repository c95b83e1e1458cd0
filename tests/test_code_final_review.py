"""Final review of the code reward's default mode (program and tests in two processes, code_split.py) against the
one-process mode (check_returns=False): correct programs of unusual but legitimate tasks must pass in both.

Every row is scored once per mode (module-scoped), so the whole file costs two pool start-ups and two batches.
DEFAULT_FAILS: correct programs the first version of the default mode failed, reproduced; all pass now but
CANNOT_CROSS, which the module doc of code_split.py names.
"""

import pytest

from jaxrl_llm.environments.code import CodeEnvironment

LIST_NODE = ("class ListNode:\n    def __init__(self, val=0, next=None):\n        self.val = val\n"
             "        self.next = next\n")

# name: (program, tests, prelude); the entry point is always f
ROWS = {
    # work in both modes
    "helper_and_class_in_tests": ("def f(x):\n    return x * 2",
                                  "class T:\n    def run(self, c):\n        assert h(c) == 6\n"
                                  "def h(c):\n    return c(3)\ndef check(c):\n    T().run(c)", None),
    "isclose": ("def f(x):\n    return x / 3",
                "import math\ndef check(c):\n    assert math.isclose(c(1), 1 / 3)", None),
    "numpy_argument": ("def f(a):\n    return float(a.sum())",
                       "import numpy as np\ndef check(c):\n    assert c(np.arange(4)) == 6.0", None),
    "signature_kinds": ("def f(a, b=2, *args, k, **kw):\n    return (a, b, args, k, sorted(kw.items()))",
                        "def check(c):\n    assert c(1, k=3) == (1, 2, (), 3, [])\n"
                        "    assert c(1, 5, 6, 7, k=0, z=1) == (1, 5, (6, 7), 0, [('z', 1)])", None),
    "unicode": ("def f(s):\n    return s[::-1]",
                "def check(c):\n    assert c('h\u00e9llo\u2713\U0001f600') == '\U0001f600\u2713oll\u00e9h'\n"
                "    assert c('\\ud800x') == 'x\\ud800'", None),
    "in_place_list": ("def f(xs):\n    xs.sort()",
                      "def check(c):\n    a = [3, 1, 2]\n    c(a)\n    assert a == [1, 2, 3]", None),
    "memory_error_then_next_call": ("def f(x):\n    if x:\n        bytearray(8000 * 2**20)\n    return x",
                                    "def check(c):\n    try:\n        c(1)\n    except MemoryError:\n        pass\n"
                                    "    else:\n        assert False\n    assert c(0) == 0", None),
    "prelude_helper_used_by_program": ("def f(x):\n    return g(x) + 1", "def check(c):\n    assert c(1) == 3",
                                       "def g(x):\n    return 2 * x\n"),
    # correct programs the default mode fails (one-process mode passes them all)
    "numpy_scalar_result": ("import numpy as np\ndef f(xs):\n    return np.mean(xs)",
                            "def check(c):\n    assert c([1, 2, 3]) == 2.0", None),
    "numpy_array_result": ("import numpy as np\ndef f(n):\n    return np.zeros(n)",
                           "import numpy as np\ndef check(c):\n    assert np.array_equal(c(3), [0, 0, 0])", None),
    "numpy_argument_in_place": ("def f(a):\n    a.sort()",
                                "import numpy as np\ndef check(c):\n    a = np.array([3, 1, 2])\n    c(a)\n"
                                "    assert a.tolist() == [1, 2, 3]", None),
    "defaultdict_result": ("from collections import defaultdict\ndef f(s):\n    d = defaultdict(int)\n"
                           "    for ch in s:\n        d[ch] += 1\n    return d",
                           "def check(c):\n    assert c('aab') == {'a': 2, 'b': 1}", None),
    "generator_result": ("def f(n):\n    for i in range(n):\n        yield i * i",
                         "def check(c):\n    assert list(c(3)) == [0, 1, 4]", None),
    "prelude_class_argument": ("def f(node):\n    n = 0\n    while node:\n        n += node.val\n"
                               "        node = node.next\n    return n",
                               "def check(c):\n    assert c(ListNode(1, ListNode(2))) == 3", LIST_NODE),
    "prelude_class_result": ("def f(xs):\n    head = None\n    for x in reversed(xs):\n"
                             "        head = ListNode(x, head)\n    return head",
                             "def check(c):\n    h = c([1, 2])\n    assert (h.val, h.next.val) == (1, 2)", LIST_NODE),
    "function_argument": ("def f(g, xs):\n    return [g(x) for x in xs]",
                          "def check(c):\n    assert c(lambda x: x * 2, [1, 2]) == [2, 4]", None),
    "exception_subclass": ("class Invalid(ValueError):\n    pass\ndef f(x):\n    if x < 0:\n"
                           "        raise Invalid('negative')\n    return x",
                           "def check(c):\n    try:\n        c(-1)\n    except ValueError:\n        pass\n"
                           "    else:\n        assert False", None),
    "keyerror_args": ("def f(d):\n    return d['k']",
                      "def check(c):\n    try:\n        c({})\n    except KeyError as e:\n"
                      "        assert e.args == ('k',)\n    else:\n        assert False", None),
}
DEFAULT_FAILS = {"numpy_scalar_result", "numpy_array_result", "numpy_argument_in_place", "defaultdict_result",
                 "generator_result", "prelude_class_argument", "prelude_class_result", "function_argument",
                 "exception_subclass", "keyerror_args"}  # (the first version of the two-process mode)
CANNOT_CROSS = {"generator_result", "function_argument"}


def _score(**kwargs):
    names = list(ROWS)
    completions = [f"```python\n{ROWS[n][0]}\n```" for n in names]
    metadata = [{"tests": ROWS[n][1], "entry_point": "f", **({"prelude": ROWS[n][2]} if ROWS[n][2] else {})}
                for n in names]
    with CodeEnvironment(timeout_s=10.0, num_workers=1, **kwargs) as env:
        result = env.score([""] * len(names), completions, metadata)
    return dict(zip(names, result.info, strict=True))


@pytest.fixture(scope="module")
def default_mode():
    return _score()


@pytest.fixture(scope="module")
def one_process():
    return _score(check_returns=False)


def test_one_process_mode_passes_every_row(one_process):
    assert {n: i.get("error") for n, i in one_process.items() if not i["passed"]} == {}


@pytest.mark.parametrize("name", [n for n in ROWS if n not in DEFAULT_FAILS])
def test_default_mode_passes(default_mode, name):
    assert default_mode[name]["passed"], default_mode[name]


@pytest.mark.parametrize("name", sorted(DEFAULT_FAILS - CANNOT_CROSS))
def test_default_mode_passes_what_one_process_mode_passes(default_mode, name):
    assert default_mode[name]["passed"], default_mode[name]


@pytest.mark.parametrize("name, error", [("function_argument", "cannot be sent to the program's process"),
                                         ("generator_result", "cannot pickle 'generator' object")])
def test_what_cannot_cross_is_named(default_mode, name, error):
    """Documented in code_split.py: functions and generators do not cross between the processes."""
    assert not default_mode[name]["passed"] and error in default_mode[name]["error"], default_mode[name]


def test_unreadable_package_names_program_packages():
    from jaxrl_llm.environments.landlock import abi_version

    if abi_version() == 0:
        pytest.skip("the kernel has no Landlock: reads are not restricted")
    with CodeEnvironment(timeout_s=10.0, num_workers=1) as env:
        result = env.score([""], ["```python\ndef f(x):\n    return x\n```"],
                           [{"tests": "def check(c):\n    assert c(1) == 1", "entry_point": "f",
                             "prelude": "import sympy\n"}])
    assert "program_packages" in result.info[0].get("error", ""), result.info[0]
