"""Best-checkpoint policy, validation schedule and W&B logging: fast checks without a training run. A NaN
validation metric ranks no checkpoint (Orbax would rank it above the best and delete the best); a restart logs to
the W&B run of the first start; best_metric without checkpoints and a failed wandb.init are one-line errors."""

from __future__ import annotations

import logging
import sys
import types

import jax.numpy as jnp
import pytest


def _save(ck, step, val):
    import jax.numpy as jnp

    ck.maybe_save(step, {"params": {"w": jnp.full((2,), float(step))}}, {"step": step},
                  metrics=None if val is None else {"val_loss": val}, force=val is not None)


@pytest.mark.parametrize("mode,vals,best", [("max", [5.0, float("nan"), 3.0, 4.0], 1),
                                            ("min", [3.0, float("nan"), 5.0, 6.0], 1)])
def test_a_nan_validation_metric_does_not_evict_the_best_checkpoint(tmp_path, caplog, mode, vals, best):
    """A validation whose metric is NaN ranks nothing: the best so far (step 1) stays on disk (Orbax's BestN would
    sort the NaN as best, delete step 1, and the next step would delete the NaN one: the best gone for good). A save
    without validation (step 5) is not ranked, without Orbax's warning about it; the closing summary names the
    steps kept and the best."""
    from jaxrl_llm.checkpoint import Checkpointer

    ck = Checkpointer(str(tmp_path / "ck"), every_steps=0, keep=1, best_metric="val_loss", best_mode=mode)
    try:
        with caplog.at_level(logging.WARNING):
            for step, val in enumerate(vals, start=1):
                _save(ck, step, val)
            ck.maybe_save(5, {"params": {"w": jnp.zeros((2,))}}, {"step": 5}, force=True)
        ck.wait()
        assert ck.all_steps() == [best, 5]
        assert "step 2: checkpoint.best_metric val_loss=nan is not a finite number" in caplog.text
        assert "tracked_metric" not in caplog.text
        assert ck.summary() == f"checkpoints of steps [{best}, 5] in {tmp_path / 'ck'}, best by val_loss: step {best}"
    finally:
        ck.close()


def test_no_checkpoint_to_restore_points_to_the_run_s_export(tmp_path):
    from jaxrl_llm.checkpoint import Checkpointer

    (tmp_path / "checkpoints").mkdir()
    ck = Checkpointer(str(tmp_path / "checkpoints"), every_steps=0, keep=1, read_only=True)
    try:
        with pytest.raises(FileNotFoundError, match=r"checkpoints: no checkpoint to restore$"):
            ck.restore({})
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text("{}")
        with pytest.raises(FileNotFoundError, match=r"no checkpoint to restore \(the run saved none, as with "
                                                     r"checkpoint.every_steps=0; its trained model is the HF folder "):
            ck.restore({})
        assert ck.summary() == "no checkpoints (checkpoint.every_steps=0)"
    finally:
        ck.close()


class _FakeWandb(types.ModuleType):
    """A `wandb` stand-in recording init/log/finish; init gives the id it is passed, or a new one."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple] = []
        self._n = 0

    def init(self, **kw):
        self._n += 1
        run_id = kw.get("id") or f"run{self._n}"
        self.calls.append(("init", run_id, kw))
        fake = self

        class Run:
            id = run_id

            def log(self, data, step=None):
                fake.calls.append(("log", run_id, step, dict(data)))

            def finish(self):
                fake.calls.append(("finish", run_id))

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_wandb_gets_the_project_config_steps_and_finish(tmp_path, fake_wandb):
    from jaxrl_llm.metrics import MetricsWriter

    w = MetricsWriter(str(tmp_path), 3, tensorboard=False, wandb_project="proj", run_config={"lr": 0.1})
    w.write(1, {"loss": 2.0, "note": "text"})
    w.write(2, {"loss": 1.5, "val_loss": 1.7})
    w.close()
    (init, run_id, kw), *rest = fake_wandb.calls
    assert kw["project"] == "proj" and kw["config"] == {"lr": 0.1}
    assert rest == [("log", run_id, 1, {"loss": 2.0}), ("log", run_id, 2, {"loss": 1.5, "val_loss": 1.7}),
                    ("finish", run_id)]


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, fake_wandb):
    """A restart in the same workdir (start_step > 0) continues the W&B run of the first start. Today init gets
    no id, so resume="allow" has nothing to resume: every restart is a new W&B run."""
    from jaxrl_llm.metrics import MetricsWriter

    first = MetricsWriter(str(tmp_path), 10, tensorboard=False, wandb_project="proj")
    first.write(1, {"loss": 1.0})
    first.close()
    again = MetricsWriter(str(tmp_path), 10, start_step=1, tensorboard=False, wandb_project="proj")
    again.write(2, {"loss": 0.5})
    again.close()
    ids = [c[1] for c in fake_wandb.calls if c[0] == "init"]
    assert len(ids) == 2 and ids[0] == ids[1], ids
    fresh = MetricsWriter(str(tmp_path), 10, tensorboard=False, wandb_project="proj")  # a new run (step 0): new id
    fresh.close()
    assert fake_wandb.calls[-2][0] == "init" and fake_wandb.calls[-2][1] not in ids
    assert (tmp_path / "wandb_run_id").read_text() == fake_wandb.calls[-2][1]


def test_a_failed_wandb_init_is_a_config_error_naming_the_key(tmp_path, fake_wandb):
    from jaxrl_llm.cli import ConfigError
    from jaxrl_llm.metrics import MetricsWriter

    def refuse(**kw):
        raise RuntimeError("api_key not configured (no-tty)")

    fake_wandb.init = refuse
    with pytest.raises(ConfigError, match=r"metrics.wandb_project='proj': W&B could not start a run \(RuntimeError: "
                                          r"api_key not configured"):
        MetricsWriter(str(tmp_path), 3, tensorboard=False, wandb_project="proj")


def test_best_metric_without_checkpoints_is_refused():
    """checkpoint.best_metric asks for the best checkpoint to be kept; with checkpoint.every_steps=0 nothing is ever
    saved (not even at validations), and the run says nothing about it."""
    from recipes import recipe

    from jaxrl_llm.train import ConfigError, validate_schedule

    c = recipe("sft_tiny", {"val_every": 2, "data.val_fraction": 0.1, "checkpoint.every_steps": 0,
                            "checkpoint.best_metric": "val_loss"})
    with pytest.raises(ConfigError, match="every_steps"):
        validate_schedule(c)
