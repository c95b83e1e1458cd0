"""Review of the program spawner (spawner.py) and the two-process code reward (code_split.py): ways a sample's code
reaches past the program's process, each reproduced on the first version of the spawner, and what was checked to
hold."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from jaxrl_llm.environments import CodeEnvironment
from jaxrl_llm.environments.landlock import abi_version

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")


def _fenced(code: str) -> str:
    return f"```python\n{code}```"


@pytest.fixture(scope="module")
def default_env():
    with CodeEnvironment(num_workers=1, timeout_s=5) as env:
        yield env


@pytest.fixture(scope="module")
def unscreened():
    with CodeEnvironment(num_workers=1, timeout_s=5, refuse_introspection=False) as env:
        yield env


# A task without an entry point runs its program in the sample's own process (run_program), which inherited the
# worker's socket to the spawner. Under the defaults (screen on) the program asked for a program process with
# confined=False (the first version let the requester say): that one kept only the spawner's filter, so it could
# fork (a grandchild outlives the sample, the worker and the pool: no PDEATHSIG) and kill() any pid (the trainer:
# signal 0 probes the right to send SIGKILL).
ESCAPE = """import os, pickle, struct
from jaxrl_llm.environments import spawner
pid, calls_w, replies_r = spawner.spawn("n")
code = '''import os
child = os.fork()
if child == 0:
    os._exit(0)
os.waitpid(child, 0)
os.kill(TRAINER, 0)
def f():
    return 1
'''
data = pickle.dumps(("", code, False, "f", False))
open(calls_w, "wb", buffering=0).write(struct.pack("!i", len(data)) + data)
reply = open(replies_r, "rb", buffering=0)
n = struct.unpack("!i", reply.read(4))[0]
ESCAPED = pickle.loads(reply.read(n))[0] == "ready"
"""


def test_a_sample_cannot_get_a_program_process_that_forks_and_signals_the_trainer(default_env):
    code = ESCAPE.replace("TRAINER", str(os.getpid()))
    r = default_env.score([""], [_fenced(code)], [{"tests": "assert ESCAPED\n"}])
    assert r.rewards.tolist() == [0.0], r.info
    # model-written code in a sample's own process has no socket to the spawner at all
    has = "from jaxrl_llm.environments import spawner\nHAS = spawner.connection() is not None\n"
    r = default_env.score([""], [_fenced(has)], [{"tests": "assert not HAS\n"}])
    assert r.rewards.tolist() == [1.0], r.info


# The spawner is forked before the worker points fds 1 and 2 at /dev/null (_worker._silence), so every program's
# process holds the trainer's stdout and stderr: its log, which a program can write to or truncate (os.ftruncate
# is not refused), or, on a terminal of a kernel with legacy TIOCSTI, type into.
STDIO = """import os
def quiet():
    null = os.stat('/dev/null')
    return [os.path.samestat(os.fstat(fd), null) for fd in (0, 1, 2)]
"""


def test_program_process_does_not_hold_the_trainers_stdout(default_env):
    task = {"tests": "def check(f):\n    assert f() == [True, True, True], f()\n", "entry_point": "quiet"}
    r = default_env.score([""], [_fenced(STDIO)], [task])
    assert r.rewards.tolist() == [1.0], r.info


# Where the kernel has no Landlock (simulated: tests/landlock_abi_shim), the program's process reads its tests out
# of the tests' process's memory through /proc/<pid>/mem: an open() and a read, not ptrace, so seccomp does not stop
# it; the kernel allows it to the same user without Yama, or to root (CAP_SYS_PTRACE). Past the screen.
STEAL_MEM = r'''import os, re, ast
def _ppid(pid):
    s = open(f"/proc/{pid}/stat").read()
    return int(s[s.rindex(")") + 2:].split()[1])
def _sources():
    spawner = os.getppid()
    worker = _ppid(spawner)
    for d in os.listdir("/proc"):
        try:
            if not d.isdigit() or int(d) in (spawner, os.getpid()) or _ppid(int(d)) != worker:
                continue
            mem = open(f"/proc/{d}/mem", "rb", buffering=0)
            maps = open(f"/proc/{d}/maps").read().splitlines()
        except OSError:
            continue
        for line in maps:
            rng, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            if not perms.startswith("rw"):
                continue
            try:
                mem.seek(lo)
                blob = mem.read(hi - lo)
            except OSError:
                continue
            for m in re.finditer(rb"def check\(\w+\):\n(?:[ \t]+[^\n\x00]*\n?)+", blob):
                yield m.group(0).decode("utf-8", "replace")
def _answers():
    T = {}
    for src in _sources():
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call):
                try:
                    T[repr([ast.literal_eval(a) for a in node.left.args])] = ast.literal_eval(node.comparators[0])
                except ValueError:
                    pass
    return T
_T = {}
def secret(*args):
    _T.update(_T or _answers())
    return _T[repr(list(args))]
'''
SECRET = {"tests": "def check(f):\n    assert f(3) == 91817\n    assert f('a') == [1, 'q']\n", "entry_point": "secret",
          "prelude": "def secret(x):\n    \"\"\"Nobody can compute this.\"\"\"\n"}


def _proc_mem_open_to_us() -> bool:
    """Whether this kernel lets a process read a non-descendant's /proc/<pid>/mem (Yama off or 0, or root)."""
    try:
        scope = int(open("/proc/sys/kernel/yama/ptrace_scope").read())
    except OSError:
        scope = 0
    return scope == 0 or (scope < 3 and os.geteuid() == 0)


@pytest.mark.skipif(not _proc_mem_open_to_us(), reason="Yama keeps /proc/<pid>/mem of non-descendants closed")
def test_without_landlock_program_cannot_read_its_tests_process_memory(monkeypatch):
    monkeypatch.setenv("PYTHON_LANDLOCK_ABI", "0")  # PYTHON* reaches a sandboxed worker
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(__file__)), "landlock_abi_shim"))
    with CodeEnvironment(num_workers=1, timeout_s=5) as env:  # the defaults: screen on
        r = env.score([""], [_fenced(STEAL_MEM)], [SECRET])
    assert r.rewards.tolist() == [0.0], r.info


@pytest.mark.skipif(abi_version() == 0, reason="the kernel has no Landlock")
def test_with_landlock_the_same_program_cannot_read_proc(default_env):
    r = default_env.score([""], [_fenced(STEAL_MEM)], [SECRET])
    assert r.rewards.tolist() == [0.0] and "PermissionError" in r.info[0]["error"], r.info


# --- what holds ------------------------------------------------------------------------------------------------------

PROBE = r'''import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *a):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(x) for x in a])
    return r if r >= 0 else -ctypes.get_errno()
def probe():
    pp = os.getppid()
    pfd = sc(434, pp, 0)
    return {"ptrace": sc(101, 16, pp, 0, 0), "process_vm_readv": sc(310, pp, 0, 0, 0, 0, 0),
            "pidfd_getfd": sc(438, pfd, 3, 0), "pidfd_send_signal": sc(424, pfd, 0, 0, 0),
            "kill": sc(62, pp, 0), "kill_all": sc(62, -1, 0), "fork": sc(57), "clone": sc(56, 17, 0, 0, 0, 0),
            "tgkill": sc(234, pp, pp, 0), "socket": sc(41, 1, 1, 0)}
'''


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 syscall numbers")
def test_program_process_cannot_reach_other_processes(unscreened):
    task = {"tests": "def check(f):\n    got = f()\n    assert got == dict.fromkeys(got, -1), got\n",
            "entry_point": "probe"}  # -EPERM for each
    r = unscreened.score([""], [_fenced(PROBE)], [task])
    assert r.rewards.tolist() == [1.0], r.info


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_no_process_or_descriptor_left_after_programs_that_fail(unscreened):
    task = {"tests": "def check(f):\n    assert f(1) == 2\n    assert f(2) == 3\n", "entry_point": "inc"}
    codes = ["def inc(x):\n    return x + 1\n", "raise ValueError('at load')\n", "import os\nos._exit(3)\n",
             "import os\ndef inc(x):\n    os._exit(0)\n", "def inc(x):\n    raise KeyError(x)\n",
             "def inc(x):\n    return object()\n", "import os\nos.close(3)\nos.close(4)\n"]
    unscreened.score([""], [_fenced(codes[0])], [task])
    worker = unscreened._pool._workers[0].proc.pid
    (spawner,) = _children(worker)
    fds = len(os.listdir(f"/proc/{spawner}/fd")), len(os.listdir(f"/proc/{worker}/fd"))
    r = unscreened.score([""] * 3 * len(codes), [_fenced(c) for c in codes] * 3, [task] * 3 * len(codes))
    assert r.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0] * 3, r.info
    assert r.counts["errors"] == r.counts["timeouts"] == 0 and unscreened._pool._workers[0].proc.pid == worker
    for _ in range(50):  # the last program's process is ended when the spawner reads its "done"
        if not _children(spawner):
            break
        time.sleep(0.02)
    assert _children(worker) == [spawner] and _children(spawner) == []
    assert (len(os.listdir(f"/proc/{spawner}/fd")), len(os.listdir(f"/proc/{worker}/fd"))) == fds


def test_a_program_cannot_make_tests_that_catch_exceptions_pass_by_the_name_it_raises(unscreened):
    """Only Exception subclasses cross (BaseException ones become RuntimeError), and StopIteration never does."""
    task = {"tests": "def check(f):\n    for x in range(3):\n        try:\n            v = f(x)\n"
                     "        except Exception:\n            raise AssertionError('raised')\n"
                     "        assert v == x * 7\n", "entry_point": "g"}
    names = ["KeyboardInterrupt", "SystemExit", "GeneratorExit", "BaseException", "StopIteration",
             "BaseExceptionGroup", "check"]
    codes = [f"class {n}(BaseException):\n    pass\ndef g(x):\n    raise {n}()\n" for n in names]
    r = unscreened.score([""] * len(codes), [_fenced(c) for c in codes], [task] * len(codes))
    assert r.rewards.tolist() == [0.0] * len(codes), r.info
    assert all(i["error"].startswith(("AssertionError: raised", "RuntimeError")) for i in r.info), r.info
