"""Review 33 (soak: long runs of the training entry point). The runs themselves were clean (no steady-state
compiles outside the bucket ladders, flat RSS, no leaked threads, descriptors or worker processes); found on the way:
a code task whose row names an `entry_point` but whose tests are plain asserts (MBPP's form) scored 0 for every
program, correct ones included ("NameError: name 'add' is not defined": the entry point is handed to the tests'
check(candidate), which they did not define), so a GRPO run trained on rewards of 0 with no error."""

from __future__ import annotations

import json

import pytest

from jaxrl_llm.data.chat import DataError
from jaxrl_llm.data.tasks import load_tasks


def _write(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_code_row_with_an_entry_point_and_plain_assert_tests_is_refused_naming_the_row(tmp_path):
    ok = {"prompt": "Write add(a, b).", "tests": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}
    plain = {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3\n"}  # no entry point: the program's names
    bad = {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3\n", "entry_point": "add"}
    path = _write(tmp_path, [ok, plain, bad])
    with pytest.raises(DataError, match=r"code\.jsonl: row 2: .*entry_point.*check\(candidate\)"):
        load_tasks(path, 3, 0)
    assert len(load_tasks(_write(tmp_path, [ok, plain]), 2, 0)) == 2


@pytest.mark.parametrize("tests", [
    "def check(candidate):\n    assert candidate(1) == 2\n",
    "import math\n\n\ndef check(f):\n    assert f(1) == 2\n",
    "check = lambda f: f(1) == 2\n",
    "from helpers import check\n",
    "if True:\n    def check(f):\n        assert f(1) == 2\n",
    "def check(f:\n",  # does not parse: running it says why
])
def test_tests_that_bind_check_in_any_form_are_kept(tmp_path, tests):
    row = {"prompt": "Write inc(x).", "tests": tests, "entry_point": "inc"}
    assert load_tasks(_write(tmp_path, [row]), 1, 0)[0].metadata["entry_point"] == "inc"
