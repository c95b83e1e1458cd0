"""Review 32 (late): a resumed run's metrics window (checkpoint meta log_window) in a multi-process job."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxrl_llm import resume
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.metrics import StepWindow


def test_the_resumed_window_is_read_without_orbax_restore_a_barrier_of_every_process(tmp_path, monkeypatch):
    """Process 0 alone restores the window; it read the meta with ckpt.read_meta, an Orbax restore that ends in a
    barrier of every process (sync_global_devices), met by process 0 only: a 2-process job resumed from a checkpoint
    between two rows (log_every=2, a checkpoint at step 3) failed at once (Gloo errors; "checkpoint 3 is damaged")."""
    ck = Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=2, async_save=False)
    before = StepWindow(rates={"tokens_per_s": "step_time_s"})
    before.add({"loss": 3.0, "tokens_per_s": 40.0, "step_time_s": 2.0})  # step 3, after row 2
    window = before.pending()
    ck.maybe_save(3, {"params": {"w": np.zeros(2, np.float32)}}, {"step": 3, "log_window": window})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 2, "loss": 1.5}) + "\n")  # no row at step 3

    def collective(*a, **k):
        raise AssertionError("Checkpointer.restore: a barrier of every process, called by process 0 alone")

    monkeypatch.setattr(Checkpointer, "restore", collective)
    w = StepWindow(rates={"tokens_per_s": "step_time_s"})
    resume.resume_window(w, ck, str(tmp_path), 3)
    w.add({"loss": 4.0, "tokens_per_s": 10.0, "step_time_s": 2.0})
    assert w.take() == pytest.approx({"loss": 3.5, "tokens_per_s": 25.0, "step_time_s": 2.0})
    ck.close()
    assert os.path.isdir(tmp_path / "checkpoints" / "3")
