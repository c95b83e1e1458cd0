"""SIGTERM as a request to stop cleanly: the training loops finish the step they are in, save a checkpoint and
stop, so that the same command resumes the run.

SIGTERM is what a scheduler sends before it takes the machines back (SLURM's time limit, `scancel`, preemption,
`sbatch --signal=TERM@<seconds>`), what `kill` and `timeout` send, and what launch/local_multiprocess.sh forwards.
In a multi-process job JAX's preemption service catches it on whichever process gets it, and all processes agree
on the step at which to stop (`reached_preemption_sync_point`); a single process catches it here, for the duration
of the run, and stops after the step in progress.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax

log = logging.getLogger("jaxrl_llm.train")
EXIT_STATUS = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped as asked)
    """The run stopped after `step` on SIGTERM; `saved`: whether a checkpoint of that step is on disk."""

    def __init__(self, step: int, saved: bool):
        self.step, self.saved = step, saved
        how = ("a checkpoint of step {s} was saved: the same command resumes from it" if saved else
               "no checkpoint was saved (checkpoint.every_steps is 0)")
        super().__init__(f"stopped after step {step} on SIGTERM; " + how.format(s=step))


def _sync_manager() -> Any | None:
    """JAX's preemption sync manager when this is a multi-process job with the preemption service, else None."""
    from jax._src import distributed as jax_distributed  # its global state (no public accessor)

    state = jax_distributed.global_state
    return state.preemption_sync_manager if state.client is not None and jax.process_count() > 1 else None


class StopOnSigterm:
    """`stop = StopOnSigterm().start()`, then `stop.requested(step)` by every process at every step (steps
    increase; all processes start from the same one), and `stop.close()` at the end (also a context manager)."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous: Any = None
        self._installed = False
        self._manager = None

    def start(self) -> StopOnSigterm:
        self._manager = _sync_manager()
        if self._manager is None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __enter__(self) -> StopOnSigterm:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        if not self._flag.is_set():
            log.warning("SIGTERM: stopping after the step in progress (with a checkpoint when checkpoints are on)")
        self._flag.set()

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (the number of steps done)."""
        if self._manager is not None:
            return bool(self._manager.reached_sync_point(step))
        return self._flag.is_set()


def checkpoint_step(ckpt: Any, stop: StopOnSigterm, step: int, state: dict[str, Any], meta: dict[str, Any],
                    val: dict[str, float], max_steps: int) -> None:
    """The end of a training loop's step `step` (steps done): save its checkpoint when one is due (every
    checkpoint.every_steps, at the last step and at each validation; `val` ranks it for the best-checkpoint policy),
    then, if SIGTERM asked to stop, save it in any case (unless checkpoints are off), wait for it to be on disk and
    raise Preempted."""
    items = {"params": state["params"], "opt_state": state["opt_state"]}
    on = ckpt.every_steps > 0
    ckpt.maybe_save(step, items, meta, force=on and (step == max_steps or bool(val)), metrics=val or None)
    if stop.requested(step) and step < max_steps:
        if on:
            ckpt.maybe_save(step, items, meta, force=True)  # a no-op when saved just above
        ckpt.wait()
        raise Preempted(step, step in ckpt.all_steps())
