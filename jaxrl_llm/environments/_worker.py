"""The scoring worker process of ScoringPool (see pool.py); started as
`python -c "from jaxrl_llm.environments._worker import main; main()" READ_FD WRITE_FD`.

Protocol over two pipes (multiprocessing.connection framing, pickled messages):
  parent -> worker: ("init", preload_modules, confine), then (ticket, pickled (fn, args)) per task, None to
                    exit. confine: None, or the keyword arguments of `sandbox.confine`, applied after the imports.
                    ticket: a random string, new for every task.
  worker -> parent: ("ready", pid) | ("init_error", message), then per task ("started", ticket) once the
                    task is loaded, and ("ok", ticket, value) | ("error", ticket, message).
The worker runs one task at a time on its main thread (so signal-based timeouts inside scorers work). It exits
when the parent closes the pipe or dies; the parent kills it when a task runs past its deadline.
"""

from __future__ import annotations

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

from jaxrl_llm.environments.pool import load_plain

_PARENT_POLL_S = 1.0


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


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        _, preload, confine = inbox.recv()
        for name in preload:
            importlib.import_module(name)
        if confine is not None:
            from jaxrl_llm.environments.sandbox import confine as confine_process

            confine_process(**confine)
    except EOFError:
        return
    except BaseException as e:  # reported to the parent, which raises
        outbox.send(("init_error", _describe(e)))
        return
    outbox.send(("ready", os.getpid()))
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
        task_id, task = msg
        try:
            fn, args = pickle.loads(task)
        except BaseException as e:  # e.g. the scoring function's module cannot be imported here
            outbox.send(("error", task_id, f"task could not be loaded in the worker: {_describe(e)}"))
            continue
        outbox.send(("started", task_id))  # the sample's clock starts now, after its function's module is loaded
        try:
            value = fn(*args)
        except BaseException as e:  # any failure of a scorer is that sample's error
            outbox.send(("error", task_id, _describe(e)))
            continue
        _send(outbox, ("ok", task_id, value))
