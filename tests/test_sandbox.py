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
    with ScoringPool(num_workers=1, timeout_s=20.0) as boxed, \
            ScoringPool(num_workers=1, timeout_s=20.0, sandbox=False) as free:
        yield boxed, free


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
])
def test_confined_worker(pools, tmp_path, kind, confined, free):
    boxed, unconfined = pools
    for pool, want in ((boxed, confined), (unconfined, free)):
        if want is None:
            continue
        target = tmp_path / f"{kind}-{pool.sandbox}"
        if kind in ("unlink",):
            target.write_text("keep me")
        (out,) = pool.map(probe, [(kind, str(target))])
        assert out.status == "ok", out.error
        assert out.value == want, (kind, pool.sandbox)
        if kind in ("write", "append", "mkdir", "system", "hijack_thread") and pool.sandbox:
            assert not target.exists()
        if kind == "unlink" and pool.sandbox:
            assert target.read_text() == "keep me"


def test_confined_worker_still_reads(pools, tmp_path):
    (tmp_path / "gold.txt").write_text("42")
    (out,) = pools[0].map(probe, [("read", str(tmp_path / "gold.txt"))])
    assert out.status == "ok" and out.value == "42"


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
    """What code evaluated in a worker can find: the worker's own reply pipe."""
    import gc
    from multiprocessing.connection import Connection

    return [o for o in gc.get_objects() if isinstance(o, Connection) and o.writable]


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


@pytest.mark.parametrize("sandbox", [True, False])
def test_a_sample_cannot_set_another_samples_result(sandbox):
    """Replies carry a per-task ticket: a reply forged by a sample's code (which can reach the reply pipe) does
    not become the next sample's result: the forging sample's result is void, its worker replaced, and the next
    sample scored properly."""
    with ScoringPool(num_workers=1, timeout_s=20.0, sandbox=sandbox) as pool:
        out = pool.map(forge_next_result, [(999,)]) + pool.map(square, [(7,)])
        assert [o.status for o in out] == ["error", "ok"] and out[1].value == 49
        assert "out of turn" in out[0].error and pool.stats["out_of_turn"] == 1
        out = pool.map(write_garbage, [()]) + pool.map(square, [(5,)])
        assert [o.status for o in out] == ["error", "ok"] and out[1].value == 25
        assert pool.stats["out_of_turn"] == 2
