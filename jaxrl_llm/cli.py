"""Command-line parsing shared by `python -m jaxrl_llm.train` and `python -m jaxrl_llm.evaluate`: absl flags with
an ml_collections --config, where a user's mistake (an unknown key, a bad value, a recipe file that is missing or
does not load) is one line instead of a traceback; and how such a process ends in a multi-process job."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Any

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


class ConfigError(ValueError):
    """A recipe or command-line override is invalid; the message names the key."""


def _recipe(config_file: str) -> Any:
    """`config_file`'s get_config() (`path:arg` passes arg), or None when the recipe does not load (the flags'
    own parse then says why)."""
    import runpy

    path, _, arg = config_file.partition(":")
    try:
        return runpy.run_path(path)["get_config"](*([arg] if arg else []))
    except Exception:  # noqa: BLE001 (a broken recipe: let the flags error speak)
        return None


def unknown_override(config_file: str, args: list[str]) -> str | None:
    """A one-line message for the first `--config.a.b=v` whose key the recipe does not have, or None."""
    import difflib

    base = _recipe(config_file)
    if base is None:
        return None
    for arg in args:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node, seen = base, []
        for part in path:
            keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict | dict) else []
            if part not in keys:
                where = ".".join(["config", *seen])
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                msg = f"unknown config key {'.'.join(seen + [part])!r}: {hint}valid keys under {where}: {sorted(keys)}"
                if seen and isinstance(node, ml_collections.ConfigDict | dict) and not keys:  # an open dict
                    msg += (f" (it is empty in the recipe: set it whole, e.g. --config.{'.'.join(seen)}="
                            f"'{{\"{part}\": ...}}')")
                return msg
            node, seen = node[part], seen + [part]
    return None


# Flags and config keys (by their last part) that name files or folders: `~/` in them is the home folder
PATH_FLAGS = ("--workdir", "--out", "--config")
PATH_KEYS = ("path", "source", "tokenizer")


def expand_home(arg: str) -> str:
    """`--workdir=~/x` -> `--workdir=/home/me/x` (the shell expands `~` only at the start of a word), for the flags
    and config keys that name paths (PATH_FLAGS, PATH_KEYS); another value (a prompt of "~") is left as typed."""
    if arg.startswith("--") and "=" in arg:
        name, value = arg.split("=", 1)
        pathlike = name in PATH_FLAGS or (name.startswith("--config.") and name.rsplit(".", 1)[1] in PATH_KEYS)
        if pathlike and (value == "~" or value.startswith("~/")):
            return f"{name}={os.path.expanduser(value)}"
    return arg


def _config_file(argv: list[str]) -> str | None:
    """The last --config file named on the command line (absl's last flag wins), or None."""
    cfg_file = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            cfg_file = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            cfg_file = argv[i + 1]
    return cfg_file


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with user errors (unknown key, bad value, a recipe file that is missing or does not
    load) as one line instead of a traceback. A path written `--workdir=~/x` (which the shell leaves as it is) is
    in the home folder, as `--workdir ~/x` is; `--config.k=None` for a placeholder field is None."""
    argv, none_keys = _split_none_overrides([expand_home(a) for a in argv])
    try:
        rest = FLAGS(argv)
    except SystemExit as e:  # absl's --help prints the usage and exits 1: asking for help is not an error
        if e.code == 1 and any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        if "Error whilst parsing config file" in str(e):  # get_config() raised: its error, not the traceback
            sys.exit(f"error: --config={_config_file(argv)}: get_config() failed: {_last_line(e)}")
        sys.exit(f"error: {e}")
    except OSError as e:  # an override of a --config that did not load (ml_collections loads it to apply it)
        sys.exit(f"error: --config: the recipe does not load: {_last_line(e)}")
    except SyntaxError as e:
        sys.exit(f"error: --config={e.filename}: the recipe does not parse: {e.msg} (line {e.lineno})")
    except ImportError as e:
        sys.exit(f"error: --config={_config_file(argv)}: the recipe does not load: {e}")
    except (AttributeError, KeyError) as e:
        cfg_file = _config_file(argv)
        if "has no attribute 'get_config'" in str(e):
            sys.exit(f"error: --config={cfg_file}: the recipe defines no get_config() (it must return an "
                     "ml_collections.ConfigDict)")
        msg = unknown_override(cfg_file, argv) if cfg_file else None
        sys.exit(f"error: {msg or e}")
    if rest[1:]:  # main() takes no positional arguments: a word here is a mistyped flag, not one to drop
        sys.exit(f"error: unexpected argument(s) {rest[1:]}: overrides are --config.a.b=value (a boolean too: "
                 "--config.export_hf=False, not --config.export_hf False)")
    try:  # the file absl settled on (the last --config given)
        cfg_file = config_flags.get_config_filename(FLAGS["config"]) if FLAGS["config"].present else None
    except Exception:  # noqa: BLE001 (no file name to check: main() reports a missing --config)
        cfg_file = None
    if cfg_file and not os.path.isfile(cfg_file.split(":", 1)[0]):
        sys.exit(f"error: --config={cfg_file}: no such file")
    try:
        loaded = FLAGS.config  # (ml_collections loads the recipe here, or raises what its load raised)
    except OSError as e:
        sys.exit(f"error: --config={cfg_file}: the recipe does not load: {_last_line(e)}")
    if loaded is not None and not isinstance(loaded, ml_collections.ConfigDict):
        sys.exit(f"error: --config={cfg_file}: get_config() returned a {type(loaded).__name__}, not an "
                 "ml_collections.ConfigDict")
    if loaded is not None:
        set_none(loaded, none_keys)
    return rest


def _split_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the `--config.k=None` / `--config.k None` overrides of keys whose recipe field may be None (a
    `config_dict.placeholder`, whose comment says what None means), the keys whose last override is None).
    ml_collections would read the text 'None' into a text field and refuse it for a number; `set_none` sets them
    after the parse."""
    cfg_file = _config_file(argv)
    if not cfg_file:
        return argv, []
    nones: dict[str, list[int]] = {}  # key -> the argv positions of its `None` overrides (1 or 2 words each)
    last_none: dict[str, bool] = {}  # key -> whether its last override is None (the last given wins)
    for i, arg in enumerate(argv):
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            last_none[key] = value == "None"
            if value == "None":
                nones.setdefault(key, []).extend([i] if eq else [i, i + 1])
    if not nones:
        return argv, []
    recipe = _recipe(cfg_file)
    if recipe is None:
        return argv, []
    keys, drop = [], set()
    for key, positions in nones.items():
        *parents, name = key.split(".")
        node = recipe
        try:
            for part in parents:
                node = node[part]
        except (KeyError, AttributeError, TypeError):
            continue
        field = node._fields.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if isinstance(field, ml_collections.FieldReference):
            drop.update(positions)
            if last_none[key]:
                keys.append(key)
    return [a for j, a in enumerate(argv) if j not in drop], keys


def set_none(config: ml_collections.ConfigDict, keys: list[str]) -> None:
    for key in keys:
        *parents, name = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[name] = None


def _last_line(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else repr(e)


def exit_with_error(message: str, status: int = 1, at_once: bool = False) -> None:
    """Print `message` and exit with `status`. In a multi-process job (or `at_once`), at once (os._exit): a normal
    exit waits in jax.distributed's shutdown barrier for processes that are stuck in a collective this one left,
    so the job would hang for minutes and then abort, instead of the launcher stopping the others right away."""
    if at_once or (jax.distributed.is_initialized() and jax.process_count() > 1):
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(status)
    if status == 1:
        sys.exit(message)  # (prints it)
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


# a write the file system refused: a full disk, a quota, a read-only mount
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def where_interrupted(tb) -> str:
    """file:line in function of the innermost frame of this library in traceback `tb` (where a Ctrl-C landed),
    below the frame that caught it."""
    frames = [f for f in traceback.extract_tb(tb)[1:] if f"{os.sep}jaxrl_llm{os.sep}" in f.filename]  # [0]: main
    if not frames:
        return "during start-up"
    f = frames[-1]
    return f"in {f.name} ({os.path.relpath(f.filename, os.path.dirname(os.path.dirname(__file__)))}:{f.lineno})"


def exit_if_job_crashed(e: BaseException) -> None:
    """In a multi-process job, an unexpected exception (a bug, a full disk, Ctrl-C): print its traceback and end the
    process at once, as exit_with_error does, so that the launcher stops the others; otherwise return."""
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        if isinstance(e, SystemExit):  # its message, as sys.exit would print it
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        else:
            traceback.print_exc()
            code = 130 if isinstance(e, KeyboardInterrupt) else 1
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
