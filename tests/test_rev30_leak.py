"""Review 30 (long runs): what a run leaves behind when it is killed and started again, many times over days."""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp


def test_a_killed_saves_temp_folder_is_removed_when_the_run_starts_again(tmp_path):
    """A save killed mid-write (SIGKILL after a SIGTERM's grace period, an OOM, a lost node) leaves Orbax's temp
    folder, up to a whole checkpoint of parameters and optimizer state. A later save replaces it only when it is of
    the same step, and a preemption's save is at an off-interval step: each such kill left one for good. The resumed
    run's checkpointer removes it (before its first save); complete checkpoints stay."""
    from jaxrl_llm.checkpoint import Checkpointer

    d = str(tmp_path / "checkpoints")
    items = {"params": {"w": jnp.arange(8.0)}}
    ck = Checkpointer(d, every_steps=4, keep=3, async_save=False)
    assert ck.maybe_save(4, items, {"step": 4})
    ck.close()
    # what two killed saves leave: step 7's (the SIGTERM save of a run preempted after step 7) and a timestamped one
    shutil.copytree(os.path.join(d, "4"), os.path.join(d, "7.orbax-checkpoint-tmp"))
    shutil.copytree(os.path.join(d, "4"), os.path.join(d, "9.orbax-checkpoint-tmp-1712345678"))

    resumed = Checkpointer(d, every_steps=4, keep=3, async_save=False)
    assert resumed.latest_step() == 4
    assert resumed.maybe_save(8, items, {"step": 8})
    resumed.close()
    assert sorted(os.listdir(d)) == ["4", "8"]
