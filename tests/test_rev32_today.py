"""Review of the day's commits (rev32): margins read from a CSV file (cells kept as text), and assert-style code
tests that read a global the program's function rebinds."""

from __future__ import annotations

import ml_collections
import pytest

from jaxrl_llm.data import preference as pref


def _config(path):
    return ml_collections.ConfigDict(dict(algorithm="rm", data=dict(
        source=str(path), num_examples=-1, max_len=64, overlong="truncate", chat_template="", cache=False)))


def test_csv_margins_are_read_as_numbers(tokenizer, tmp_path):
    # the CSV reader keeps every cell as its text ("007" stays "007"): a margin column is text there
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\nWhat is 1+1?,It is 2.,It is 3.,0.5\n"
                    "What is 2+2?,It is 4.,It is 5., 2\n")
    pairs, _ = pref.prepare(_config(path), tokenizer)
    assert [p.margin for p in pairs] == [0.5, 2.0]


@pytest.mark.parametrize("cell,match", [("big", "got 'big'"), ("nan", "got 'nan'"), ("inf", "got 'inf'")])
def test_csv_margin_text_that_is_no_finite_number_is_named(tokenizer, tmp_path, cell, match):
    path = tmp_path / "pairs.csv"
    path.write_text(f"prompt,chosen,rejected,margin\nWhat is 1+1?,It is 2.,It is 3.,{cell}\n")
    with pytest.raises(pref.DataError, match=f"row 0: field 'margin' must be a finite number, {match}"):
        pref.prepare(_config(path), tokenizer)


# (program, tests): assert-style tests (no entry point) on globals the program's functions bind; each passed when
# the tests ran in the program's namespace (before 184e2bb), and failed in a namespace of their own (a stale copy).
SHARED_GLOBALS = {
    "function_rebinds_a_counter": ("calls = 0\ndef f():\n    global calls\n    calls += 1\n    return calls\n",
                                   "f()\nf()\nassert calls == 2\n"),
    "function_creates_a_global": ("def setup(n):\n    global CONFIG\n    CONFIG = {'n': n}\n",
                                  "setup(3)\nassert CONFIG == {'n': 3}\n"),
    "rebound_twice": ("total = []\ndef add(x):\n    global total\n    total = total + [x]\n",
                      "add(1)\nassert total == [1]\nadd(2)\nassert total == [1, 2]\n"),
    "rebound_after_an_exception": ("state = 'idle'\ndef run(x):\n    global state\n    state = 'failed'\n"
                                   "    raise ValueError(x)\n",
                                   "try:\n    run(1)\nexcept ValueError:\n    pass\nassert state == 'failed'\n"),
}


@pytest.mark.parametrize("check_returns", [True, False])
@pytest.mark.parametrize("name", sorted(SHARED_GLOBALS))
def test_assert_style_tests_see_the_globals_the_program_rebinds(name, check_returns):
    from jaxrl_llm.environments.code import Program, run_program

    code, tests = SHARED_GLOBALS[name]
    assert run_program(Program("", code, tests), check_returns=check_returns) == (True, None)


@pytest.mark.parametrize("code,tests,prelude", [
    # the tests' own names stay theirs: a call cannot rebind them, nor read them
    ("def f(x):\n    global expected\n    expected = 0\n    return 0\n", "expected = 4\nassert f(2) == expected\n",
     ""),
    ("expected = None\ndef f(x):\n    return expected\n", "expected = 4\nassert f(2) == expected\n", ""),
    ("def f(x):\n    global close\n    close = lambda a, b: True\n    return 0.0\n",
     "def close(a, b):\n    return abs(a - b) < 1e-9\nr = [f(1), f(2)]\n"
     "assert close(r[0], 1.0) and close(r[1], 2.0)\n", ""),
    # nor the prelude's
    ("def f():\n    global TARGET\n    TARGET = 0\n    return 0\n", "assert f() == TARGET\n", "TARGET = 10\n"),
])
def test_a_call_cannot_reach_the_tests_names(code, tests, prelude):
    from jaxrl_llm.environments.code import Program, run_program

    assert run_program(Program(prelude, code, tests))[0] is False


@pytest.mark.parametrize("code,tests", [
    # a call that binds a builtin's or a module's name does not hand the tests a fake one
    ("def f():\n    global len\n    len = lambda x: 3\n    return 1\n", "f()\nassert len([1]) == 1\n"),
    ("class Fake:\n    def isclose(self, *a):\n        return True\ndef f():\n    global math\n    math = Fake()\n"
     "    return 0.0\n", "f()\nassert not math.isclose(f(), 1.0)\n"),
])
def test_a_call_cannot_rebind_what_the_tests_keep_apart(code, tests):
    from jaxrl_llm.environments.code import Program, run_program

    assert run_program(Program("", code, tests)) == (True, None)


ALWAYS = "class A:\n    def __eq__(s, o):\n        return True\n    __hash__ = object.__hash__\n"


# (program, tests): an always-equal object inside a built-in holder the checks did not open (each got reward 1)
@pytest.mark.parametrize("code,tests", [
    (ALWAYS + "import types\ndef f():\n    return types.MappingProxyType({'a': A()})\n", "assert f() == {'a': 1}\n"),
    (ALWAYS + "import types\nclass D(dict):\n    __eq__ = lambda s, o: True\nclass R:\n    def __init__(s):\n"
     "        s.out = types.MappingProxyType(D())\n", "assert R().out == {'a': 1}\n"),
    (ALWAYS + "import types\ndef f():\n    return types.SimpleNamespace(x=A())\n",
     "import types\nassert f() == types.SimpleNamespace(x=1)\n"),
    (ALWAYS + "def f():\n    return slice(A(), None)\n", "assert f() == slice(1, None)\n"),
    (ALWAYS + "import numpy as np\nclass R:\n    def __init__(s):\n"
     "        s.out = np.array([A(), A()], dtype=object)\n",
     "import numpy as np\nassert (R().out == np.array([1, 2])).all()\n"),
])
def test_an_always_equal_object_in_a_builtin_holder_is_refused(code, tests):
    from jaxrl_llm.environments.code import Program, run_program

    passed, error = run_program(Program("", code, tests))
    assert not passed and ("'A'" in error or "'D'" in error), error


@pytest.mark.parametrize("code,tests", [
    ("import types\ndef f():\n    return types.MappingProxyType({'a': [1]})\n", "assert f() == {'a': [1]}\n"),
    ("import types\ndef f():\n    return types.SimpleNamespace(x=[1])\n",
     "import types\nassert f() == types.SimpleNamespace(x=[1])\n"),
    ("import numpy as np\ndef f():\n    return np.array([[1], 'a'], dtype=object)\n",
     "import numpy as np\nassert (f() == np.array([[1], 'a'], dtype=object)).all()\n"),
])
def test_plain_values_in_those_holders_pass(code, tests):
    from jaxrl_llm.environments.code import Program, run_program

    assert run_program(Program("", code, tests)) == (True, None)


def test_margins_are_read_past_a_cache_written_before_they_were(tokenizer, tmp_path, monkeypatch):
    # a workdir's data cache from before margins were read: the same file and settings, its info without margins
    import json

    from jaxrl_llm.data import cache as data_cache

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "chosen": f"It is {2 * i + 2}.",
                                        "rejected": f"It is {i}.", "margin": 1.5 + i}) + "\n" for i in range(3)))
    config = _config(path)
    config.data.cache = True
    seen = {}

    def capture(cache, enabled, kind, source, settings, tok, compute):
        seen.update(settings=settings, out=compute())
        return seen["out"]

    monkeypatch.setattr(pref, "cached", capture)
    pref.prepare(config, tokenizer)
    monkeypatch.undo()
    before = {k: v for k, v in seen["settings"].items() if k != "fields"}  # the settings as they were
    sides, info = seen["out"]
    folder = str(tmp_path / "data_cache")
    data_cache.save(folder, "pairs", data_cache.cache_key("pairs", str(path), before, tokenizer), sides,
                    {k: v for k, v in info.items() if k != "margins"})
    pairs, _ = pref.prepare(config, tokenizer, cache=data_cache.DataCache(folder))
    assert [p.margin for p in pairs] == [1.5, 2.5, 3.5]


@pytest.mark.parametrize("block", ["env", "mesh"])
def test_evaluate_names_a_missing_env_or_mesh_block(block):
    # (env was read after the model loaded, mesh by validate itself: AttributeError tracebacks)
    from recipes import recipe

    from jaxrl_llm import evaluate
    from jaxrl_llm.cli import ConfigError

    c = recipe("eval_tiny")
    del c[block]
    with pytest.raises(ConfigError, match=f"the config has no '{block}' block"):
        evaluate.validate(c)

