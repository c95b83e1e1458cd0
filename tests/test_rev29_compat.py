"""A run folder written by an older commit, or with other settings, read by the current code: each mismatch is a
one-line error that says what to do, never a wrong restore or advice that loses checkpoints (rev29, compat)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.models import CheckpointError
from jaxrl_llm.optim import make_optimizer


def test_an_intact_checkpoint_of_another_optimizer_layout_is_not_called_damaged(tmp_path):
    """optimizer.grad_clip turned off on a resume (or a checkpoint of a version whose optimizer chain differs):
    the optimizer state has another tree; the error said 'damaged; move that folder aside', and every older step
    fails the same way."""
    params = {"w": jnp.ones((4, 4))}
    clipped, _ = make_optimizer(lr=1e-3, max_steps=4, grad_clip=1.0)
    plain, _ = make_optimizer(lr=1e-3, max_steps=4, grad_clip=0.0)
    d = str(tmp_path / "checkpoints")
    ck = Checkpointer(d, every_steps=1, keep=3, async_save=False)
    for step in (1, 2):
        ck.maybe_save(step, {"params": params, "opt_state": clipped.init(params)}, {"step": step})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          {"params": params, "opt_state": plain.init(params)})
    with pytest.raises(CheckpointError) as e:
        ck.restore(target)
    msg = str(e.value)
    assert msg.startswith(f"{d}/2: cannot restore ['opt_state', 'params']")
    assert "intact" in msg and "grad_clip" in msg and "run_config.json" in msg and "jaxrl_llm.export" in msg
    assert "damaged" not in msg and "move that folder aside" not in msg and "partial_restore" not in msg
    items, _, step = ck.restore({"params": target["params"]})  # its parameters alone still read (export)
    assert step == 2 and float(items["params"]["w"][0, 0]) == 1.0
    with pytest.raises(CheckpointError, match=r"intact but holds another set of arrays \(the model the workdir's "
                                              r"model_config.json describes has other parameters than it holds\)$"):
        ck.restore({"params": {**target["params"], "b": target["params"]["w"]}})  # export/evaluate: params only
    ck.close()


@pytest.mark.parametrize("text", ["", '{"hf_con', '{"param_dtype": "float32"}', "[]"])
def test_export_and_evaluate_say_which_model_config_does_not_read(tmp_path, text):
    """An empty model_config.json (what a kill while versions before 2026-12-05 rewrote it left) stopped export with
    'error: Expecting value: line 1 column 1 (char 0)' and evaluate with a JSONDecodeError traceback."""
    from jaxrl_llm.evaluate import restore_workdir
    from jaxrl_llm.export import export_checkpoint

    (tmp_path / "model_config.json").write_text(text)
    for read in (lambda: export_checkpoint(str(tmp_path), str(tmp_path / "out")),
                 lambda: restore_workdir(str(tmp_path), None, None, None)):
        with pytest.raises(CheckpointError, match=rf"^{tmp_path}/model_config.json: unreadable \(.+\); the run's "
                                                  "training command, started again, writes it anew"):
            read()
    assert not (tmp_path / "out").exists()


def test_a_resume_refused_for_a_derived_count_says_another_version_may_have_made_it():
    """A DPO run of a version that dropped 8 of 16 pairs, resumed by one that drops 2: the same settings, but 'resume
    it with its own settings' was all the error said."""
    from jaxrl_llm.cli import ConfigError
    from jaxrl_llm.resume import check_resume

    with pytest.raises(ConfigError, match=r"8 there, 14 now\); .* the same settings give another number of data rows "
                                          "where another version of jaxrl_llm .* start a fresh workdir then$"):
        check_resume("wd", {"data_rows": 8, "batch_size": 4}, {"data_rows": 14, "batch_size": 4})
    with pytest.raises(ConfigError) as e:  # a setting the user changed: no such note
        check_resume("wd", {"data_rows": 8, "batch_size": 4}, {"data_rows": 8, "batch_size": 2})
    assert "version" not in str(e.value)


def test_the_best_checkpoint_of_an_earlier_version_survives_a_resume(tmp_path):
    """Checkpoints written before 2026-12-04 hold their validation metrics in their meta only (Orbax was not told
    best_fn, so it wrote none of its own): the resumed run's first save deleted the run's best checkpoint and the
    closing line named a later, worse step the best."""
    import math

    d = str(tmp_path / "checkpoints")
    old = Checkpointer(d, every_steps=1, keep=3, async_save=False)  # as the earlier version saved: no ranking
    for step, val in ((1, 1.0), (2, 3.0), (3, math.nan)):
        old.maybe_save(step, {"params": {"w": jnp.full((2,), float(step))}}, {"step": step, "val_loss": val})
    old.close()
    ck = Checkpointer(d, every_steps=1, keep=1, async_save=False, best_metric="val_loss", best_mode="min")
    ck.maybe_save(4, {"params": {"w": jnp.full((2,), 4.0)}}, {"step": 4, "val_loss": 4.0}, metrics={"val_loss": 4.0})
    assert ck.all_steps() == [1, 4] and ck.best_step() == 1
    assert ck.summary().endswith("best by val_loss: step 1")
    ck.maybe_save(5, {"params": {"w": jnp.full((2,), 5.0)}}, {"step": 5, "val_loss": 0.5}, metrics={"val_loss": 0.5})
    assert ck.all_steps() == [5] and ck.best_step() == 5  # a better step still takes over, the rest go
    ck.close()
