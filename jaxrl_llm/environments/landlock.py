"""Which files a confined scoring process may read: Landlock (Linux 5.13+), an allow list of folders.

The seccomp filter (sandbox.py) stops writes, programs, sockets and signals, but not reads: a sample's code could
read whatever the trainer's user may read (`/proc/<trainer pid>/environ` with its tokens, `~/.netrc`,
`~/.cache/huggingface/token`, the user's files) and send it out through its reply. `restrict_reads` limits a
process to reading the interpreter, its libraries and the folders on its module path (`readable_paths`), for the
rest of its life and that of its children.

Landlock restricts the calling thread (and what it forks), not threads started before: a pool's worker calls it
from its main thread, and with `isolate` (the default) each sample runs in a single-threaded child forked from
there. Where the kernel lacks Landlock, `restrict_reads` returns 0 and nothing is restricted (the pool warns).
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import sys
import sysconfig

# Syscall numbers (the same on x86-64 and aarch64) and constants of linux/landlock.h.
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_READ_FILE, _READ_DIR = 1 << 2, 1 << 3
_ALL_V1 = (1 << 13) - 1  # execute ... make_sym
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3 and 5
_O_PATH = getattr(os, "O_PATH", 0o10000000)

# Files and folders of the system the interpreter and its libraries read while running (shared libraries
# loaded late, the dynamic loader's cache, time zones, devices for randomness).
_SYSTEM = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/opt", "/etc/ld.so.cache", "/etc/localtime",
           "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random",
           "/sys/devices/system/cpu")


@functools.cache
def _syscall() -> ctypes._CFuncPtr:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (or it is disabled)."""
    if sys.platform != "linux":
        return 0
    version = _syscall()(ctypes.c_long(_CREATE_RULESET), None, ctypes.c_size_t(0),
                         ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def readable_paths() -> list[str]:
    """What a confined scorer may read: the interpreter's prefixes and library folders, the folders on sys.path
    (where scoring functions and their data live), and the system's library folders (`_SYSTEM`). A sys.path entry
    that is the user's home folder or holds it (the working directory of a run started there) is left out: it would
    open the whole home folder, tokens included."""
    home = os.path.realpath(os.path.expanduser("~"))
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  *sysconfig.get_paths().values(), *_SYSTEM]
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if _outside_home(path, home):
            candidates.append(path)
    return sorted({os.path.realpath(p) for p in candidates if p and os.path.exists(p)})


def _outside_home(path: str, home: str) -> bool:
    return not (path == "/" or home == path or home.startswith(path.rstrip("/") + "/"))


def module_roots() -> list[str]:
    """The folders of the top-level packages this process has imported from outside sys.path (found by an import
    hook, as setuptools' editable installs are): a scoring function's package there must stay importable in a
    confined worker that loads it later. The home folder and those holding it are left out."""
    home = os.path.realpath(os.path.expanduser("~"))
    on_path = [os.path.realpath(p or os.getcwd()) for p in sys.path]
    roots = set()
    for name, module in list(sys.modules.items()):
        if "." in name or module is None:
            continue
        folders = list(getattr(module, "__path__", None) or [])  # a package (or a namespace package's parts)
        file = getattr(module, "__file__", None)
        if not folders and isinstance(file, str):
            folders = [file]  # a single-file module
        for folder in folders:
            if not isinstance(folder, str) or not os.path.exists(folder):
                continue
            folder = os.path.realpath(folder)
            if any(folder == p or folder.startswith(p.rstrip("/") + "/") for p in on_path):
                continue
            if _outside_home(folder, home):
                roots.add(folder)
    return sorted(roots)


def restrict_reads(paths: list[str]) -> int:
    """Allow this thread (and what it forks) to read only under `paths` and to write nowhere by path (descriptors
    already open are unaffected). Returns the Landlock ABI version used; 0 (nothing done) where the kernel has
    none. Needs no_new_privs (set by sandbox.confine before it calls this). OSError if a rule cannot be made."""
    abi = abi_version()
    if abi == 0:
        return 0
    handled = _ALL_V1 | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0) | (_IOCTL_DEV if abi >= 5 else 0)
    syscall = _syscall()
    attr = ctypes.create_string_buffer(struct.pack("Q", handled), 8)  # landlock_ruleset_attr.handled_access_fs
    ruleset = syscall(ctypes.c_long(_CREATE_RULESET), attr, ctypes.c_size_t(8), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path in paths:
            fd = os.open(path, _O_PATH | os.O_CLOEXEC)
            try:
                rights = _READ_FILE if os.path.isfile(path) or path.startswith("/dev/") else _READ_FILE | _READ_DIR
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)  # landlock_path_beneath_attr
                if syscall(ctypes.c_long(_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), rule,
                           ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}): "
                                                      f"{os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
        if syscall(ctypes.c_long(_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    return abi
