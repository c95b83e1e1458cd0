"""What a user reads on the console of a run: the ETA of a first row of several steps, a NaN metric, large rates,
and the closing line naming every output."""

from __future__ import annotations

import logging

import ml_collections

from jaxrl_llm.metrics import MetricsWriter


def _etas(capsys) -> list[str]:
    return [line.rsplit("eta ", 1)[1] for line in capsys.readouterr().err.splitlines()]


def test_first_row_of_several_steps_leaves_out_start_up(tmp_path, monkeypatch, capsys):
    """log_every=5 with 30 s of start-up and compiles in step 1 then 1 s steps: the first row's ETA counted the
    start-up as 5 steps' time ("eta 664s" at step 5 of 100, with 95 s left)."""
    from jaxrl_llm import metrics

    clock = iter([0.0, 30.0, 34.0, 39.0])  # writer created; step 1 done; rows 5 and 10 written
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    w = MetricsWriter(str(tmp_path), 100, tensorboard=False)
    for step in range(1, 6):
        w.step_done(step)
    w.write(5, {"loss": 1.0})
    w.step_done(10)
    w.write(10, {"loss": 1.0})
    assert _etas(capsys) == ["95s", "90s"]


def test_first_row_of_one_step_still_unknown(tmp_path, monkeypatch, capsys):
    from jaxrl_llm import metrics

    clock = iter([0.0, 30.0, 30.0, 31.0])
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    w = MetricsWriter(str(tmp_path), 100, tensorboard=False)
    for step in (1, 2):
        w.step_done(step)
        w.write(step, {"loss": 1.0})
    assert _etas(capsys) == ["?", "98s"]


def test_a_nan_metric_reads_nan_on_the_console_not_none(tmp_path, capsys):
    """metrics.jsonl holds null for a NaN (strict JSON); the console showed that null too: "val_loss=None"."""
    import numpy as np

    w = MetricsWriter(str(tmp_path), 2, tensorboard=False)
    w.write(1, {"loss": float("nan"), "kl": np.float32("inf"), "n": 3})
    line = capsys.readouterr().err
    assert "loss=nan kl=inf n=3 " in line and "None" not in line
    assert '"loss": null' in (tmp_path / "metrics.jsonl").read_text()


def test_large_rates_are_shown_whole(tmp_path, capsys):
    """tokens_per_s=2.766e+04 on every line of a GPU run: 27660."""
    w = MetricsWriter(str(tmp_path), 2, tensorboard=False)
    w.write(1, {"tokens_per_s": 27662.4, "loss": 0.012345, "lr": 3e-5, "tokens": 468.0, "big": 2.5e12})
    line = capsys.readouterr().err
    assert "tokens_per_s=27662 loss=0.01235 lr=3e-05 tokens=468 big=2.5e+12 " in line


def test_closing_line_names_the_tensorboard_folder_and_the_export_once(tmp_path, caplog, monkeypatch):
    """The closing line named metrics.jsonl, checkpoints and hf/ but not tensorboard/, and the export's folder was
    said three times in a row ("exported DIR (...)", "exported the trained model to DIR", "done: ... in DIR")."""
    from jaxrl_llm import models, resume

    monkeypatch.setattr(resume, "export_is_current", lambda *a: False)
    monkeypatch.setattr(resume, "require_finite", lambda *a: None)
    monkeypatch.setattr(models, "save_pretrained", lambda cfg, params, out, **kw: logging.getLogger(
        "jaxrl_llm.models.hf_io").info("exported %s (2 tensors)", out) or out)
    monkeypatch.setattr(resume, "source_generation_config", lambda config: None)
    config = ml_collections.ConfigDict(dict(max_steps=3, export_hf=True, metrics=dict(tensorboard=True)))
    wd = str(tmp_path)
    with caplog.at_level(logging.INFO, logger="jaxrl_llm"):
        resume.finish_run(config, None, None, None, wd, 0, "no checkpoints (checkpoint.every_steps=0)")
    lines = [r.getMessage() for r in caplog.records]
    assert sum(f"{wd}/hf" in line for line in lines) == 2, lines
    assert lines[-1] == (f"done: 3 steps; metrics in {wd}/metrics.jsonl and {wd}/tensorboard; no checkpoints "
                         f"(checkpoint.every_steps=0); the trained model in {wd}/hf")
    caplog.clear()
    config.metrics.tensorboard, config.export_hf = False, False
    with caplog.at_level(logging.INFO, logger="jaxrl_llm"):
        resume.finish_run(config, None, None, None, wd, 0, "no checkpoints yet")
    assert caplog.records[-1].getMessage() == f"done: 3 steps; metrics in {wd}/metrics.jsonl; no checkpoints yet"
    caplog.clear()
    config.max_steps = 1
    with caplog.at_level(logging.INFO, logger="jaxrl_llm"):
        resume.finish_run(config, None, None, None, wd, 0, "no checkpoints yet")
    assert caplog.records[-1].getMessage().startswith("done: 1 step; ")  # (not "1 steps")
