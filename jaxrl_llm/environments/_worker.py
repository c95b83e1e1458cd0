"""The scoring worker process of ScoringPool (see pool.py); started as
`python -c "from jaxrl_llm.environments._worker import main; main()" READ_FD WRITE_FD`.

Protocol over two pipes (multiprocessing.connection framing, pickled messages):
  parent -> worker: ("init", preload_modules, confine, isolate, warmup, programs), then (ticket, pickled (fn,
                    args)) per task, None to exit. confine: None, or the keyword arguments of `sandbox.confine`,
                    applied after the imports. isolate: run each task in a child forked for it. warmup: (fn, args)
                    calls made once after confining, before "ready". programs: None, or the packages that the
                    processes of a program spawner (spawner.py, forked after the imports, before confining) may
                    read. ticket: a random string, new per task.
  worker -> parent: ("ready", pid) | ("init_error", message), then per task ("started", ticket) once the
                    task is loaded, and ("ok", ticket, value) | ("error", ticket, message).
The worker runs one task at a time on its main thread (so signal-based timeouts inside scorers work). It exits
when the parent closes the pipe or dies; the parent kills it when a task runs past its deadline.

isolate: the worker loads each task itself, then forks a child that closes the worker's pipes, confines itself
(without fork), runs the task and writes one reply to a pipe of its own. The worker checks that reply (plain
data, this task's ticket, a result kind) and passes it on, or reports what went wrong; then it kills and reaps
the child. So no sample's code runs in the worker, none sees another sample's state or the worker's pipes, and
a sample that dies takes only itself. The child dies with the worker (PR_SET_PDEATHSIG), so the parent's kill
at a deadline ends both.
"""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from jaxrl_llm.environments import spawner
from jaxrl_llm.environments.landlock import readable_paths
from jaxrl_llm.environments.pool import load_plain
from jaxrl_llm.environments.sandbox import confine as confine_process
from jaxrl_llm.environments.sandbox import die_with_parent, not_dumpable

_PARENT_POLL_S = 1.0
_MAX_CHILD_REPLY = 64 * 2**20  # bytes; a scoring result is far smaller


def _describe(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"[:2000]


def _watch_parent(parent_pid: int) -> None:
    """Exit if the parent goes away while a task is running (a blocked recv notices by itself)."""
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(3)


def _send(conn: Connection, msg: tuple[Any, ...]) -> None:
    """Send a result, checked here to be plain data (what the parent accepts; anything else it treats as written
    out of turn): a scorer returning, say, a numpy scalar gets its own clear error instead."""
    try:
        data = pickle.dumps(msg)
        load_plain(data)
    except Exception as e:  # an unpicklable result, or one that is not plain data
        conn.send(("error", msg[1], f"result could not be sent back: {_describe(e)}"))
        return
    conn.send_bytes(data)


def _exit_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _child(ticket: str, fn: Any, args: tuple, confine: dict | None, reply_fd: int, zygote_pid: int,
           close: tuple[Connection, ...]) -> None:
    """The forked child of an isolating worker: runs one task, writes one reply to `reply_fd`, never returns."""
    try:
        for conn in close:  # the worker's own pipes: nothing of the sample's may reach the parent directly
            conn.close()
        out = Connection(reply_fd, readable=False)
        try:
            die_with_parent()
            if os.getppid() != zygote_pid:  # the worker was gone before the line above took effect
                os._exit(1)
            if confine is not None:
                confine_process(**confine)
        except BaseException as e:
            out.send(("error", ticket, f"the sample's process could not be confined: {_describe(e)}"))
        else:
            try:
                value = fn(*args)
            except BaseException as e:
                out.send(("error", ticket, _describe(e)))
            else:
                _send(out, ("ok", ticket, value))
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)


def _reply_from_child(conn: Connection, ticket: str) -> bytes | str | None:
    """The child's reply, checked: its bytes to pass on; a message naming what was wrong with it; None at EOF."""
    try:
        data = conn.recv_bytes(_MAX_CHILD_REPLY)
    except EOFError:
        return None
    except OSError:
        return f"the sample's process sent a reply over {_MAX_CHILD_REPLY} bytes"
    try:
        msg = load_plain(data)
    except Exception:
        return "the sample's process sent a reply that is not plain data"
    if not (isinstance(msg, tuple) and len(msg) == 3 and msg[0] in ("ok", "error") and msg[1] == ticket):
        return "the sample's process sent a reply out of turn"
    return data


def _run_isolated(ticket: str, fn: Any, args: tuple, confine: dict | None, inbox: Connection,
                  outbox: Connection) -> None:
    sys.stdout.flush()  # or the child would write this process's buffered output a second time
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(ticket, fn, args, confine, write_fd, os.getppid(), (inbox, outbox))
    os.close(write_fd)
    with Connection(read_fd, writable=False) as conn:
        reply = _reply_from_child(conn, ticket)
    if reply is None:  # EOF: the child is exiting (or closed the pipe and went on: it gets a second to end)
        reply = "the sample's process closed its reply pipe without a reply"
        for _ in range(100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reply = f"the sample's process died without a reply ({_exit_status(status)})"
                break
            time.sleep(0.01)
        else:
            _kill(pid)
    else:
        _kill(pid)
    if isinstance(reply, bytes):
        outbox.send_bytes(reply)
    else:
        outbox.send(("error", ticket, reply))


def _silence() -> None:
    """Point this process's fds 1 and 2 at /dev/null: they are the trainer's stdout and stderr (its log, which a
    sample's code could otherwise write to, rewind or truncate with os.write / os.ftruncate)."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    # SIGTERM too: `timeout`, SLURM and the launcher signal the whole process group, and the trainer finishes its
    # step, scoring included, before it stops. The pool ends workers with SIGKILL; they also exit with the parent.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    parent = os.getppid()
    try:
        _, preload, confine, isolate, warmup, programs = inbox.recv()
        if isolate and not hasattr(os, "fork"):
            raise RuntimeError("isolate=True runs each sample in a forked process, and this platform has no fork; "
                               "pass isolate=False")
        for name in preload:
            importlib.import_module(name)
        if programs is not None and isolate:  # before confining (its socket) and before any task (its memory)
            spawner.start(None if confine is None else {"memory_limit_mb": confine.get("memory_limit_mb")},
                          list(programs))
        reads_confined = 0
        if confine is not None:
            # Where Landlock does not close /proc, a program's process could otherwise read this worker's and its
            # samples' memory (the tasks' tests) through /proc/<pid>/mem (the forks inherit it).
            not_dumpable()
            _silence()
            read_paths = readable_paths() + list(confine.pop("readable", ()))  # (the children confine without it)
            reads_confined = confine_process(**confine, allow_fork=isolate, read_paths=read_paths)
        # Started after the confinement, so that it is confined too (Landlock covers the threads a restricted one
        # starts, not those started before; a sample could have this one run its code, through time.sleep). Until
        # now a parent gone shows as EOF at the first recv.
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
        for fn, args in warmup:
            fn(*args)
        if isolate:
            gc.freeze()  # what is built so far stays shared with the children (no copy-on-write from gc passes)
    except EOFError:
        return
    except BaseException as e:  # reported to the parent, which raises
        outbox.send(("init_error", _describe(e)))
        return
    outbox.send(("ready", os.getpid(), reads_confined))
    while True:
        try:
            data = inbox.recv_bytes()
        except (EOFError, OSError):
            return
        msg = pickle.loads(data)
        if msg is None:  # exit now: interpreter finalisation (sympy & co.) only costs the parent's close() time
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        ticket, task = msg
        try:
            fn, args = pickle.loads(task)
        except BaseException as e:  # e.g. the scoring function's module cannot be imported here
            hint = (" (the sandbox lets a scorer read only the interpreter, its libraries, the module path and "
                    "ScoringPool(readable=...))" if isinstance(e, PermissionError) else "")
            outbox.send(("error", ticket, f"task could not be loaded in the worker: {_describe(e)}{hint}"))
            continue
        outbox.send(("started", ticket))  # the sample's clock starts now, after its function's module is loaded
        if isolate:
            _run_isolated(ticket, fn, args, confine, inbox, outbox)
            continue
        try:
            value = fn(*args)
        except BaseException as e:  # any failure of a scorer is that sample's error
            outbox.send(("error", ticket, _describe(e)))
            continue
        _send(outbox, ("ok", ticket, value))
