"""Multi-process behaviour of the resume checks, without a job: jax.process_index and the collectives faked."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import ml_collections

from jaxrl_llm import resume


class _FakeCheckpointer:
    def __init__(self, *args, kept_steps=(), **kwargs):
        self.kept_steps = tuple(kept_steps)

    def latest_step(self):
        return None


def test_only_process_0_reads_the_earlier_best_checkpoint(monkeypatch, tmp_path, caplog):
    """checkpoint.best_metric turned off on resume: every process read the earlier best (run_config.json, each
    step's metrics) and said the same 'best checkpoint is kept' warning, once per host of the job, only for process
    0's reading to be used. Process 1 now takes process 0's answer and reads nothing."""
    read = []

    def earlier_best(workdir, mode):
        read.append(workdir)
        logging.getLogger("jaxrl_llm.train").warning("checkpoint.best_metric is off now")
        return (7,)

    monkeypatch.setattr(resume, "earlier_best", earlier_best)
    monkeypatch.setattr(resume, "Checkpointer", _FakeCheckpointer)
    monkeypatch.setattr(resume.jax, "process_index", lambda: 1)
    monkeypatch.setattr(resume.distributed, "allgather_json", lambda obj: [[3], obj])  # process 0 found step 3
    config = ml_collections.ConfigDict(dict(export_hf=False, max_steps=4, checkpoint=dict(
        every_steps=1, keep=1, best_metric="", best_mode="min")))
    with caplog.at_level(logging.WARNING):
        ckpt = resume.prepare_workdir(str(tmp_path), None, config, None, default_best_mode="min", run_meta={})
    assert ckpt.kept_steps == (3,) and read == [] and "best_metric is off" not in caplog.text
    # process 0 still reads it (and writes the workdir's model_config.json and tokenizer/)
    monkeypatch.setattr(resume.jax, "process_index", lambda: 0)
    monkeypatch.setattr(resume.models, "config_to_hf", lambda cfg: {})
    monkeypatch.setattr(resume, "source_generation_config", lambda config: None)
    cfg = SimpleNamespace(compute_dtype="float32", attention_impl="xla")
    config.model = ml_collections.ConfigDict(dict(dtype="float32"))
    tokenizer = SimpleNamespace(save_pretrained=lambda path: os.makedirs(path))
    ckpt = resume.prepare_workdir(str(tmp_path), cfg, config, tokenizer, default_best_mode="min", run_meta={})
    assert read == [str(tmp_path)] and ckpt.kept_steps == (3,)
