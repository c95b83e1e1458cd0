"""The files of a run's workdir that are not checkpoints: metrics.jsonl kept in step with the checkpoint a run
resumes from, run_config.json, the full recipe (with overrides) of the run's latest start, and run.lock, which
keeps a second run out of the workdir while one trains in it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax

from jaxrl_llm import distributed
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.data.sources import describe_source
from jaxrl_llm.models.safetensors_io import CheckpointError

log = logging.getLogger("jaxrl_llm.train")
MODEL_CONFIG_FILE = "model_config.json"  # the run's ModelConfig, for export and evaluation
RUN_CONFIG_FILE = "run_config.json"  # the whole recipe as the latest start ran it
LOCK_FILE = "run.lock"  # locked (flock) by the run training in the workdir; says which run that is


def _lock(workdir: str) -> tuple[int | None, str | None]:
    """Locks <workdir>/run.lock: (its fd, None), or (None, why this run may not train here) when another run holds
    it or the workdir is not writable. Where the file system cannot lock, warns and returns (None, None): the run
    goes on unguarded."""
    path = os.path.join(workdir, LOCK_FILE)
    flags = os.O_CLOEXEC | os.O_NOFOLLOW  # never through a link
    fd, writable, why = None, True, None
    try:  # mode 0o666: the umask decides, as for the run's other files
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
    except OSError as e:
        why = e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            try:  # another user's lock file (a shared project folder): flock needs no write access
                fd, writable = os.open(path, os.O_RDONLY | flags), False
            except FileNotFoundError:
                return None, f"workdir {workdir!r} is not writable by this run ({e})"
            except OSError as e2:
                why = e2
    if fd is None:
        log.warning("%s: cannot be opened (%s): nothing keeps a second run out of this workdir", path, why)
        return None, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            log.warning("%s: the file system cannot lock it (%s): nothing keeps a second run out of this workdir",
                        path, e)
            return None, None
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "it has not said which yet"
        os.close(fd)
        return None, (f"workdir {workdir!r} is in use by another run ({holder}; {LOCK_FILE} is locked): two runs "
                      "in one workdir would overwrite each other's checkpoints and metrics; let that run end (or "
                      "stop it), or use another workdir")
    n = jax.process_count()
    note = (f"pid {os.getpid()} on {socket.gethostname()}" + (f" (process 0 of a {n}-process job)" if n > 1 else "")
            + f", started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode()
    if not writable:
        log.warning("%s: locked, but read-only to this run (another user's file): it still names an earlier run", path)
        return fd, None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
    except OSError as e:  # still locked; only the note for the next run's error is missing
        log.warning("%s: locked, but could not say which run holds it (%s)", path, e)
    return fd, None


@contextlib.contextmanager
def hold_workdir(workdir: str) -> Iterator[None]:
    """Keeps a second run out of `workdir` while this one trains in it (both would write checkpoints/ and
    metrics.jsonl: the later run's checkpoints would be taken for the first's, or the other way round). Process 0
    locks <workdir>/run.lock (flock: released when it ends, even by SIGKILL, so a crashed run leaves no stale
    lock); every process of the job learns whether it did, and a held lock is a ConfigError on each, naming the
    holder, raised before anything is written; so is a workdir that cannot be made or written. The file stays
    behind; it is never deleted (a run deleting it could let two later ones lock two different files). File systems
    that cannot lock get a warning; ones that lock per host only (Lustre `localflock`, NFS `local_lock=flock`)
    keep out only runs whose process 0 is on the same host."""
    problem, fd = None, None
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        problem = f"workdir {workdir!r} cannot be made ({e})"
    else:
        if not os.access(workdir, os.W_OK | os.X_OK):
            problem = f"workdir {workdir!r} is not writable by this run"
    if problem is None and jax.process_index() == 0:
        fd, problem = _lock(workdir)
    try:
        if jax.process_count() > 1:  # every process learns every process's problem (a collective: none waits)
            p, why = next(((p, why) for p, why in enumerate(distributed.allgather_json(problem)) if why), (0, None))
            problem = f"process {p}: {why}" if p else why
        if problem is not None:
            raise ConfigError(problem)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def read_model_config(workdir: str) -> dict[str, Any]:
    """<workdir>/model_config.json (export and evaluation build the run's model from its hf_config). One that does not
    read as such (empty: what a kill while versions before 2026-12-05 rewrote it left; edited by hand) is a
    CheckpointError naming it and saying how to get it back."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("hf_config"), dict):
            raise ValueError("it holds no hf_config object")
    except ValueError as e:  # (json's and UTF-8's decode errors too)
        raise CheckpointError(f"{path}: unreadable ({e}); the run's training command, started again, writes it anew "
                              "before it trains (and trains nothing when its checkpoint is at max_steps)") from None
    return doc


def set_aside(path: str) -> str:
    """Renames an existing file to <path>.<k>.old (the first k free) and returns the new name."""
    k = 1
    while os.path.exists(f"{path}.{k}.old"):
        k += 1
    os.replace(path, f"{path}.{k}.old")
    return f"{path}.{k}.old"


def write_atomically(path: str, text: str) -> None:
    """path's new text, whole or not at all: a kill mid-write leaves the old file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def replace_folder(path: str, fill) -> None:
    """Build a folder with fill(tmp_path) next to `path`, then swap it in: a kill leaves the old folder (or the
    new one) whole, and at worst a stray <path>.tmp-<pid> / <path>.old-<pid> beside it, which the next call
    removes (the caller holds the workdir: no other run writes beside it). A fill that fails (a full disk,
    Ctrl-C) leaves nothing behind."""
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    parent, name = os.path.split(path)
    for stale in os.listdir(parent or "."):
        if re.fullmatch(re.escape(name) + r"\.(tmp|old)-\d+", stale):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def keep_earlier_export(workdir: str, start_step: int) -> None:
    """A run that starts from step 0 in a folder holding an earlier run's HF export (a run without checkpoints,
    run again) moves WORKDIR/hf aside to hf.<k>.old, as it does metrics.jsonl: its own export would replace the
    earlier trained model without a word. A resumed run re-exports in place (the same run's model)."""
    path = os.path.join(workdir, "hf")
    if start_step == 0 and os.path.isdir(path) and os.listdir(path):
        log.warning("%s held an earlier run's exported model (no checkpoint to resume from): moved to %s", path,
                    set_aside(path))


def export_is_current(workdir: str, start_step: int, max_steps: int) -> bool:
    """Whether a run resumed at its last step (nothing left to train) finds its export already written: hf/ is
    written whole or not at all (staged, then swapped in) and only after the last step, so it is this model's."""
    return start_step >= max_steps and os.path.isfile(os.path.join(workdir, "hf", "config.json"))


def logged_metrics(workdir: str, step: int) -> dict[str, Any]:
    """metrics.jsonl's row of `step` (without "step"), or {} when it has none or does not read: what `train.run`
    returns when started again on a finished run (it trains nothing, and returned no "loss")."""
    found: dict[str, Any] = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("step") == step:
                    found = {k: v for k, v in row.items() if k != "step"}
    except OSError:
        return {}
    return found


def truncate_metrics(path: str, last_step: int) -> None:
    """On resume, drop rows logged after the restored step (they are logged again), atomically. A run that
    starts from step 0 in a folder whose metrics.jsonl has rows (an earlier run without checkpoints) moves that
    file aside to metrics.jsonl.<k>.old instead of appending to it or deleting it."""
    if not os.path.exists(path):
        return
    if last_step == 0:
        if os.path.getsize(path):
            log.warning("%s held an earlier run's rows (no checkpoint to resume from): moved to %s", path,
                        set_aside(path))
        return
    rows, bad = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill, or not ours
                bad.append(n)
                continue
            if step <= last_step:
                rows.append(line if line.endswith("\n") else line + "\n")
    if bad:
        log.warning("%s: line(s) %s are not metrics rows (cut short when the run was killed?): left out; the file "
                    "as it was is kept as %s", path, bad[:10], set_aside(path))
    write_atomically(path, "".join(rows))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts; lists and other leaves are compared whole."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs (added keys read 'unset -> new')."""
    old, new = _flat(before), _flat(now)
    missing = object()
    lines = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k, missing), new.get(k, missing)
        if a != b:
            lines.append(f"{k}: {'unset' if a is missing else json.dumps(a)} -> "
                         f"{'unset' if b is missing else json.dumps(b)}")
    return lines


def open_run_records(workdir: str, config: Any, start: int, is_main: bool,
                     console_keys: tuple[str, ...] | None = None) -> tuple[Any, dict[str, Any]]:
    """A run's records as it starts at step `start` (0, or the restored checkpoint's): process 0 cuts metrics.jsonl
    back to `start`, sets aside an export of a later step and records the config; every process opens its
    MetricsWriter (which writes on process 0). Returns (writer, last): `last` is a finished run's last logged
    metrics when it is started again (it trains nothing), else {}."""
    from jaxrl_llm.metrics import MetricsWriter

    if is_main:
        truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start)
        keep_earlier_export(workdir, start)
        record_run_config(workdir, config.to_dict(), start)
    mc = config.get("metrics") or {}
    writer = MetricsWriter(workdir, config.max_steps, enabled=is_main, start_step=start,
                           tensorboard=mc.get("tensorboard", True), wandb_project=mc.get("wandb_project", ""),
                           run_config=config.to_dict(), console_keys=console_keys)
    return writer, (logged_metrics(workdir, start) if start >= config.max_steps else {})


def record_run_config(workdir: str, config: dict[str, Any], start_step: int) -> list[str]:
    """Write `config` (the run's whole recipe as a plain dict) to <workdir>/run_config.json, atomically, and
    return the settings that changed since the file was written (empty for a new run or an unchanged one).

    Resuming (start_step > 0) with changed settings is allowed (the settings that would break an exact resume
    are refused earlier, by train.check_resume) but logged, key by key, and the earlier file is kept as
    run_config.json.<k>.old, so the folder records every configuration that wrote its checkpoints. A run that
    starts from step 0 over an earlier run's file (which left no checkpoint) moves that file aside as well."""
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    text = json.dumps(config, indent=2, sort_keys=True, default=describe_source) + "\n"
    now = json.loads(text)  # tuples become lists, as they read back from the file
    changes: list[str] = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                before = json.load(f)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); kept as %s", path, e, set_aside(path))
        else:
            changes = config_changes(before, now) if isinstance(before, dict) else ["(not a JSON object)"]
            if changes and start_step > 0:
                note = ("; the learning-rate schedule now spans the new max_steps, so from this step on the rate is "
                        "that of a run of the new length (it changes at once)"
                        if any(c.startswith("max_steps:") for c in changes) else "")
                log.warning("resuming at step %d with %d setting(s) changed since the last start (the earlier "
                            "settings are kept as %s): %s%s", start_step, len(changes), set_aside(path),
                            "; ".join(changes), note)
            elif changes:
                log.warning("%s held an earlier run's settings (no checkpoint to resume from): moved to %s", path,
                            set_aside(path))
    write_atomically(path, text)
    return changes


def close_all(*closers, after_error: bool = False) -> None:
    """Call every closer (None: skipped), each even when one before it raised; then raise the first error. A run's
    end (a final save failing on a full disk, say) must still stop its reward workers and close its files.
    after_error: the run is already stopping on an error (the one to say): the closers' errors are logged only."""
    first: BaseException | None = None
    for close in closers:
        if close is None:
            continue
        try:
            close()
        except BaseException as e:  # noqa: BLE001 (raised below, after the others are closed)
            if first is None and not after_error:
                first = e
            else:
                log.warning("while closing after an error: %s: %s", type(e).__name__, e)
    if first is not None:
        raise first
