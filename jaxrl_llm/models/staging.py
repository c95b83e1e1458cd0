"""Hidden folders an export is written in before it is swapped into place (`.NAME.tmp-XXXX`, and `.NAME.old-XXXX`
for the export it replaces), and their removal when a killed export (SIGKILL, a node lost) left them behind.

The writer holds a `flock` on its folders while it works, so a later export to the same place can tell a
leftover (no holder: removed, with a warning naming it and its size) from another export still writing (held:
left alone). A process's death releases its locks. Where the file system cannot lock a folder, nothing is
removed."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)


def _try_lock(path: str) -> int | None:
    """An fd of folder `path` with an exclusive flock on it, or None (held by another process, or not lockable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(d, f)))


def remove_leftovers(parent: str, name: str) -> list[str]:
    """Remove `.name.tmp-*` / `.name.old-*` folders in `parent` that no live export holds; returns their paths."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-[a-z0-9_]{{8}}")  # mkdtemp's names only
    removed = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        path = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or os.path.islink(path) or not os.path.isdir(path):
            continue
        fd = _try_lock(path)
        if fd is None:
            continue
        try:
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        log.warning("removed %s (%.1f MB), left by an export that did not finish", path, size / 1e6)
        removed.append(path)
    return removed


@contextlib.contextmanager
def staging_folder(parent: str, name: str, kind: str = "tmp") -> Iterator[str]:
    """A new hidden folder `.name.kind-XXXX` in `parent`, locked while the block runs (see the module doc)."""
    new = tempfile.mkdtemp(prefix=f".{name}.new-", dir=parent)  # a name remove_leftovers leaves alone
    fd = _try_lock(new)
    path = os.path.join(parent, f".{name}.{kind}-{os.path.basename(new)[len(name) + 6:]}")
    os.rename(new, path)  # seen by remove_leftovers only once locked (the lock goes with the folder)
    try:
        yield path
    finally:
        if fd is not None:
            os.close(fd)
