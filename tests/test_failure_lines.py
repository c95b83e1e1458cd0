"""failure_lines.py (registered by conftest.py): the first failures' reasons are printed as they happen, before the
final summary, in one process and under pytest-xdist."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

FAILING = '''
import pytest

@pytest.fixture
def full_disk():
    raise OSError(28, "No space left on device")

def test_a(full_disk):
    pass

def test_b():
    assert 1 == 2, "one is not two"

@pytest.mark.parametrize("i", range(5))
def test_more(i):
    raise RuntimeError(f"failure {i}")

def test_fine():
    pass
'''

# conftest.py itself is what registers the plugin: a conftest beside the failing tests takes its pytest_configure
CONFTEST = f'''
import importlib.util, sys
sys.path.insert(0, {HERE!r})
_spec = importlib.util.spec_from_file_location("the_tests_conftest", {os.path.join(HERE, "conftest.py")!r})
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
pytest_configure = _mod.pytest_configure
'''


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one_process", "xdist"])
def test_the_first_failures_are_said_before_the_summary(tmp_path, workers):
    (tmp_path / "test_failing.py").write_text(FAILING)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                        *workers, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    head = r.stdout.split("= ERRORS =")[0].split("= FAILURES =")[0]  # what comes before the final sections
    lines = [line for line in head.splitlines() if line.startswith("[") and " failed] " in line]
    said = [line.removesuffix(" (the first 5 failures are said as they happen)") for line in lines]
    every = ["[setup failed] test_failing.py::test_a: OSError: [Errno 28] No space left on device",
             "[call failed] test_failing.py::test_b: AssertionError: one is not two",
             *[f"[call failed] test_failing.py::test_more[{i}]: RuntimeError: failure {i}" for i in range(5)]]
    assert len(said) == 5 and len(set(said)) == 5 and set(said) <= set(every), r.stdout  # the first 5 of 7
    assert lines[-1] != said[-1] and lines[:-1] == said[:-1]  # the last one says that the rest are not
    if not workers:  # one process: in the tests' order
        assert said == every[:5], r.stdout
    assert "6 failed, 1 passed, 1 error" in r.stdout


def test_reason_of_a_crash_a_bare_text_and_an_empty_one():
    """A report with a crash says its message's first line; a bare text (an xdist worker that died: no crash object)
    its last line; nothing to say at all, '?' (it raised IndexError inside the report hook); at most 300 characters."""
    from types import SimpleNamespace

    from failure_lines import FailureLines

    def report(longrepr):
        return SimpleNamespace(longrepr=longrepr)

    crash = SimpleNamespace(reprcrash=SimpleNamespace(message="ValueError: bad row 3\n\nmore context"))
    assert FailureLines.reason(report(crash)) == "ValueError: bad row 3"
    assert FailureLines.reason(report("Traceback ...\n  frame\nworker 'gw0' crashed while running 't.py::x'\n\n")) \
        == "worker 'gw0' crashed while running 't.py::x'"
    class EmptyCrash:  # a crash object with an empty message and no text either
        reprcrash = SimpleNamespace(message="")

        def __str__(self):
            return " \n"

    assert FailureLines.reason(report(EmptyCrash())) == "?"
    assert FailureLines.reason(report("")) == "?"
    assert FailureLines.reason(report("x" * 1000)) == "x" * 300
