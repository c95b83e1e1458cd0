"""Orbax checkpoints of the whole train state: save every N steps (async), keep the last K, resume exactly.

A save is written to a temporary folder and renamed when complete (Orbax's atomicity), so a process killed
mid-save leaves the previous checkpoint restorable (and the next start removes the temporary folder). Restoring
takes the target shardings from the state the run has built, so a checkpoint restores onto a different mesh shape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jaxrl_llm.models.safetensors_io import CheckpointError

log = logging.getLogger(__name__)
GONE_WAIT_S = 2.0  # how long a reader waits for a step folder that failed to read to finish being deleted


@jax.jit
def _finite_flags(tree: Any) -> list[jax.Array]:
    return [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def non_finite(items: dict[str, Any]) -> list[str]:
    """Names ("params/layers/wq", ...) of the floating arrays in `items` holding a NaN or Inf (one jitted pass; every
    process of a multi-process job gets the same answer)."""
    leaves = [(jax.tree_util.keystr(path, simple=True, separator="/"), x)
              for path, x in jax.tree_util.tree_flatten_with_path(items)[0] if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = np.asarray(jax.device_get(_finite_flags(items)), bool) if leaves else np.ones(0, bool)
    return [name for (name, _), ok in zip(leaves, flags, strict=True) if not ok]


def require_finite(items: dict[str, Any], what: str) -> None:
    """FloatingPointError naming the arrays of `items` that hold a NaN or Inf; `what` says what was refused."""
    bad = non_finite(items)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise FloatingPointError(f"{what}: {', '.join(bad[:5])}{more} hold NaN or Inf")


class _Gone(FileNotFoundError):
    """The step being read was deleted meanwhile (by the run writing the folder, keeping its last K)."""


@contextlib.contextmanager
def _absl_quiet():
    """Orbax warns through absl on every read-only open ("Given directory is read only"): nothing to act on."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def weights_checksum(params: Any) -> str:
    """A short hex digest of the exact bits of every parameter: per leaf, the wrapping uint32 sum of its elements'
    bit patterns (integer sums do not depend on the order, so not on the mesh or the number of processes), then
    SHA-256 of those sums. One pass over the weights on their devices; a resume compares the reference model's."""
    import hashlib

    sums = jax.device_get(_bit_sums(params))
    return hashlib.sha256(np.asarray(sums, np.uint32).tobytes()).hexdigest()[:20]


@jax.jit
def _bit_sums(params: Any) -> list[jax.Array]:
    """Per leaf, the wrapping uint32 sum of its elements' bit patterns (module-level: compiled once per layout)."""

    def leaf(x):
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width)  # (an 8-byte leaf splits into two uint32 words)
        return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)

    return [leaf(x) for x in jax.tree.leaves(params)]


@contextlib.contextmanager
def orbax_info_quiet():
    """Orbax logs every phase of each save and restore at INFO through absl (about 60 lines a checkpoint): its INFO
    records are dropped while the block runs (a training run called from Python; the programs quiet absl for good,
    metrics.quiet_libraries), so a notebook logging at INFO sees the run's own lines; its warnings still show."""
    logger, where = logging.getLogger("absl"), os.path.dirname(ocp.__file__) + os.sep
    drop = lambda record: record.levelno > logging.INFO or not record.pathname.startswith(where)  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


_UNRANKED = "Requested `tracked_metric`; did not provide metrics"  # Orbax, at each save without validation


@contextlib.contextmanager
def _without_absl_message(text: str):
    """Drop absl log records containing `text` while the block runs (other warnings still show)."""
    logger = logging.getLogger("absl")
    drop = lambda record: text not in record.getMessage()  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def complete_steps(folder: str) -> list[int]:
    """The steps whose checkpoint is complete in `folder` (Orbax renames a step's temporary folder to the bare
    number once every file is written), in order; [] for a folder that is not there."""
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def resume_note(workdir: str) -> str:
    """What a stopped run leaves to resume from: its last complete checkpoint, or none."""
    folder = os.path.join(workdir, "checkpoints")
    steps = complete_steps(folder)
    if not steps:
        return f"{folder} holds no complete checkpoint"
    return f"the same command resumes from step {steps[-1]}, the last complete checkpoint in {folder}"


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def step_record(directory: str, step: int, item: str) -> dict[str, Any] | None:
    """Checkpoint `step`'s JSON item read from its file, without a manager: "meta" (the run's meta) or "metrics"
    (what Orbax ranks the step by); None when absent, unreadable or not an object."""
    name = {"meta": "metadata", "metrics": "metrics"}[item]
    try:
        with open(os.path.join(directory, str(step), item, name)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def rank_earlier_steps(directory: str, best_metric: str) -> list[int]:
    """Write the validation metrics where Orbax ranks a step (<step>/metrics/metrics) for the complete steps whose
    meta holds a finite `best_metric` but that have none there: checkpoints written before 2026-12-04 (or by a run
    without best_metric). Orbax keeps only ranked steps for the best, so a resumed run's first save deleted the
    run's best checkpoint and named a later one the best. Every finite validation metric of the meta is written, as
    Orbax writes a step's (a later resume may rank by another of them). Returns the steps ranked; a folder that
    cannot be written is left as it is, with a warning."""
    ranked = []
    for step in complete_steps(directory):
        folder = os.path.join(directory, str(step))
        if os.path.exists(os.path.join(folder, "metrics")):
            continue
        meta = step_record(directory, step, "meta")
        if meta is None or not _finite(meta.get(best_metric)):  # (no meta, or no value: left unranked)
            continue
        metrics = {k: v for k, v in meta.items() if (k.startswith("val_") or k == best_metric)
                   and isinstance(v, int | float) and not isinstance(v, bool) and _finite(v)}
        tmp = os.path.join(folder, f"metrics.tmp-{os.getpid()}")
        try:
            os.makedirs(tmp, exist_ok=True)
            with open(os.path.join(tmp, "metrics"), "w") as f:
                json.dump(metrics, f)
            os.replace(tmp, os.path.join(folder, "metrics"))
        except OSError as e:
            log.warning("%s: checkpoints from step %d on left unranked by %s (%s): a later save may delete the "
                        "best of them", directory, step, best_metric, e)
            break
        ranked.append(step)
    if ranked:
        log.info("%s: checkpoints of steps %s ranked by their recorded %s (written by an earlier version)", directory,
                 ranked, best_metric)
    return ranked


class Checkpointer:
    def __init__(self, directory: str, every_steps: int, keep: int, async_save: bool = True,
                 best_metric: str = "", best_mode: str = "min", read_only: bool = False,
                 kept_steps: tuple[int, ...] = ()):
        """Keep the last `keep` checkpoints, plus the best one by `best_metric` (saved with `metrics=`), plus
        `kept_steps` (an earlier start's best, with best_metric off now: recorded in each meta saved, so that later
        starts keep them too).

        read_only: for readers (export, evaluate) of a folder a training run may be writing as they read: the
        manager never creates, saves or deletes anything, and a step the run deletes (keeping its last K) while
        it is read is said as such; a read of the latest step then moves on to the new latest."""
        self.every_steps = every_steps
        self.best_metric = best_metric
        self.read_only = read_only
        self._pending: int | None = None  # the step of an asynchronous save that may still be running
        self.kept_steps = tuple(kept_steps)
        self.directory = os.path.abspath(directory)
        if best_mode not in ("min", "max"):
            raise ValueError(f"checkpoint.best_mode={best_mode!r}; expected min | max")
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}; expected at least 1")
        policies = [cm.LatestN(n=keep), *([cm.CustomSteps(steps=self.kept_steps)] if self.kept_steps else [])]
        best: dict[str, Any] = {}
        if best_metric:
            metric = lambda m: float(m[best_metric])  # noqa: E731
            policies.append(cm.BestN(get_metric_fn=metric, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
            # best_fn makes Orbax write each step's metrics beside it, so that a resumed run (a new manager on
            # the same folder) still knows which old checkpoint is the best and keeps it.
            best = dict(best_fn=metric, best_mode=best_mode)
        if best_metric and not read_only and jax.process_index() == 0:
            rank_earlier_steps(self.directory, best_metric)
        with _absl_quiet():
            if read_only:
                opts = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
            else:
                # cleanup_tmp_directories: the temp folder of a save that was killed (SIGKILL after a SIGTERM's grace,
                # OOM, a lost node) holds up to a whole checkpoint, and no later save replaces it unless it is of the
                # same step (a preemption's save is at an off-interval one): removed when the run starts again.
                opts = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save,
                                                    preservation_policy=cm.AnyPreservationPolicy(policies),
                                                    cleanup_tmp_directories=True, **best)
            for attempt in range(5):
                try:
                    self._mngr = ocp.CheckpointManager(self.directory, options=opts)
                    break
                except FileNotFoundError:  # a step deleted between Orbax listing the folder and reading its time
                    if attempt == 4 or not read_only:
                        raise
                    time.sleep(0.05)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def maybe_save(self, step: int, items: dict[str, Any], meta: dict[str, Any], force: bool = False,
                   metrics: dict[str, float] | None = None) -> bool:
        """Save the pytrees in `items` (e.g. params, opt_state) and the JSON `meta` when `step` is a multiple
        of every_steps (or `force`); `metrics` rank it for the best-checkpoint policy. Returns whether it saved."""
        if not force and (self.every_steps <= 0 or step % self.every_steps):
            return False
        if step in self._mngr.all_steps():
            return False
        require_finite(items, f"step {step}: not saved (the last good checkpoint, step {self.latest_step()}, is kept)")
        if metrics is not None and self.best_metric and not _finite(metrics.get(self.best_metric)):
            # Orbax would rank a NaN above every number (and then delete the real best): not ranked, only the
            # last `keep` hold it
            log.warning("step %d: checkpoint.best_metric %s=%s is not a finite number: this checkpoint is not a "
                        "candidate for the best one (the best so far is kept)", step, self.best_metric,
                        metrics.get(self.best_metric))
            metrics = None
        if self.kept_steps:
            meta = {**meta, "kept_steps": list(self.kept_steps)}
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        self.wait()  # an earlier asynchronous save's failure is said as that step's (Orbax waits for it anyway)
        self._pending = step
        with self._saving(), _without_absl_message(_UNRANKED):  # (a step without validation: not for the best)
            self._mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), metrics=metrics)
        return True

    @contextlib.contextmanager
    def _saving(self):
        """A failed save (a full disk, a quota, a read-only or vanished folder; Orbax and tensorstore raise many
        kinds, some from its save threads) as one CheckpointError naming the step and the last complete
        checkpoint, which Orbax's write-then-rename leaves restorable."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as e:  # (what Orbax and tensorstore raise for a failed write;
            failed, self._pending = self._pending, None    # a bug's TypeError or KeyError keeps its traceback)
            done = complete_steps(self.directory)
            detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            last = (f"the last complete checkpoint is step {done[-1]}: the same command resumes from it"
                    if done else "no complete checkpoint is on disk")
            full = any(m in detail for m in ("No space left", "RESOURCE_EXHAUSTED", "Disk quota", "os_error_code='28'"))
            raise CheckpointError(f"{self.directory}/{failed}: the checkpoint could not be saved ({detail}); {last}"
                                  + (" once there is room on the disk" if full else "")) from None

    def restore(self, targets: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict[str, Any], int]:
        """(items laid out like `targets` — shapes, dtypes, shardings —, meta, step). `targets` may name a
        subset of the saved items (e.g. only params, for export)."""
        for _ in range(3 if step is None else 0):  # a step asked for by number is not replaced by another
            try:
                return self._restore(targets, step)
            except _Gone as e:
                log.warning("%s; reading the latest step again", e)
        return self._restore(targets, step)

    def _gone(self, step: int) -> bool:
        """Whether checkpoint `step` is being deleted (read-only managers: the writing run keeps its last K).
        Orbax deletes a folder in place: a read can meet it half deleted, so wait a moment for it to go."""
        folder = os.path.join(self.directory, str(step))
        deadline = time.monotonic() + GONE_WAIT_S
        while os.path.isdir(folder) and time.monotonic() < deadline:
            time.sleep(0.1)
        with _absl_quiet():
            self._mngr.reload()
        return not os.path.isdir(folder) or step not in self._mngr.all_steps()

    def _restore(self, targets: dict[str, Any], step: int | None) -> tuple[dict[str, Any], dict[str, Any], int]:
        step = self.latest_step() if step is None else step
        if step is None:
            hf = os.path.join(os.path.dirname(self.directory), "hf")
            hint = (f" (the run saved none, as with checkpoint.every_steps=0; its trained model is the HF folder {hf})"
                    if os.path.isfile(os.path.join(hf, "config.json")) else "")
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore{hint}")
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}; have {self.all_steps()}")
        args = {k: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, v))
                for k, v in targets.items()}
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        except Exception as e:  # noqa: BLE001 (Orbax/tensorstore raise many kinds for a damaged folder)
            detail = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            if "requested shape" in detail.lower():  # intact, written for another model
                raise CheckpointError(f"{self.directory}/{step}: cannot restore {sorted(targets)} ({detail}): it "
                                      "holds arrays of other shapes than this model's") from None
            if "tree structures do not match" in detail:  # intact, its state laid out by other settings or code
                detail = detail.split(" If this mismatch is intentional")[0]  # (Orbax's advice to its API's users)
                todo = ("written with other optimizer or model settings, e.g. optimizer.grad_clip turned on or off, or "
                        "by another version of jaxrl_llm; resume with the settings that wrote it (the workdir's "
                        "run_config.json), or export its parameters (python -m jaxrl_llm.export) and start a fresh "
                        "workdir from them" if "opt_state" in targets else
                        "the model the workdir's model_config.json describes has other parameters than it holds")
                raise CheckpointError(f"{self.directory}/{step}: cannot restore {sorted(targets)} ({detail}): the "
                                      f"checkpoint is intact but holds another set of arrays ({todo})") from None
            if self.read_only and self._gone(step):
                raise _Gone(f"{self.directory}/{step}: deleted while it was being read (the training run writing "
                            f"this folder keeps its last checkpoint.keep steps); have {self.all_steps()}") from None
            earlier = [s for s in self.all_steps() if s < step]
            hint = (f"; move that folder aside to use step {max(earlier)}" if earlier else "")
            raise CheckpointError(f"{self.directory}/{step}: cannot restore {sorted(targets)} ({detail}): the "
                                  f"checkpoint is damaged{hint}") from None
        return {k: out[k] for k in targets}, dict(out["meta"]), step

    def best_step(self) -> int | None:
        """The step of the best checkpoint by `best_metric` (None without one, or before any ranked save)."""
        return self._mngr.best_step() if self.best_metric else None

    def summary(self) -> str:
        """Where this run's checkpoints are, for the closing line: the steps kept and the best one."""
        steps = self.all_steps()
        if not steps:
            return "no checkpoints (checkpoint.every_steps=0)" if self.every_steps <= 0 else "no checkpoints yet"
        best = self.best_step()
        best = f", best by {self.best_metric}: step {best}" if best is not None else ""
        return f"checkpoints of steps {steps} in {self.directory}{best}"

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON meta of checkpoint `step` (latest when None) alone, without its arrays."""
        return self.restore({}, step)[1]

    def wait(self) -> None:
        with self._saving():
            self._mngr.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                with _absl_quiet():
                    self._mngr.close()
            except Exception as e:  # noqa: BLE001 (a failed save's error, said by wait(), is the one that matters)
                log.warning("closing the checkpoint manager of %s: %s: %s", self.directory, type(e).__name__, e)
