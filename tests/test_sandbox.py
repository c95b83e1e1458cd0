"""The scoring sandbox: what model-written text evaluated inside a scoring worker can and cannot do.

Each probe below runs in a worker of a sandboxed ScoringPool (the default) and reports what happened; the same
probes in an unconfined pool show that they would succeed there, so the tests measure the sandbox."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from jaxrl_llm.environments.pool import ScoringPool, load_plain

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")


def _outcome(action) -> str:
    try:
        action()
    except Exception as e:  # noqa: BLE001 (the kind of failure is the result)
        return type(e).__name__
    return "done"


def probe(kind: str, path: str) -> str:
    if kind == "write":
        return _outcome(lambda: open(path, "w").write("x"))
    if kind == "append":
        return _outcome(lambda: open(path, "a").write("x"))
    if kind == "read":
        return open(path).read()
    if kind == "unlink":
        return _outcome(lambda: os.unlink(path))
    if kind == "mkdir":
        return _outcome(lambda: os.mkdir(path))
    if kind == "system":  # what the reviewer's exploit did: a shell command that leaves a file behind
        os.system(f"echo owned > {path}")
        return "exists" if os.path.exists(path) else "absent"
    if kind == "subprocess":
        return _outcome(lambda: subprocess.run(["/bin/true"], check=True))
    if kind == "fork":
        def child():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        return _outcome(child)
    if kind == "socket":
        return _outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    if kind == "signal_parent":
        return _outcome(lambda: os.kill(os.getppid(), 0))
    if kind == "signal_self":
        return _outcome(lambda: os.kill(os.getpid(), 0))
    if kind == "thread":
        out = []
        t = threading.Thread(target=lambda: out.append(sum(range(1000))))
        t.start()
        t.join()
        return str(out[0])
    if kind == "hijack_thread":  # run a command from a thread started before the filter (the parent watcher)
        import time

        real_sleep = time.sleep

        def evil(seconds):
            time.sleep = real_sleep
            os.system(f"echo owned > {path}")
            real_sleep(seconds)

        time.sleep = evil
        real_sleep(2.5)  # the watcher calls time.sleep every second
        time.sleep = real_sleep
        return "exists" if os.path.exists(path) else "absent"
    if kind == "memory":
        return _outcome(lambda: bytearray(6 * 2**30))
    if kind == "raise_memory_limit":  # lift the address-space cap again before allocating
        import resource

        inf = resource.RLIM_INFINITY
        return _outcome(lambda: resource.setrlimit(resource.RLIMIT_AS, (inf, inf)))
    raise ValueError(kind)


class Evil:
    """A result whose unpickling would run a shell command in the process that loads it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"echo owned > {self.path}",)


def evil_result(path: str):
    return Evil(path)


def ordered_result():
    import collections

    return collections.OrderedDict(a=1)


@pytest.fixture(scope="module")
def pools():
    """Sandboxed with each sample in a process of its own (the default), sandboxed with samples run in the worker,
    and unconfined (samples in the worker, so that every probe shows what it does when nothing stops it)."""
    with ScoringPool(num_workers=1, timeout_s=20.0) as boxed, \
            ScoringPool(num_workers=1, timeout_s=20.0, isolate=False) as shared, \
            ScoringPool(num_workers=1, timeout_s=20.0, sandbox=False, isolate=False) as free:
        yield boxed, shared, free


@pytest.mark.parametrize("kind,confined,free", [
    ("write", "PermissionError", "done"),
    ("append", "PermissionError", "done"),
    ("unlink", "PermissionError", "done"),
    ("mkdir", "PermissionError", "done"),
    ("system", "absent", "exists"),
    ("hijack_thread", "absent", "exists"),
    ("subprocess", "PermissionError", "done"),
    ("fork", "PermissionError", "done"),
    ("socket", "PermissionError", "done"),
    ("signal_parent", "PermissionError", "done"),
    ("signal_self", "done", "done"),
    ("thread", "499500", "499500"),
    ("memory", "MemoryError", None),  # unconfined it may well succeed; not asked of the free pool
    ("raise_memory_limit", "ValueError", "done"),
])
def test_confined_worker(pools, tmp_path, kind, confined, free):
    boxed, shared, unconfined = pools
    for pool, want in ((boxed, confined), (shared, confined), (unconfined, free)):
        if want is None:
            continue
        target = tmp_path / f"{kind}-{pool.sandbox}-{pool.isolate}"
        if kind in ("unlink",):
            target.write_text("keep me")
        (out,) = pool.map(probe, [(kind, str(target))])
        assert out.status == "ok", out.error
        assert out.value == want, (kind, pool.sandbox)
        if kind in ("write", "append", "mkdir", "system", "hijack_thread") and pool.sandbox:
            assert not target.exists()
        if kind == "unlink" and pool.sandbox:
            assert target.read_text() == "keep me"


def test_confined_worker_reads_what_it_is_given(pools, tmp_path):
    """Files under `readable` (and the module path); others only where the kernel lacks Landlock."""
    from jaxrl_llm.environments.landlock import abi_version

    (tmp_path / "gold.txt").write_text("42")
    (out,) = pools[0].map(probe, [("read", str(tmp_path / "gold.txt"))])
    if abi_version() == 0:
        assert out.status == "ok" and out.value == "42"
    else:
        assert out.status == "error" and out.error.startswith("PermissionError"), out
    with ScoringPool(num_workers=1, timeout_s=20.0, readable=[str(tmp_path)]) as pool:
        (out,) = pool.map(probe, [("read", str(tmp_path / "gold.txt"))])
    assert out.status == "ok" and out.value == "42"
    with pytest.raises(ValueError, match="readable: .* do not exist"):
        ScoringPool(readable=[str(tmp_path / "nope")])


def test_results_are_loaded_as_plain_data_only(pools, tmp_path):
    """A worker's reply is unpickled in the trainer: a reply that names any class or function is refused, so
    code running in a worker cannot run code in the trainer through its result."""
    marker = tmp_path / "owned"
    for pool in pools:
        (out,) = pool.map(evil_result, [(str(marker),)])
        assert out.status == "error" and "only plain data" in out.error
        assert not marker.exists()
        (out,) = pool.map(ordered_result, [()])
        assert out.status == "error" and "collections.OrderedDict" in out.error
    assert load_plain(__import__("pickle").dumps(("ok", 3, (0.5, "x", None, [1, {2: b"y"}], {3}))))[2][3][1] == {
        2: b"y"}


def test_in_process_scoring_needs_an_explicit_opt_out():
    with pytest.raises(ValueError, match="num_workers=0 scores in this process.*sandbox=False"):
        ScoringPool(num_workers=0)
    with pytest.raises(ValueError, match="memory_limit_mb"):
        ScoringPool(num_workers=1, memory_limit_mb=10)


@pytest.mark.slow
def test_reasoning_gym_answer_cannot_run_commands(tmp_path):
    """The reviewer's exploit: rg countdown's checker hands the answer to sympy's parse_expr (an eval)."""
    pytest.importorskip("reasoning_gym")
    from jaxrl_llm.data.tasks import load_tasks
    from jaxrl_llm.environments import make_environment

    task = load_tasks("rg:countdown", 1, 0)[0]
    marker = tmp_path / "owned"
    payload = f"<answer>__import__('os').system('echo owned > {marker}')</answer>"
    env = make_environment({"name": "reasoning_gym", "num_workers": 1})
    try:
        res = env.score(["p"], [payload], [task.metadata])
    finally:
        env.close()
    assert not marker.exists()
    assert res.rewards[0] < 1.0  # (countdown gives a small credit to any well-formed but wrong answer)


def _reply_pipes():
    """What code evaluated in a worker can find: the worker's own reply pipe (an isolated sample: its own)."""
    import gc
    from multiprocessing.connection import Connection

    return [o for o in gc.get_objects() if isinstance(o, Connection) and o.writable and not o.closed]


def forge_next_result(value):
    """Code in a worker writing a reply for the sample that comes after it, on the worker's own reply pipe."""
    for conn in _reply_pipes():
        conn.send(("started", "guess"))
        conn.send(("ok", "guess", value))
    return 0


def write_garbage():
    for conn in _reply_pipes():
        conn.send_bytes(b"not a pickle")
    return 0


def square(x):
    return x * x


@pytest.mark.parametrize("sandbox,isolate", [(True, True), (True, False), (False, False)])
def test_a_sample_cannot_set_another_samples_result(sandbox, isolate):
    """Replies carry a per-task ticket: a reply forged by a sample's code (which can reach the reply pipe) does
    not become the next sample's result: the forging sample's result is void and the next sample scored
    properly. A shared worker is replaced; an isolated sample only ever had a pipe of its own."""
    with ScoringPool(num_workers=1, timeout_s=20.0, sandbox=sandbox, isolate=isolate) as pool:
        out = pool.map(forge_next_result, [(999,)]) + pool.map(square, [(7,)])
        assert [o.status for o in out] == ["error", "ok"] and out[1].value == 49
        assert "out of turn" in out[0].error and pool.stats["out_of_turn"] == (0 if isolate else 1)
        out = pool.map(write_garbage, [()]) + pool.map(square, [(5,)])
        assert [o.status for o in out] == ["error", "ok"] and out[1].value == 25
        assert pool.stats["out_of_turn"] == (0 if isolate else 2)
        assert pool.stats["started"] == (1 if isolate else 3)


def _own_ticket() -> str | None:
    """The current task's ticket, as code evaluated in a worker can find it: a local of a calling frame."""
    frame = sys._getframe()
    while frame is not None:
        if isinstance(frame.f_locals.get("ticket"), str):
            return frame.f_locals["ticket"]
        frame = frame.f_back
    return None


def keep_restarting_the_clock(seconds: float) -> str:
    """Says "started" again and again with its own task's ticket, to push its deadline back while it runs on."""
    import time

    ticket = _own_ticket()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for conn in _reply_pipes():
            conn.send(("started", ticket))
        time.sleep(0.1)
    return "finished"


@pytest.mark.parametrize("isolate", [True, False])
def test_a_sample_cannot_push_its_deadline_back(isolate):
    with ScoringPool(num_workers=1, timeout_s=1.0, isolate=isolate) as pool:
        (out,) = pool.map(keep_restarting_the_clock, [(6.0,)])
        assert out.status != "ok" and out.seconds < 3.0, out


def poison_square() -> str:
    """Replaces `square` in the worker's copy of this module, as evaluated text can replace a scorer."""
    sys.modules[__name__].square = lambda x: -1
    return "poisoned"


@pytest.mark.parametrize("isolate", [True, False])
def test_an_isolated_sample_cannot_change_how_later_samples_are_scored(isolate):
    with ScoringPool(num_workers=1, timeout_s=20.0, isolate=isolate) as pool:
        out = pool.map(poison_square, [()]) + pool.map(square, [(7,)])
        assert out[0].value == "poisoned"
        assert out[1].value == (49 if isolate else -1)  # a shared worker scores with what the sample left behind


_WARM: dict[str, int] = {}


def warm_up(value: int) -> None:
    _WARM["pid"] = os.getpid()
    _WARM["value"] = value


def warmed_state() -> tuple:
    return _WARM.get("pid"), _WARM.get("value"), os.getpid()


def exit_now(code: int) -> None:
    os._exit(code)


def fail_warm_up() -> None:
    raise RuntimeError("no parser")


@pytest.mark.parametrize("isolate", [True, False])
def test_warm_up_runs_once_per_worker_and_samples_start_from_it(isolate):
    with ScoringPool(num_workers=1, timeout_s=20.0, isolate=isolate, warmup=[(warm_up, (7,))]) as pool:
        (a, b) = pool.map(warmed_state, [(), ()])
        worker_pid, value, pid = a.value
        assert value == 7 and b.value[:2] == (worker_pid, 7)
        if isolate:  # each sample in its own child of the warmed worker
            assert pid != worker_pid and b.value[2] not in (worker_pid, pid)
        else:
            assert pid == worker_pid == b.value[2]
    with ScoringPool(num_workers=1, timeout_s=20.0, warmup=[(fail_warm_up, ())]) as pool, \
            pytest.raises(RuntimeError, match="failed to start.*no parser"):
        pool.map(square, [(2,)])


def test_an_isolated_sample_that_dies_takes_only_itself():
    with ScoringPool(num_workers=1, timeout_s=20.0) as pool:
        out = pool.map(exit_now, [(5,)]) + pool.map(square, [(3,)])
        assert out[0].status == "error" and "died without a reply (exit code 5)" in out[0].error
        assert out[1].value == 9 and pool.stats["replaced"] == 0 and pool.stats["started"] == 1


def spin_forever(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    while True:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_an_isolated_sample_past_its_deadline_ends_with_its_worker(tmp_path):
    import time

    pidfile = tmp_path / "pid"
    with ScoringPool(num_workers=1, timeout_s=1.0, sandbox=False) as pool:
        (out,) = pool.map(spin_forever, [(str(pidfile),)])
        assert out.status == "timeout"
        pid = int(pidfile.read_text())
        deadline = time.monotonic() + 5.0
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        assert pool.map(square, [(4,)])[0].value == 16
