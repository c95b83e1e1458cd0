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
