"""Run metrics: metrics.jsonl (one object per logged step, always with "step"), TensorBoard event files,
Weights & Biases when installed and enabled, and a console line with progress and ETA."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)


def reduce_steps(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One row of several steps' (or updates') scalar metrics: the least of a `*_min`, the most of a `*_max`, the
    mean of every other, each over the rows that have it."""
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for r in rows for k in r):
        vals = [float(r[k]) for r in rows if k in r]
        out[k] = min(vals) if k.endswith("_min") else max(vals) if k.endswith("_max") else math.fsum(vals) / len(vals)
    return out


class StepWindow:
    """The steps since the last logged row. With log_every = k a row holds what `reduce_steps` makes of the k steps
    (the window's mean loss, as HF's Trainer and TRL log it), not a sample of the k-th step alone.

    rates: {rate: the time it is per}, e.g. {"tokens_per_s": "step_time_s"}: the window's rate is what its steps did
    over the time they took (each step's rate weighted by its time), not the mean of their rates (a 10 s step at 100
    tokens/s and a 1 s step at 1000 make 182 tokens/s, not 550)."""

    def __init__(self, rates: Mapping[str, str] | None = None) -> None:
        self._rows: list[dict[str, float]] = []
        self._rates = dict(rates or {})

    def add(self, metrics: Mapping[str, Any]) -> None:
        row = {k: float(v) for k, v in metrics.items()}
        for rate, time_key in self._rates.items():
            if rate in row and time_key in row:
                row[rate] *= row[time_key]  # (the amount: a rate of amount / max(time, 1e-9))
        self._rows.append(row)

    def __len__(self) -> int:
        """Steps in the window (not yet in a row)."""
        return len(self._rows)

    def pending(self) -> list[dict[str, float]]:
        """The window's steps as a checkpoint keeps them in its meta (JSON: finite values only), so that a run
        resumed from it logs them in its first row (`restore`) as the uninterrupted run does: a row covers the same
        steps and no step goes unlogged (log_every=3, a checkpoint at step 4, a crash in step 6: step 4 was in no
        row, and row 6 held steps 5-6)."""
        return [{k: v for k, v in r.items() if math.isfinite(v)} for r in self._rows]

    def restore(self, rows: Sequence[Mapping[str, float]]) -> None:
        """The steps `pending` gave, ahead of those added from now on."""
        self._rows = [{k: float(v) for k, v in r.items()} for r in rows] + self._rows

    def take(self) -> dict[str, float]:
        """The window's row; the next window starts empty."""
        rows, self._rows = self._rows, []
        out = reduce_steps(rows)
        for rate, time_key in self._rates.items():
            if rate in out and time_key in out:
                out[rate] /= max(out[time_key], 1e-9)
        return out


class MetricsWriter:
    """Writes from the main process only (`enabled`); every sink gets the same flat dict of scalars."""

    def __init__(self, workdir: str, max_steps: int, *, enabled: bool = True, start_step: int = 0,
                 tensorboard: bool = True, wandb_project: str = "", run_config: dict | None = None,
                 console_keys: tuple[str, ...] | None = None):
        """console_keys: the metrics shown on the console line (all when None; every sink still gets all)."""
        self.enabled = enabled
        self.console_keys = console_keys
        self.max_steps = max_steps
        self.start_step = start_step
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._t0 = time.time()
        self._first: tuple[float, int] | None = None  # (time, step) of this start's first row: the ETA's origin
        self._tb = None
        self._wandb = None
        self._wandb_from = 0  # W&B's next step: a resumed run's earlier steps are not sent (W&B warns and drops them)
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        # W&B first: a failed login stops the run before anything is written
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("metrics.wandb_project=%r but wandb is not installed; skipping W&B", wandb_project)
            else:
                self._wandb = _wandb_run(wandb, workdir, wandb_project, run_config, start_step)
                # A resume from an earlier checkpoint than the W&B run's last step recomputes the steps between (the
                # same numbers); W&B would print a warning for each ("Tried to log to step ..."), and drop it.
                next_step = getattr(self._wandb, "step", 0)  # (not a number in old wandb's disabled mode)
                self._wandb_from = next_step if start_step and isinstance(next_step, int) else 0
                if self._wandb_from > start_step + 1:
                    log.info("the W&B run already has steps to %d: this resume sends it the steps after that",
                             self._wandb_from - 1)
        if tensorboard:
            from jaxrl_llm.workdir import set_aside

            logdir = os.path.join(workdir, "tensorboard")
            if start_step == 0 and os.path.isdir(logdir) and os.listdir(logdir):  # as metrics.jsonl: kept aside
                log.warning("%s held an earlier run's events (no checkpoint to resume from): moved to %s", logdir,
                            set_aside(logdir))
            self._tb = EventFile(logdir, purge_step=start_step + 1 if start_step else None,
                                 filename_suffix=f".{os.getpid()}.{start_step}")

    def step_done(self, step: int) -> None:
        """The end of a training step (called before its row is written): the ETA's rate counts from the end of this
        start's first step, so that a first row of several steps (log_every > 1) does not count the start-up and
        the first compiles as steps (log_every=5: "eta 25s" with 2 s left)."""
        self._first = self._first or (time.time(), int(step))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} (writing step {step}'s metrics)", self.path) from None
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        if self._tb is not None:
            self._tb.add_scalars(step, scalars)
        if self._wandb is not None and step >= self._wandb_from:
            self._wandb.log(scalars, step=step)
        now = time.time()
        elapsed = now - self._t0
        # The rate since the end of this start's first step (step_done; else its first row): start-up and the first
        # compiles (often most of a short run's elapsed time) would otherwise inflate every ETA of the run.
        self._first = self._first or (now, step)
        t1, s1 = self._first
        rate = (now - t1) / (step - s1) if step > s1 else elapsed / max(step - self.start_step, 1)
        # A first row of one step has only start-up and compiles to go by (30 s of them before 1 s steps made
        # "eta 2970s" of 100 s): unknown until the next row.
        eta = "?" if step == s1 and step - self.start_step <= 1 and step < self.max_steps else \
            f"{rate * max(self.max_steps - step, 0):.0f}s"
        keys = [k for k in row if k != "step"] if self.console_keys is None else \
            [k for k in self.console_keys if k in row] + [k for k in row if k.startswith("val_")]
        # (from the values as given: metrics.jsonl's null for a NaN showed as "loss=None")
        shown = " ".join(f"{k}={_fmt(_scalar(metrics[k]))}" for k in dict.fromkeys(keys))
        print(f"[step {step}/{self.max_steps} {_bar(step, self.max_steps)}] {shown} | elapsed {elapsed:.0f}s "
              f"eta {eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        from jaxrl_llm.workdir import close_all

        close_all(self._tb and self._tb.close, self._wandb and self._wandb.finish)


WANDB_ID_FILE = "wandb_run_id"  # in the workdir: the W&B run a restart of this run logs to


def _wandb_run(wandb: Any, workdir: str, project: str, run_config: dict | None, start_step: int) -> Any:
    """wandb.init for this run: a fresh start (start_step 0) opens a new W&B run and records its id in
    WORKDIR/wandb_run_id; a resumed one continues the recorded run (the writer does not send it steps it already has: a
    resume recomputes them identically). A failed init (not logged in, no network) is a ConfigError naming
    metrics.wandb_project, before any training."""
    from jaxrl_llm.cli import ConfigError
    from jaxrl_llm.workdir import write_atomically

    id_path = os.path.join(workdir, WANDB_ID_FILE)
    run_id = None
    if start_step and os.path.isfile(id_path):
        with open(id_path) as f:
            run_id = f.read().strip() or None
    try:
        run = wandb.init(project=project, dir=workdir, config=run_config, id=run_id, resume="allow")
    except Exception as e:  # noqa: BLE001 (wandb raises its own kinds: UsageError, CommError, ...)
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ConfigError(f"metrics.wandb_project={project!r}: W&B could not start a run ({detail}); log in with "
                          "`wandb login` (or set WANDB_API_KEY / WANDB_MODE=offline), or set "
                          "--config.metrics.wandb_project='' to train without W&B") from None
    if run_id is None and getattr(run, "id", None):
        write_atomically(id_path, str(run.id))
    return run


class EventFile:
    """TensorBoard scalars written by the caller's thread into one event file (TFRecord framing of `Event` protos,
    as tensorboardX writes them): handed to the OS at every write (TensorBoard reads them at once, and a killed
    run keeps them), fsynced at most every `flush_s` seconds and at close. tensorboardX's own SummaryWriter
    writes from a thread of its own: when a write fails there (a full disk) that thread dies, its bounded queue
    fills, and the next add_scalar blocks forever, a run hung with no error that a scheduler's SIGTERM cannot
    stop at a step. Here the error reaches the run: an OSError naming the file.

    purge_step: a resumed run logs its steps after the checkpoint again, and TensorBoard drops the earlier run's
    events from that step on instead of drawing both (a SessionLog START at it, as SummaryWriter(purge_step=)
    writes). Files are named as tensorboardX names them, by the second they open in; `filename_suffix` keeps a
    restart within it from overwriting."""

    def __init__(self, logdir: str, purge_step: int | None = None, filename_suffix: str = "",
                 flush_s: float = 10.0) -> None:
        import socket

        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.path = os.path.join(logdir, f"events.out.tfevents.{str(time.time())[:10]}.{socket.gethostname()}"
                                         f"{filename_suffix}")
        self.flush_s, self._last_sync = flush_s, time.monotonic()
        self._f = self._guard(lambda: (os.makedirs(logdir, exist_ok=True), open(self.path, "ab"))[1])
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(step=purge_step, file_version="brain.Event:2"))
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self._guard(self._f.flush)

    def _guard(self, fn):
        try:
            return fn()
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} (writing TensorBoard events)", self.path) from None

    def _write(self, event) -> None:
        from tensorboardX.record_writer import masked_crc32c

        event.wall_time = event.wall_time or time.time()
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        record = header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))
        self._guard(lambda: self._f.write(record))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Each scalar under its own name, as metrics.jsonl and W&B have it (tensorboardX's `scalar` would rename
        `val_pass@1` to `val_pass_1`, a tag TensorBoard itself does not need)."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        for k, v in scalars.items():
            self._write(Event(summary=Summary(value=[Summary.Value(tag=k, simple_value=float(v))]), step=int(step)))
        self._guard(self._f.flush)
        if time.monotonic() - self._last_sync >= self.flush_s:
            self.sync()

    def sync(self) -> None:
        self._guard(lambda: os.fsync(self._f.fileno()))
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._guard(self._f.flush)
                self.sync()
            finally:
                try:
                    self._f.close()
                except OSError:  # (what the flush above could not write; it raised already)
                    pass


def _bar(step: int, total: int, width: int = 20) -> str:
    filled = int(width * step / max(total, 1))
    return "#" * filled + "." * (width - filled)


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _plain(v: Any) -> Any:
    """Device/numpy scalars to plain Python numbers for JSON; NaN and infinities (which JSON cannot hold) to
    None, so metrics.jsonl stays strict JSON."""
    v = _scalar(v)
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(v: Any) -> str:
    """4 significant digits; 10^4 to 10^9 whole ("tokens_per_s=27660", not "2.766e+04")."""
    if isinstance(v, float):
        return (f"{v:.0f}" if 1e4 <= abs(v) < 1e9 else f"{v:.4g}") if math.isfinite(v) else str(v)
    return str(v)


def quiet_libraries() -> None:
    """Orbax and JAX log every checkpoint phase at INFO through absl; keep the console for our own lines."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # under app.run this sets the root logger's level
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("jaxrl_llm").setLevel(logging.INFO)  # ours ("resumed from ...", "wrote ...") still show
