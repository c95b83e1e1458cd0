"""What a user sees of a run's metrics: the console's ETA and TensorBoard's scalar names."""

from __future__ import annotations

import json

from tb_events import read_events

from jaxrl_llm.metrics import MetricsWriter


def test_tensorboard_tags_are_the_metric_names(tmp_path):
    """tensorboardX's `scalar` renamed val_pass@1 to val_pass_1 (and val_maj@4 to val_maj_4): TensorBoard showed
    names that metrics.jsonl, W&B and checkpoint.best_metric do not have."""
    w = MetricsWriter(str(tmp_path), 2)
    w.write(1, {"loss": 0.5, "val_pass@1": 0.25, "val_maj@4": 0.5, "reward/format": 1.0})
    w.close()
    tags = [v.tag for e in read_events(tmp_path / "tensorboard") for v in e.summary.value]
    assert tags == [k for k in json.loads((tmp_path / "metrics.jsonl").read_text()) if k != "step"]
    assert tags == ["loss", "val_pass@1", "val_maj@4", "reward/format"]


def test_eta_unknown_at_a_resumed_starts_first_step_but_not_with_several_steps(tmp_path, monkeypatch, capsys):
    """A resume's first row of one step showed its start-up (restore, compiles) times the steps left as the ETA."""
    from jaxrl_llm import metrics

    clock = iter([0.0, 20.0, 21.0, 100.0, 140.0])
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    w = MetricsWriter(str(tmp_path / "a"), 50, start_step=10, tensorboard=False)
    w.write(11, {"loss": 1.0})
    w.write(12, {"loss": 1.0})
    w2 = MetricsWriter(str(tmp_path / "b"), 50, tensorboard=False)  # log_every=10: a rate over 10 steps
    w2.write(10, {"loss": 1.0})
    etas = [line.rsplit("eta ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert etas == ["?", "38s", "160s"]


def test_a_reward_component_missing_every_step_is_said_once(caplog):
    """A routed environment with one combined route leaves that route's components out of every batch that mixes
    routes: the same warning came every step."""
    from jaxrl_llm.rl_batch import reward_components

    info = [{"reward/bonus": 1.0, "reward/both": 0.5}, {"reward/both": 0.25}]
    said: set[str] = set()  # the GRPO runner's, kept for the run
    with caplog.at_level("WARNING", logger="jaxrl_llm.rl_train"):
        for _ in range(3):
            out = reward_components(info, said)
            assert list(out) == ["both"]
    warned = [r.getMessage() for r in caplog.records if "'bonus'" in r.getMessage()]
    assert len(warned) == 1 and "missing from 1 of 2 samples" in warned[0]
    assert said == {"bonus"}


def test_a_resume_does_not_send_wandb_the_steps_it_already_has(tmp_path, monkeypatch):
    """Resumed from the checkpoint of step 3 after W&B got steps to 5, the run sent steps 4 and 5 again: W&B drops
    them, printing "Tried to log to step 4 that is less than the current step 6" for each (up to
    checkpoint.every_steps - 1 lines per resume)."""
    import sys
    import types

    logged: list[int] = []

    class Run:
        id, step = "r1", 6  # W&B's step after a resume: its last logged step + 1

        def log(self, data, step=None):
            logged.append(step)

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run()))
    (tmp_path / "wandb_run_id").write_text("r1")
    w = MetricsWriter(str(tmp_path), 8, start_step=3, tensorboard=False, wandb_project="p")
    for step in range(4, 9):
        w.write(step, {"loss": 1.0})
    w.close()
    assert logged == [6, 7, 8]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 5, 6, 7, 8]  # the run's own record keeps every step
