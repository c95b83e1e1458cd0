"""The files of a run's workdir that are not checkpoints: metrics.jsonl kept in step with the checkpoint a run
resumes from, and run_config.json, the full recipe (with overrides) of the run's latest start."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from jaxrl_llm.data.sources import describe_source

log = logging.getLogger("jaxrl_llm.train")
MODEL_CONFIG_FILE = "model_config.json"  # the run's ModelConfig, for export and evaluation
RUN_CONFIG_FILE = "run_config.json"  # the whole recipe as the latest start ran it


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
    new one) whole, and at worst a stray <path>.tmp-<pid> / <path>.old-<pid> beside it."""
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    fill(tmp)
    if os.path.lexists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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
