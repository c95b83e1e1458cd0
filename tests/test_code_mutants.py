"""Tests that kill what mutation testing of the code reward and its sandbox left alive: each refusal of the screen,
tracing set during a call, containers and dict keys of returned values, the builtins snapshot (with and without an
entry point), module patches seen without an entry point, the worker's environment filter, the isolating worker's
check of its child's ticket, tgkill, O_TRUNC / O_CREAT on read-only opens, and the filter on threads started before
confinement (TSYNC); the prompt's helpers that the tests call look up names in the tests' namespace, not the
program's; names imported from sys and os are screened as their attributes are."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

import pytest

from jaxrl_llm.environments import CodeEnvironment
from jaxrl_llm.environments.code import Program, refused_construct, run_program
from jaxrl_llm.environments.pool import ScoringPool, _child_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")


@pytest.fixture(scope="module")
def env():
    with CodeEnvironment(num_workers=1, timeout_s=5.0, refuse_introspection=False) as e:
        yield e


def _passed(env, code, tests, entry_point=None, prelude=None):
    meta = {"tests": tests, **({"entry_point": entry_point} if entry_point else {}),
            **({"prelude": prelude} if prelude else {})}
    r = env.score([""], [f"```python\n{code}\n```"], [meta])
    return bool(r.rewards[0] == 1.0), r.info[0].get("error")


# --- the screen: every entry of the refusal lists, and what it must let through ---------------------------------

@pytest.mark.parametrize("code", [
    "import gc", "import ctypes", "import _ctypes", "import _thread", "import threading", "import multiprocessing",
    "import inspect", "import importlib", "import importlib.util", "from importlib import import_module",
    "import builtins", "import signal", "import atexit", "import faulthandler", "import _signal", "import _io",
    "import multiprocessing.connection",
    "x = f.f_back", "x = f.f_locals", "x = f.f_globals", "x = f.f_builtins", "f.f_trace = 1", "x = f.f_code",
    "x = tb.tb_frame", "x = g.gi_frame", "x = c.cr_frame", "x = a.ag_frame", "import sys\nsys.settrace(None)",
    "import sys\nsys.setprofile(None)", "import sys\nx = sys.monitoring", "import sys\nsys._current_frames()",
    "x = int.__subclasses__()", "x = f.__globals__", "x = f.__code__", "x = f.__closure__", "x = m.__builtins__",
    "import sys\nx = sys.modules", "import os\nos.write(1, b'x')", "import os\nos.dup(1)", "import os\nos.dup2(1, 2)",
    "import os\nos.fdopen(1)", "import os\nos.pipe()", "import os\nos.kill(1, 0)", "x = m.get_objects()",
    "x = m.get_referrers(1)", "x = __builtins__", "__import__('os')", "exec('1')", "compile('1', 'a', 'exec')",
    "globals()", "breakpoint()",
    *[f"x = getattr(o, {name[:3]!r} + {name[3:]!r})" for name in (
        "_getframe", "f_back", "f_locals", "f_globals", "f_builtins", "tb_frame", "gi_frame", "cr_frame", "settrace",
        "setprofile", "_current_frames", "__subclasses__", "__globals__", "__builtins__", "get_objects",
        "get_referrers")],
])
def test_each_refusal_entry_refuses(code):
    assert refused_construct(code) is not None


@pytest.mark.parametrize("code", [
    "import sys\nsys.stdout.write('x')", "f.write('x')", "x = obj.modules", "x = p.kill()", "x = a.pipe",
    "import math, collections, itertools, functools, re, heapq", "x = 'f_code is fine in a string'",
])
def test_screen_lets_ordinary_code_through(code):
    assert refused_construct(code) is None


# --- run_program, in this process (nothing global changed) --------------------------------------------------------

def test_tracing_set_during_a_call_is_cleared_before_the_tests_go_on():
    """A function that sets a tracer on the tests' running frame to jump over their asserts."""
    code = ("import sys\ndef lt(frame, ev, arg):\n    if ev == 'line':\n        try:\n"
            "            frame.f_lineno = max(l for _, _, l in frame.f_code.co_lines() if l)\n"
            "        except Exception:\n            pass\n    return lt\n"
            "def inc(x):\n    f = sys._getframe(1)\n    while f.f_code.co_name != 'check':\n        f = f.f_back\n"
            "    f.f_trace = lt\n    sys.settrace(lambda *a: None)\n    return None\n")
    tests = "def check(f):\n    f(1)\n    assert f(1) == 2\n    pass\n"
    try:
        assert run_program(Program("", code, tests), "inc")[0] is False
    finally:
        sys.settrace(None)


@pytest.mark.parametrize("value", ["[A()]", "(1, [A()])", "{'k': A()}", "{A(): 1}", "{A()}"])
def test_always_equal_objects_inside_returned_containers_are_refused(value):
    program = f"class A:\n    def __eq__(s, o):\n        return True\n    def __hash__(s):\n        return 2\n\n" \
              f"def f(x):\n    return {value}\n"
    ok, err = run_program(Program("", program, "def check(f):\n    assert f(1) == 'anything'"), "f")
    assert not ok and "returned an instance of 'A'" in err, err


# --- in a sandboxed worker (what changes global state) --------------------------------------------------------------

def test_builtins_patched_through_the_module_are_restored_for_the_tests(env):
    patch = "import builtins\nbuiltins.abs = lambda x: 0\n"
    assert _passed(env, patch + "def f(x):\n    return 0\n", "def check(f):\n    assert f(-2) == abs(-2)",
                   "f") == (False, "AssertionError: ")
    assert _passed(env, patch + "n = 0\n", "assert n == abs(-2)") == (False, "AssertionError: ")
    assert _passed(env, "def f(x):\n    return 2\n", "def check(f):\n    assert f(-2) == abs(-2)", "f") == (True, None)


def test_module_patch_is_seen_without_an_entry_point(env):
    code = "import math\nmath.fabs = lambda x: 0.0\nx = 12345.0\n"
    ok, err = _passed(env, code, "import math\nassert math.fabs(x - 3.0) < 1e-6\n")
    assert (ok, err) == (False, "RuntimeError: the program changed math.fabs, which its tests use")


# The prompt's helpers that the tests call (HumanEval/32's poly, /38's encode_cyclic, /50's encode_shift) ran with
# the program's namespace as their globals, so a program that defined `sum`, `len` or `math` there changed them.
_POLY = ("import math\n\n\ndef poly(xs: list, x: float):\n"
         "    return sum([c * math.pow(x, i) for i, c in enumerate(xs)])\n\n\n"
         "def find_zero(xs: list):\n    \"\"\"a zero of poly\"\"\"\n")
_POLY_TESTS = "import math\n\ndef check(f):\n    for xs in ([1, 2], [-6, 11, -6, 1]):\n" \
              "        assert math.fabs(poly(xs, f(xs))) < 1e-4\n"


@pytest.mark.parametrize("code", [
    "def sum(x):\n    return 0.0\n\ndef find_zero(xs):\n    return 12345.0\n",
    "class _M:\n    def pow(self, x, i):\n        return 0.0\nmath = _M()\n\ndef find_zero(xs):\n    return 1.0\n",
    "setattr(poly, '__co' + 'de__', getattr(lambda xs, x: 0.0, '__co' + 'de__'))\n\ndef find_zero(xs):\n    return 7.0",
], ids=["shadow_sum", "shadow_math", "helper_code_swapped"])
@pytest.mark.parametrize("screen", [True, False])
def test_shadowing_what_a_prelude_helper_uses_gets_no_reward(code, screen):
    assert run_program(Program(_POLY, code, _POLY_TESTS), "find_zero", True, screen)[0] is False


_FORGE = ("from sys import _getframe\nimport os\nB, L = ''.join(['f_', 'back']), ''.join(['f_', 'locals'])\n"
          "f = _getframe()\nwhile 'ticket' not in getattr(f, L):\n    f = getattr(f, B)\n"
          "getattr(f, L)['out'].send(('ok', getattr(f, L)['ticket'], (True, None)))\nos._exit(0)\n")


def test_refused_attributes_imported_by_name_are_refused():
    assert refused_construct("from sys import _getframe") == "from sys import _getframe"
    assert refused_construct(_FORGE) == "from sys import _getframe"
    assert refused_construct("from os import write as w") == "from os import write"
    assert refused_construct("from sys import monitoring") == "from sys import monitoring"
    assert refused_construct("from os import *") == "from os import *"
    assert refused_construct("from json import *") is None
    assert refused_construct("from json import dump as write") is None  # (write is refused only on os)
    assert refused_construct("from math import fabs, sqrt") is None


def test_a_real_find_zero_passes_the_helper_tests():
    code = "def find_zero(xs):\n    lo, hi = -100.0, 100.0\n    for _ in range(200):\n        mid = (lo + hi) / 2\n" \
           "        if poly(xs, lo) * poly(xs, mid) <= 0:\n            hi = mid\n" \
           "        else:\n            lo = mid\n    return lo\n"
    assert run_program(Program(_POLY, code, _POLY_TESTS), "find_zero", True, True) == (True, None)


# --- pool and sandbox -----------------------------------------------------------------------------------------------

def test_a_sandboxed_workers_environment_holds_no_credentials(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("WANDB_API_KEY", "wb_secret")
    boxed, free = _child_env(True), _child_env(False)
    assert "HF_TOKEN" not in boxed and "WANDB_API_KEY" not in boxed and "PATH" in boxed and "PYTHONPATH" in boxed
    assert free["HF_TOKEN"] == "hf_secret"


def forge_then_answer() -> int:
    """An isolated sample writing a reply with a ticket of its own choosing on its reply pipe, first."""
    import gc
    from multiprocessing.connection import Connection

    for conn in [o for o in gc.get_objects() if isinstance(o, Connection) and o.writable and not o.closed]:
        conn.send(("ok", "forged", 1))
    return 5


_TGKILL = {"x86_64": 234, "aarch64": 131}


def probe_open(path: str, flags: int) -> str:
    try:
        os.close(os.open(path, flags))
    except OSError as e:
        return errno.errorcode[e.errno]
    return "done"


def probe_tgkill() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    ppid = os.getppid()
    rc = libc.syscall(_TGKILL[platform.machine()], ppid, ppid, 0)
    return "done" if rc == 0 else errno.errorcode[ctypes.get_errno()]


def via_early_thread(what: str) -> str:
    """Hands a probe to a thread the worker started before it confined itself (tests/_early_thread.py)."""
    import socket

    import _early_thread

    _early_thread.jobs.put({"socket": lambda: socket.socket().close()}[what])
    return _early_thread.results.get(timeout=5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mut_code")
    (d / "gold.txt").write_text("42")
    return d


@pytest.fixture(scope="module")
def pool(data_dir):
    with ScoringPool(num_workers=1, timeout_s=10.0, readable=[str(data_dir)]) as p:
        yield p


def test_the_worker_checks_its_childs_ticket(pool):
    out = pool.map(forge_then_answer, [()])[0]
    assert out.status == "error" and "out of turn" in out.error
    assert pool.stats["out_of_turn"] == 0 and pool.stats["replaced"] == 0  # caught in the worker, which stays


@pytest.mark.skipif(platform.machine() not in _TGKILL, reason="x86-64 / aarch64 only")
def test_tgkill_to_another_process_is_refused(pool):
    assert pool.map(probe_tgkill, [()])[0].value == "EPERM"


@pytest.mark.parametrize("flag", ["O_TRUNC", "O_CREAT"])
def test_read_only_opens_that_truncate_or_create_are_refused_by_seccomp(pool, data_dir, flag):
    """Refused by the seccomp filter (EPERM) even where Landlock would also refuse (EACCES) or is missing."""
    target = data_dir / ("gold.txt" if flag == "O_TRUNC" else "new.txt")
    out = pool.map(probe_open, [(str(target), os.O_RDONLY | getattr(os, flag))])[0]
    assert out.value == "EPERM", out
    assert (data_dir / "gold.txt").read_text() == "42" and not (data_dir / "new.txt").exists()


def test_threads_started_before_confinement_are_filtered_too(monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    with ScoringPool(num_workers=1, timeout_s=10.0, isolate=False, preload=("_early_thread",)) as p:
        assert p.map(via_early_thread, [("socket",)])[0].value == "PermissionError"
