"""A process pool that scores samples with a per-sample timeout, so that no completion can stall or crash training.

    with ScoringPool(num_workers=2, timeout_s=5.0, preload=("math_verify",)) as pool:
        outcomes = pool.map(score_fn, [(completion, gold), ...])   # one Outcome per sample, in order
    # Outcome.status: "ok" (value = fn's return), "timeout" (ran past timeout_s: its worker was killed and
    # is replaced), "error" (fn raised, its result could not be sent, or its worker died, e.g. os._exit).

Workers are fresh interpreters (`subprocess` + two pipes; never fork: the parent runs JAX threads), started
lazily on the first map and reused across calls; a worker lost to a timeout or a crash is replaced at once
(during the call if tasks wait, otherwise at its end, booting while the caller goes on). A worker imports the
`preload` modules before it reports ready, and the per-sample clock starts only when a ready worker has loaded
the task (and so imported the scoring function's module): start-up (about 0.3 s plus the preloaded imports,
e.g. ~1 s for math_verify, ~4 s for reasoning_gym; in parallel over workers) never counts against a sample.
`fn` and its arguments must be picklable (a module-level function; the worker imports its module with the
parent's sys.path); a value the worker cannot load is that sample's error.

Sandbox (default on): each worker confines itself after its imports (`sandbox.confine`: a seccomp filter
against running programs, new processes, sockets, file writes and signals to other processes, and an
address-space cap of `memory_limit_mb`), because scorers evaluate model-written text (sympy's `parse_expr`,
`eval` in some reasoning-gym checkers). A platform where that is impossible fails at the first map, naming
the reason. What a worker sends back is loaded with an unpickler that refuses every class and function, so a
confined worker cannot reach the trainer through its results either: `fn` must return plain data (numbers,
strings, bytes, None, and tuples, lists, dicts and sets of them). Every reply carries a random ticket of its
task, so a reply forged by a sample's code voids that sample and replaces the worker.

Isolation (default on): a worker runs no sample's code itself; it forks a child per sample, which confines itself
further (no fork, no signals but to itself), runs the sample and exits (`_worker.py`). A child starts from the
worker's imported state in a few milliseconds, and whatever a sample's code changes (a scorer's functions, a
cache, the pipes) dies with it, so no sample can affect another's result. What remains: code evaluated for a
sample can set that sample's own reward. isolate=False runs the samples in the worker itself (faster by the
fork, a few ms a sample; then a sample's code can change how the worker scores later samples, and
`max_tasks_per_worker=1` is the isolation, at a whole start-up per sample).

num_workers=0 runs `fn` in this process with the same error handling, but a running call cannot be
interrupted there: a call that returns after `timeout_s` is *reported* as a timeout (its value is dropped, so
rewards match the pooled mode), yet it still takes as long as it takes. Nothing confines it either, so it needs
`sandbox=False`, an explicit statement that the completions are trusted.

A sandboxed worker starts with a reduced environment (`_SANDBOX_ENV`: paths, locale, interpreter and allocator
settings), so that no token or credential of the trainer's (HF_TOKEN, WANDB_API_KEY, ...) is there to be read by
evaluated text; its stdout and stderr point at /dev/null (they were the trainer's log); and where the kernel has
Landlock it may read only the interpreter, its libraries, the module path (not the user's home folder when that is
the working directory) and `readable` (landlock.py), not the trainer's /proc entries or the user's files. A
scoring function must then live on the module path outside the home folder itself (a package, or the project's
folder), and read its data from there or from `readable`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
import pickle
import secrets
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from jaxrl_llm.environments.landlock import module_roots

log = logging.getLogger(__name__)

_BOOT = "from jaxrl_llm.environments._worker import main; main()"


class _PlainData(pickle.Unpickler):
    """Loads tuples, lists, dicts, sets, strings, bytes, numbers, booleans and None; refuses any class or function
    (the only way a pickle can call code), so a message from a worker cannot run anything here."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a worker sent {module}.{name}: only plain data (numbers, strings, "
                                     "containers) may come back from a scoring worker")


def load_plain(data: bytes) -> Any:
    """Unpickle plain data only (see _PlainData): how every reply from a worker is read."""
    return _PlainData(io.BytesIO(data)).load()


_REPLY_LEN = {"started": 2, "ok": 3, "error": 3}


def _in_turn(msg: tuple, ticket: str, running: bool) -> bool:
    """Whether a reply is one of the current task's: a known kind, of its length, carrying the task's ticket,
    and "started" only once (a second one would push the task's deadline back)."""
    return _REPLY_LEN.get(msg[0]) == len(msg) and msg[1] == ticket and not (running and msg[0] == "started")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """status: "ok" | "timeout" | "error"; value: fn's return value when ok; error: a one-line reason otherwise;
    seconds: wall time of the call as seen by the pool."""

    status: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    to_worker: Connection
    from_worker: Connection
    state: str  # "starting" | "idle" | "busy"
    deadline: float
    started_at: float
    task: int | None = None
    ticket: str = ""  # random per dispatched task; every reply about the task must carry it
    running: bool = False  # the current task has started (its own code may be running)
    sent_at: float = 0.0
    timeout_s: float = 0.0
    tasks_done: int = 0


# What a sandboxed worker keeps of the trainer's environment: where programs, libraries and temporary files are,
# the locale, and the interpreter's and allocator's settings. Everything else (HF_TOKEN, WANDB_API_KEY, cloud
# credentials, ...) stays out of reach of the model-written text that scorers evaluate.
_SANDBOX_ENV = frozenset("PATH HOME USER LOGNAME LANG LANGUAGE TZ TMPDIR TEMP TMP VIRTUAL_ENV CONDA_PREFIX "
                         "LD_LIBRARY_PATH LD_PRELOAD GLIBC_TUNABLES MALLOC_CONF OMP_NUM_THREADS".split())
_SANDBOX_ENV_PREFIXES = ("LC_", "PYTHON", "SYMPY_")


def _child_env(sandbox: bool) -> dict[str, str]:
    """The parent's environment (for a sandboxed worker: only the `_SANDBOX_ENV` names and prefixes) with its
    sys.path as PYTHONPATH, so the worker finds the same modules (the scoring function's module included, e.g.
    a test file's directory that pytest put on sys.path)."""
    env = {k: v for k, v in os.environ.items()
           if not sandbox or k in _SANDBOX_ENV or k.startswith(_SANDBOX_ENV_PREFIXES)}
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _stop(worker: _Worker, kill: bool) -> None:
    """Ends a worker: politely (None, then a short wait) or at once (SIGKILL); always reaps it."""
    if not kill and worker.proc.poll() is None:
        try:
            worker.to_worker.send_bytes(pickle.dumps(None))
        except OSError:
            pass
    for conn in (worker.to_worker, worker.from_worker):
        conn.close()
    if not kill:
        try:
            worker.proc.wait(timeout=1.0)
            return
        except subprocess.TimeoutExpired:
            pass
    worker.proc.kill()
    worker.proc.wait()


def _stop_all(workers: list[_Worker | None]) -> None:
    """Asks idle workers to exit and kills the others, then reaps them all (waiting 1 s at most in all)."""
    live = [w for w in workers if w is not None]
    workers[:] = [None] * len(workers)
    for w in live:
        if w.state == "idle" and w.proc.poll() is None:
            try:
                w.to_worker.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        else:
            w.proc.kill()
        w.to_worker.close()
        w.from_worker.close()
    deadline = time.monotonic() + 1.0
    for w in live:
        try:
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


class ScoringPool:
    """Runs `fn(*args)` for each args tuple in worker processes with a per-sample timeout (see the module doc).

    num_workers: processes (0: run in this process). timeout_s: default per-sample limit (map may override).
    preload: modules each worker imports before it is ready. startup_timeout_s: a worker that is not ready by
    then raises RuntimeError (a broken installation, not a bad sample). max_tasks_per_worker: recycle a worker
    after this many tasks (None: never), to bound memory that a scorer's caches may grow. sandbox: confine each
    worker (see the module doc; num_workers=0 needs sandbox=False). memory_limit_mb: a sandboxed worker's
    address-space cap (None: none). isolate: run each sample in a process forked for it (see the module doc;
    not applicable to num_workers=0). warmup: (fn, args) calls each worker makes once, after its preloads and
    confinement, on fixed trusted inputs, so that what a scorer builds on its first call (math-verify's parsers:
    ~0.2 s) is built once per worker and not in every sample's process; a failing warm-up fails the start.
    readable: files and folders a sandboxed scorer may read besides the interpreter, its libraries and the module
    path (where the kernel has Landlock, reads are limited to those: see landlock.py), e.g. reference data.
    programs: each worker starts a program spawner (spawner.py) before it sees any task, which forks the processes
    that run model-written programs apart from their tests (code_split.run_split); program_packages: the packages
    (besides the standard library) whose files those processes may read, where the kernel has Landlock.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, *, preload: Sequence[str] = (),
                 startup_timeout_s: float = 120.0, max_tasks_per_worker: int | None = None, sandbox: bool = True,
                 memory_limit_mb: int | None = 4096, isolate: bool = True,
                 warmup: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]] = (), readable: Sequence[str] = (),
                 programs: bool = False, program_packages: Sequence[str] = ()):
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if num_workers == 0 and sandbox:
            raise ValueError("num_workers=0 scores in this process, where nothing confines what a scorer does with "
                             "model-written text (sympy and some reasoning-gym checkers evaluate it): use "
                             "num_workers >= 1, or sandbox=False if the completions are trusted")
        if memory_limit_mb is not None and (isinstance(memory_limit_mb, bool) or not isinstance(memory_limit_mb, int)
                                            or memory_limit_mb < 256):
            raise ValueError(f"memory_limit_mb must be an int >= 256 or None, got {memory_limit_mb!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
            raise ValueError(f"max_tasks_per_worker must be >= 1 or None, got {max_tasks_per_worker!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.preload = tuple(preload)
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_tasks_per_worker = max_tasks_per_worker
        self.sandbox = bool(sandbox)
        self._warned_reads = False
        self.memory_limit_mb = memory_limit_mb
        self.isolate = bool(isolate)
        self.warmup = tuple((fn, tuple(args)) for fn, args in warmup)
        if programs and not isolate:
            raise ValueError("programs=True needs isolate=True (a program's process is forked for one sample)")
        self.programs = bool(programs)
        self.program_packages = tuple(program_packages)
        if isinstance(readable, str | os.PathLike):
            readable = [readable]
        missing = [str(p) for p in readable if not os.path.exists(p)]
        if missing:
            raise ValueError(f"readable: {missing} do not exist")
        self.readable = tuple(os.path.realpath(p) for p in readable)
        self._workers: list[_Worker | None] = [None] * num_workers
        self._lock = threading.Lock()
        self._closed = False
        # Workers started, replaced (killed at a timeout, or found dead), the start-up seconds (launch to
        # ready, preloads included) of the last one to become ready, and workers killed for a reply out of turn.
        self.stats: dict[str, float] = {"started": 0, "replaced": 0, "last_startup_s": 0.0, "out_of_turn": 0}
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers (idempotent). A later map() raises."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def map(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]],
            timeout_s: float | None = None) -> list[Outcome]:
        """One Outcome per args tuple, in order. Raises only for misuse (a closed pool, an unpicklable fn) or
        when a worker cannot start at all."""
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        args_list = [tuple(a) for a in args_list]
        with self._lock:
            if self._closed:
                raise RuntimeError("ScoringPool.map after close()")
            if not args_list:
                return []
            if self.num_workers == 0:
                return [_call_in_process(fn, args, timeout_s) for args in args_list]
            try:
                pickle.dumps(fn)
            except Exception as e:
                raise ValueError(f"scoring function {fn!r} cannot be sent to a worker process (define it at module "
                                 f"level): {e}") from e
            try:
                return self._map(fn, args_list, timeout_s)
            except BaseException:
                # Workers still busy hold tasks of this call: their state is unknown, so end them.
                for i, w in enumerate(self._workers):
                    if w is not None and w.state != "idle":
                        _stop(w, kill=True)
                        self._workers[i] = None
                raise

    # --- the event loop -------------------------------------------------------------------------------------

    def _start(self, slot: int) -> None:
        read_fd, to_worker_fd = os.pipe()
        from_worker_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(read_fd), str(write_fd)],
                                    pass_fds=(read_fd, write_fd), stdin=subprocess.DEVNULL,
                                    env=_child_env(self.sandbox))
        finally:
            os.close(read_fd)
            os.close(write_fd)
        now = time.monotonic()
        w = _Worker(proc=proc, to_worker=Connection(to_worker_fd, readable=False),
                    from_worker=Connection(from_worker_fd, writable=False), state="starting",
                    deadline=now + self.startup_timeout_s, started_at=now)
        self._workers[slot] = w
        self.stats["started"] += 1
        try:
            confine = ({"memory_limit_mb": self.memory_limit_mb, "readable": self.readable + tuple(module_roots())}
                       if self.sandbox else None)  # (packages imported here from outside sys.path stay importable)
            w.to_worker.send(("init", self.preload, confine, self.isolate, self.warmup,
                              self.program_packages if self.programs else None))
        except OSError:
            pass  # it died at once; its EOF is seen by the loop

    def _retire(self, slot: int, kill: bool) -> None:
        w = self._workers[slot]
        if w is not None:
            self._workers[slot] = None
            if kill:
                self.stats["replaced"] += 1
            _stop(w, kill=kill)

    def _map(self, fn: Callable[..., Any], args_list: list[tuple[Any, ...]], timeout_s: float) -> list[Outcome]:
        n = len(args_list)
        results: list[Outcome | None] = [None] * n
        pending = collections.deque(range(n))
        remaining = n
        while remaining:
            now = time.monotonic()
            # Hand tasks to idle workers; (re)start workers while tasks wait for one.
            for slot, w in enumerate(self._workers):
                if not pending:
                    break
                if w is None:
                    if sum(x is not None for x in self._workers) < min(self.num_workers, remaining):
                        self._start(slot)
                    continue
                if w.state != "idle":
                    continue
                i = pending.popleft()
                ticket = secrets.token_hex(16)
                try:
                    payload = pickle.dumps((ticket, pickle.dumps((fn, args_list[i]))))
                except Exception as e:
                    results[i] = Outcome("error", error=f"arguments cannot be sent to a worker: {e}")
                    remaining -= 1
                    continue
                try:
                    w.to_worker.send_bytes(payload)
                except OSError:  # it died while idle: requeue the task, replace the worker
                    pending.appendleft(i)
                    self._retire(slot, kill=True)
                    continue
                # Until the worker says "started", the limit is the start-up one: loading the task may import
                # the scoring function's module for the first time, which is not the sample's cost.
                w.state, w.task, w.sent_at, w.deadline = "busy", i, now, now + self.startup_timeout_s
                w.ticket, w.running = ticket, False
                w.timeout_s = timeout_s
            if not remaining:
                break
            active = [w for w in self._workers if w is not None and w.state != "idle"]
            if not active:
                continue
            wait_s = max(0.0, min(w.deadline for w in active) - time.monotonic())
            ready = set(wait([w.from_worker for w in active], timeout=wait_s))
            for slot, w in enumerate(self._workers):
                if w is None or w.state == "idle":
                    continue
                if w.from_worker in ready:
                    remaining -= self._receive(slot, w, results, pending)
                elif time.monotonic() >= w.deadline:
                    if w.state == "starting":
                        self._retire(slot, kill=True)
                        raise RuntimeError(f"scoring worker did not start within {self.startup_timeout_s:.0f} s "
                                           f"(preload={list(self.preload)})")
                    results[w.task] = Outcome("timeout", error=f"no result within {w.timeout_s:g} s",
                                              seconds=time.monotonic() - w.sent_at)
                    remaining -= 1
                    self._retire(slot, kill=True)
        # Replace workers lost in this call now, so that they boot while the caller does other work.
        for slot, w in enumerate(self._workers):
            if w is None:
                self._start(slot)
        return [r for r in results if r is not None]

    def _receive(self, slot: int, w: _Worker, results: list[Outcome | None], pending: collections.deque) -> int:
        """Handles one message (or EOF) from worker `slot`; returns how many samples it finished (0 or 1).

        A reply that does not carry the ticket of the worker's current task was written by code running in the
        worker (a scorer evaluating model text can reach the reply pipe), for instance a result queued ahead for
        the next sample. The worker is killed; the current task's result is void (an error) if its own code was
        running, otherwise it goes back to the queue."""
        try:
            msg = load_plain(w.from_worker.recv_bytes())
        except (EOFError, OSError):
            msg = None
        except Exception:  # the worker checks its replies (see _worker._send): this one it did not write
            msg = ("unreadable",)
        if msg is not None and (not isinstance(msg, tuple) or not msg):
            msg = ("unreadable",)
        if w.state == "starting":
            if msg is not None and msg[0] == "ready":
                if self.sandbox and len(msg) > 2 and not msg[2] and not self._warned_reads:
                    self._warned_reads = True
                    log.warning("scoring sandbox: Landlock is not available (a kernel before 5.13, or turned off or "
                                "blocked by a container), so the confined scorers can read every file the trainer's "
                                "user can, and where ptrace rules allow (no Yama), a program's process can read the "
                                "trainer's memory, its tasks' tests included, through /proc (seccomp still stops "
                                "writes, programs, sockets and signals)")
                w.state = "idle"
                self.stats["last_startup_s"] = time.monotonic() - w.started_at
                return 0
            code = w.proc.poll()
            self._retire(slot, kill=True)
            reason = msg[1] if msg is not None and msg[0] == "init_error" else f"it exited with code {code}"
            raise RuntimeError(f"scoring worker failed to start (preload={list(self.preload)}): {reason}")
        if msg is not None and not _in_turn(msg, w.ticket, w.running):
            self._retire(slot, kill=True)
            self.stats["out_of_turn"] += 1
            if w.running:  # written while this task's own code ran: its result is void
                results[w.task] = Outcome("error", error="the scorer wrote to the worker's reply pipe out of turn",
                                          seconds=time.monotonic() - w.sent_at)
                return 1
            pending.appendleft(w.task)  # left over from an earlier task: score this one on a fresh worker
            return 0
        if msg is not None and msg[0] == "started":
            w.running = True
            w.sent_at = time.monotonic()
            w.deadline = w.sent_at + w.timeout_s
            return 0
        elapsed = time.monotonic() - w.sent_at
        task = w.task
        if msg is None:  # the worker died mid-task (os._exit, a segfault, the OOM killer)
            self._retire(slot, kill=True)
            code = w.proc.returncode
            results[task] = Outcome("error", error=f"worker died (exit code {code})", seconds=elapsed)
            return 1
        status = msg[0]
        if status == "ok":
            results[task] = Outcome("ok", value=msg[2], seconds=elapsed)
        else:
            results[task] = Outcome("error", error=str(msg[2]), seconds=elapsed)
        w.state, w.task = "idle", None
        w.tasks_done += 1
        if self.max_tasks_per_worker is not None and w.tasks_done >= self.max_tasks_per_worker:
            self._retire(slot, kill=False)
        return 1


def _call_in_process(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Outcome:
    t0 = time.monotonic()
    try:
        value = fn(*args)
    except Exception as e:
        return Outcome("error", error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)
    elapsed = time.monotonic() - t0
    if elapsed > timeout_s:
        return Outcome("timeout", error=f"took {elapsed:.3g} s > {timeout_s:g} s (in-process: not interrupted)",
                       seconds=elapsed)
    return Outcome("ok", value=value, seconds=elapsed)


def outcome_counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """{"timeouts": ..., "errors": ...} over a batch of outcomes (both keys always present)."""
    return {"timeouts": sum(o.status == "timeout" for o in outcomes),
            "errors": sum(o.status == "error" for o in outcomes)}
