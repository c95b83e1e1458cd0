"""Code rewards and the read-restricted scoring sandbox, from a review: correct programs with annotations,
dataclasses and the prelude's classes pass; programs that patch a module the tests use, or return always-equal
objects without an entry point, fail; Landlock under older ABIs, without Landlock, with isolate=False (the worker's
own thread), and with a scorer package found by an editable-install hook."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from jaxrl_llm.environments import landlock
from jaxrl_llm.environments.code import Program, run_program

_LINUX_LANDLOCK = sys.platform == "linux" and landlock.abi_version() > 0


# --- code.py: annotations, dataclasses, the prelude's classes, patched modules -----------------------------------

def test_program_annotations_are_not_postponed():
    ok, err = run_program(Program("", "def f(x: int) -> int:\n    return x\n",
                                  "def check(g):\n    assert g.__annotations__ == {'x': int, 'return': int}"), "f")
    assert ok, err


def test_program_with_a_dataclass_helper_passes():
    solution = textwrap.dedent("""\
        from dataclasses import dataclass

        @dataclass
        class Item:
            weight: int
            value: int

        def best(pairs):
            return max(Item(*p).value for p in pairs)
        """)
    ok, err = run_program(Program("", solution, "def check(f):\n    assert f([(1, 2), (3, 4)]) == 4"), "best")
    assert ok, err


def test_program_with_future_annotations_and_a_dataclass_passes():
    solution = ("from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\nclass I:\n"
                "    w: int\n\ndef f():\n    return I(1).w\n")
    ok, err = run_program(Program("", solution, "def check(g):\n    assert g() == 1"), "f")
    assert ok, err


_PRELUDE_EXC = ("class InvalidInput(ValueError):\n    pass\n\n\n"
                "def isqrt(n):\n    \"\"\"raise InvalidInput if n < 0\"\"\"\n")


def test_prelude_exception_class_is_the_same_for_program_and_tests():
    """The prelude runs once: the class the program raises is the one the tests catch (they ran it again)."""
    solution = "import math\n\ndef isqrt(n):\n    if n < 0:\n        raise InvalidInput(n)\n    return math.isqrt(n)\n"
    tests = ("def check(f):\n    assert f(9) == 3\n    try:\n        f(-1)\n"
             "    except InvalidInput:\n        return\n    assert False\n")
    ok, err = run_program(Program(_PRELUDE_EXC, solution, tests), "isqrt")
    assert ok, err
    point = "from dataclasses import dataclass\n\n@dataclass\nclass P:\n    x: int\n\ndef mk(x):\n    \"\"\"a P\"\"\"\n"
    ok, err = run_program(Program(point, "def mk(x):\n    return P(x)\n", "def check(f):\n    assert f(1) == P(1)"),
                          "mk")
    assert ok, err  # the prelude's own classes may be returned


def test_program_cannot_patch_modules_the_tests_use(monkeypatch):
    import math

    monkeypatch.setattr(math, "fabs", math.fabs)  # put back after: the programs below patch it in this process
    prelude = "import math\n\n\ndef poly(xs, x):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n"
    solution = "import math\nmath.fabs = lambda x: 0.0\n\ndef find_zero(xs):\n    return 12345.0\n"
    tests = "import math\n\ndef check(f):\n    assert math.fabs(poly([1, 2], f([1, 2]))) < 1e-4\n"
    ok, err = run_program(Program(prelude, solution, tests), "find_zero")
    assert (ok, err) == (False, "RuntimeError: the program changed math.fabs, which its tests use")
    late = "import math\n\ndef find_zero(xs):\n    math.fabs = lambda x: 0.0\n    return 12345.0\n"  # in a call
    assert run_program(Program(prelude, late, tests), "find_zero")[0] is False


def test_always_equal_object_is_refused_with_an_entry_point():
    solution = "class A:\n    def __eq__(self, o):\n        return True\n\ndef inc(x):\n    return A()\n"
    ok, err = run_program(Program("", solution, "def check(f):\n    assert f(1) == 2"), "inc")
    assert not ok and "returned an instance" in err


def test_always_equal_object_is_refused_without_an_entry_point():
    solution = "class A:\n    def __eq__(self, o):\n        return True\n\ndef inc(x):\n    return A()\n"
    ok, _ = run_program(Program("", solution, "assert inc(1) == 2\nassert inc(5) == 6\n"), None)
    assert not ok


# --- Landlock --------------------------------------------------------------------------------------------------

def _read(path):
    with open(path, "rb") as f:
        return f.read(16)


def test_readable_paths_leave_out_home_and_its_parents(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / "proj").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    import sysconfig
    sysconfig.get_paths()  # its data module is imported before sys.path is replaced
    monkeypatch.setattr(sys, "path", [str(home), str(tmp_path), str(home / "proj"), "/"])
    paths = landlock.readable_paths()
    assert str(home) not in paths and str(tmp_path) not in paths and "/" not in paths
    assert str(home / "proj") in paths


def test_restrict_reads_is_a_no_op_without_landlock(monkeypatch):
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    assert landlock.restrict_reads(["/nonexistent"]) == 0


@pytest.mark.skipif(not _LINUX_LANDLOCK, reason="needs a kernel with Landlock")
@pytest.mark.parametrize("abi", [1, 2, 3, 4, 5])
def test_older_abis_restrict_reads(monkeypatch, abi):
    from jaxrl_llm.environments.pool import ScoringPool
    monkeypatch.setenv("PYTHON_LANDLOCK_ABI", str(abi))  # PYTHON* reaches a sandboxed worker
    here = os.path.dirname(os.path.abspath(__file__))
    shim = os.path.join(here, "landlock_abi_shim")
    monkeypatch.syspath_prepend(shim)
    with ScoringPool(1, 10.0) as pool:
        bad, good = pool.map(_read, [(f"/proc/{os.getpid()}/environ",), (os.__file__,)])
    assert bad.status == "error" and "Permission denied" in bad.error
    assert good.status == "ok"


@pytest.mark.skipif(not _LINUX_LANDLOCK, reason="needs a kernel with Landlock")
def test_isolate_false_sample_cannot_read_trainer_environ_through_the_watch_thread():
    from jaxrl_llm.environments.code import CodeEnvironment
    prog = textwrap.dedent("""\
        import time, os
        _sleep = time.sleep
        box = []
        def hook(s):
            if not box:
                try:
                    box.append(len(open("/proc/%d/environ" % os.getppid(), "rb").read()))
                except Exception:
                    box.append(-1)
            _sleep(s)
        time.sleep = hook
        def leak():
            t = time.monotonic()
            while not box and time.monotonic() - t < 3:
                pass
            return box[0] if box else -2
        """)
    with CodeEnvironment(num_workers=1, timeout_s=8, isolate=False) as env:
        r = env.score(["p"], ["```python\n" + prog + "```"], [{"tests": "def check(f):\n    assert f() > 0",
                                                               "entry_point": "leak"}])
    assert r.rewards[0] == 0.0, "the sample read the trainer's /proc/<pid>/environ"


@pytest.mark.skipif(not _LINUX_LANDLOCK, reason="needs a kernel with Landlock")
def test_scorer_from_an_editable_install_finder_loads(tmp_path):
    import subprocess
    pkg = tmp_path / "src" / "drscorer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def double(x):\n    return 2 * x\n")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import sys, importlib.util
        class _EditableFinder:
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name == "drscorer":
                    return importlib.util.spec_from_file_location(
                        name, {str(pkg / '__init__.py')!r}, submodule_search_locations=[{str(pkg)!r}])
        sys.meta_path.insert(0, _EditableFinder)
        """))
    script = ("import drscorer\nfrom jaxrl_llm.environments.pool import ScoringPool\n"
              "with ScoringPool(1, 10.0) as pool:\n    o = pool.map(drscorer.double, [(21,)])[0]\n"
              "print(o.status, o.value, o.error)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, str(site)])}
    run_dir = tmp_path / "run"  # the working directory (on sys.path) does not hold the package
    run_dir.mkdir()
    out = subprocess.run([sys.executable, "-c", script], cwd=str(run_dir), env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().startswith("ok 42"), out.stdout + out.stderr


def test_programs_that_print_warn_or_set_limits_pass_when_the_tests_import_sys():
    """The watch on the tests' modules sees sys.stdout as redirected for the program, not as a change of it."""
    tests = "import sys, random, warnings\nrandom.seed(1)\n\ndef check(g):\n    assert g() == 1\n"
    program = ("import sys, warnings\nsys.setrecursionlimit(5000)\nwarnings.warn('x')\n\n"
               "def f():\n    print('hi', file=sys.stderr)\n    return 1\n")
    assert run_program(Program("", program, tests), "f") == (True, None)
