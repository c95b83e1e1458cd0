"""Confinement of a scoring worker process: what model-written text may make it do.

Scorers run model output through parsers that evaluate it: math-verify hands expressions to sympy's
`parse_expr` (an `eval`), and several reasoning-gym checkers call `eval` or `parse_expr` on the answer. A
completion can therefore run Python in the scoring worker. `confine()` is called by each worker of a sandboxed
`ScoringPool` after its imports and before its first task; from then on, for the rest of the process:

- a seccomp filter on every thread of the process (Linux, x86-64 and aarch64; `prctl(PR_SET_NO_NEW_PRIVS)`
  first, so it cannot be undone) refuses, with EPERM: starting programs (execve), new processes (fork, vfork,
  clone without CLONE_THREAD; clone3 answers ENOSYS, so threads fall back to clone), sockets, opening files for
  writing or creating them, deleting, renaming, linking or changing files and folders, signals to any other
  process, ptrace and the process_vm_* calls, pidfd signals and descriptor grabs, io_uring (its operations
  bypass the filter), open_by_handle_at, mount (old and new API), chroot, namespace, module, reboot, syslog,
  page migration, clock and hostname calls, and memfd_create / memfd_secret (memory files, which the address-space
  cap does not count). Other syscalls are allowed: reading files the user may read, and writing to descriptors
  already open (the pipes to the trainer; a pool's worker points stdout and stderr at /dev/null first).
- the address space is capped (`RLIMIT_AS`, `memory_limit_mb`), so a runaway expression fails with
  MemoryError instead of exhausting the machine; the pool's per-sample timeout bounds its time.
- every capability is dropped (a trainer run as root: CAP_SYS_PTRACE would open other processes' memory through
  /proc, CAP_DAC_OVERRIDE other users' files); the pool's workers are also made not dumpable (`not_dumpable`), so
  that no process of the user can read their memory through /proc/<pid>/mem.

- reading files is limited to the interpreter, its libraries and the module path (`read_paths`, landlock.py),
  where the kernel has Landlock (Linux 5.13+): not the trainer's /proc entries, nor the user's home folder.

The seccomp part is a deny list, not an allow list: it closes the ways out that matter (running programs, the
network, the file system, other processes) while the interpreter keeps working. What a sample reads can leave
only through its reply (its reward, an error message); without Landlock it can read what the trainer's user can.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import resource
import struct

from jaxrl_llm.environments.landlock import restrict_reads

# prctl / seccomp constants (linux/prctl.h, linux/seccomp.h, linux/audit.h, linux/filter.h).
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_NR, _ARCH = 0, 4  # offsets in struct seccomp_data; args[i] (64-bit, little-endian) at 16 + 8 i


def _arg(i: int) -> int:
    return 16 + 8 * i


CLONE_THREAD = 0x00010000
# O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND (the same values on x86-64 and aarch64).
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000

# Per architecture: audit arch id, syscalls refused outright, and the numbers of the calls checked by argument.
_ARCHES = {
    "x86_64": dict(
        audit=0xC000003E, seccomp=317,
        deny=dict(execve=59, execveat=322, fork=57, vfork=58, socket=41, socketpair=53, connect=42, creat=85,
                  openat2=437, unlink=87, unlinkat=263, rename=82, renameat=264, renameat2=316, mkdir=83,
                  mkdirat=258, rmdir=84, link=86, linkat=265, symlink=88, symlinkat=266, chmod=90, fchmod=91,
                  fchmodat=268, chown=92, fchown=93, lchown=94, fchownat=260, truncate=76, mknod=133, mknodat=259,
                  utime=132, utimes=235, futimesat=261, utimensat=280, setxattr=188, lsetxattr=189,
                  fsetxattr=190, removexattr=197, lremovexattr=198, fremovexattr=199, tkill=200, ptrace=101,
                  process_vm_readv=310, process_vm_writev=311, io_uring_setup=425, io_uring_enter=426,
                  io_uring_register=427, name_to_handle_at=303, open_by_handle_at=304, mount=165, umount2=166,
                  pivot_root=155, chroot=161, setns=308, unshare=272, init_module=175, finit_module=313,
                  delete_module=176, kexec_load=246, reboot=169, acct=163, swapon=167, swapoff=168,
                  settimeofday=164, clock_settime=227, sethostname=170, setdomainname=171, iopl=172, ioperm=173,
                  bpf=321, perf_event_open=298, syslog=103, migrate_pages=256, move_pages=279, memfd_create=319,
                  memfd_secret=447),
        clone=56, clone3=435, open=2, openat=257, kill=62, tgkill=234),
    "aarch64": dict(
        audit=0xC00000B7, seccomp=277,
        deny=dict(execve=221, execveat=281, socket=198, socketpair=199, connect=203, openat2=437, unlinkat=35,
                  renameat=38, renameat2=276, mkdirat=34, linkat=37, symlinkat=36, fchmod=52, fchmodat=53,
                  fchown=55, fchownat=54, truncate=45, mknodat=33, utimensat=88, setxattr=5, lsetxattr=6,
                  fsetxattr=7, removexattr=14, lremovexattr=15, fremovexattr=16, tkill=130, ptrace=117,
                  process_vm_readv=270, process_vm_writev=271, io_uring_setup=425, io_uring_enter=426,
                  io_uring_register=427, name_to_handle_at=264, open_by_handle_at=265, mount=40, umount2=39,
                  pivot_root=41, chroot=51, setns=268, unshare=97, init_module=105, finit_module=273,
                  delete_module=106, kexec_load=104, reboot=142, acct=89, swapon=224, swapoff=225,
                  settimeofday=170, clock_settime=112, sethostname=161, setdomainname=162, bpf=280,
                  perf_event_open=241, syslog=116, migrate_pages=238, move_pages=239, memfd_create=279,
                  memfd_secret=447),
        clone=220, clone3=435, open=None, openat=56, kill=129, tgkill=131),
}


# Numbers shared by both architectures (the unified table from 403 on): the new mount API, and reaching other
# processes through pidfds.
_COMMON_DENY = dict(pidfd_send_signal=424, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432,
                    fspick=433, pidfd_getfd=438, process_madvise=440, mount_setattr=442)


class SandboxError(RuntimeError):
    """The process could not be confined (an unsupported platform or kernel)."""


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


@functools.cache
def _libc() -> ctypes.CDLL:
    """This process's C library with `prctl` typed (loaded once; a forked child inherits the handle)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _filter(machine: str, pid: int, allow_fork: bool = False) -> list[bytes]:
    a = _ARCHES[machine]
    eperm = _RET_ERRNO | errno.EPERM
    deny = {k: v for k, v in a["deny"].items() if not (allow_fork and k in ("fork", "vfork"))}
    prog = [_ins(_LD_W_ABS, _ARCH), _ins(_JEQ, a["audit"], 1, 0), _ins(_RET, _RET_KILL_PROCESS),
            _ins(_LD_W_ABS, _NR)]
    if machine == "x86_64":  # the x32 ABI's numbers (bit 30 set) would slip past the checks below
        prog += [_ins(_JGE, 0x40000000, 0, 1), _ins(_RET, eperm)]
    for nr in (*deny.values(), *_COMMON_DENY.values()):
        prog += [_ins(_JEQ, nr, 0, 1), _ins(_RET, eperm)]
    prog += [_ins(_JEQ, a["clone3"], 0, 1), _ins(_RET, _RET_ERRNO | errno.ENOSYS)]

    def checked(nr: int | None, block: list[bytes]) -> list[bytes]:
        """`block` (which always returns) runs for syscall `nr`; other calls jump over it."""
        return [] if nr is None else [_ins(_JEQ, nr, 0, len(block)), *block]

    def flags_block(arg: int) -> list[bytes]:  # refuse when any write/create flag is set
        return [_ins(_LD_W_ABS, _arg(arg)), _ins(_JSET, _WRITE_FLAGS, 0, 1), _ins(_RET, eperm), _ins(_RET, _RET_ALLOW)]

    own_pid = [_ins(_LD_W_ABS, _arg(0)), _ins(_JEQ, pid, 0, 1), _ins(_RET, _RET_ALLOW), _ins(_RET, eperm)]
    if not allow_fork:
        prog += checked(a["clone"], [_ins(_LD_W_ABS, _arg(0)), _ins(_JSET, CLONE_THREAD, 0, 1),
                                     _ins(_RET, _RET_ALLOW), _ins(_RET, eperm)])
    prog += checked(a["open"], flags_block(1))
    prog += checked(a["openat"], flags_block(2))
    if not allow_fork:  # a forking process must be able to kill its children (pids not known here)
        prog += checked(a["kill"], own_pid)
    prog += checked(a["tgkill"], own_pid)
    return [*prog, _ins(_RET, _RET_ALLOW)]


def confine(memory_limit_mb: int | None = 4096, *, allow_fork: bool = False, read_paths: list[str] | None = None
            ) -> int:
    """Confine this process for the rest of its life (see the module doc). Raises SandboxError where that is
    not possible; never partially: the address-space cap is set only after the filter is in place.

    allow_fork: leave fork and kill open, for a process that runs no model-written code itself but forks a child
    per sample, which confines itself again without them (filters stack: the child gets the stricter).
    read_paths: restrict reading files to these folders and files as well (landlock.py), for this thread and what
    it forks. Returns the Landlock ABI version that did so; 0 when read_paths is None or the kernel has none."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if os.uname().sysname != "Linux" or machine not in _ARCHES:
        raise SandboxError(f"the scoring sandbox needs Linux on x86-64 or aarch64; this is {os.uname().sysname} "
                           f"{platform.machine()}")
    prog = b"".join(_filter(machine, os.getpid(), allow_fork))
    n = len(prog) // 8
    buf = ctypes.create_string_buffer(prog, len(prog))

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Fprog(n, ctypes.cast(buf, ctypes.c_void_p))
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
    # seccomp(2) with TSYNC, not prctl: the filter must cover every thread of the process, including those
    # started before it (the worker's parent watcher, a library's pool), which Python code can reach (a thread
    # calls module functions that the evaluated text may have replaced).
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(_ARCHES[machine]["seccomp"]), ctypes.c_ulong(_SECCOMP_SET_MODE_FILTER),
                      ctypes.c_ulong(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.c_void_p(ctypes.addressof(fprog)))
    if rc != 0:
        why = os.strerror(ctypes.get_errno()) if rc < 0 else f"thread {rc} could not take the filter"
        raise SandboxError(f"installing the seccomp filter failed: {why} (a kernel without "
                           "CONFIG_SECCOMP_FILTER, or a container that forbids it)")
    # No capabilities (a trainer run as root): CAP_SYS_PTRACE would open other processes' /proc/<pid>/mem where
    # Landlock does not close /proc, and CAP_DAC_* would open others' files.
    hdr = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8)  # _LINUX_CAPABILITY_VERSION_3
    data = ctypes.create_string_buffer(24)
    if libc.capset(hdr, data) != 0:
        raise SandboxError(f"capset failed: {os.strerror(ctypes.get_errno())}")
    reads = 0
    if read_paths is not None:
        try:
            reads = restrict_reads(read_paths)
        except OSError as e:
            raise SandboxError(f"restricting reads failed: {e}") from e
    if memory_limit_mb is not None:
        limit = int(memory_limit_mb) * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        # The hard limit too: a soft limit alone could be raised again by the code it is meant to bound.
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return reads


_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4


def not_dumpable() -> None:
    """Make this process (and what it forks) not dumpable: other processes of the user cannot open its
    /proc/<pid>/mem, nor attach to it (Linux only)."""
    if os.uname().sysname == "Linux" and _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SandboxError(f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}")


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the thread that forked it) ends (Linux only)."""
    if os.uname().sysname != "Linux":
        return
    libc = _libc()
    if libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:
        raise SandboxError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
