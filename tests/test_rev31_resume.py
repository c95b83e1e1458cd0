"""Resuming a workdir with a changed config: a max_steps below the latest checkpoint, another validation split,
and checkpoint.best_metric turned off (the earlier best checkpoint is kept, as the HF Trainer keeps its
best_model_checkpoint)."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import pytest
from recipes import text_sft_recipe

from jaxrl_llm import train
from jaxrl_llm.checkpoint import Checkpointer, complete_steps
from jaxrl_llm.resume import earlier_best

VAL = {"checkpoint.every_steps": 1, "max_steps": 2, "optimizer.warmup_steps": 0, "val_every": 1,
       "data.val_fraction": 0.25}


def _steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    """A finished 2-step SFT run validating on a quarter of its 8 rows, checkpoints of steps 1 and 2."""
    tmp = tmp_path_factory.mktemp("val")
    wd = str(tmp / "run")
    train.run(text_sft_recipe(tmp, VAL), wd)
    return tmp, wd


def test_a_max_steps_below_the_latest_checkpoint_is_refused(val_run):
    """max_steps lowered under the latest checkpoint trained nothing, then exported the later step's model into hf/
    and closed with 'done: 1 steps', as if it were the model of max_steps: a user wanting an earlier model got the
    last one in silence. It is refused, naming the export command; max_steps equal to the checkpoint still starts a
    finished run again (nothing to train)."""
    tmp, wd = val_run
    with pytest.raises(train.ConfigError, match=r"max_steps=1, but workdir .* holds a checkpoint of step 2: .*"
                                                r"jaxrl_llm.export --workdir .* --step N .*\(checkpoints: \[1, 2\]\)"):
        train.run(text_sft_recipe(tmp, {**VAL, "max_steps": 1, "export_hf": True}), wd)
    assert not os.path.exists(os.path.join(wd, "hf")) and _steps(wd) == [1, 2]
    with open(os.path.join(wd, "run_config.json")) as f:
        assert json.load(f)["max_steps"] == 2


@pytest.mark.parametrize("over", [{"data.val_fraction": 0.5}, {"data.val_fraction": 0.0, "val_every": 0}])
def test_another_validation_split_is_refused(val_run, over):
    """data.val_fraction changed on resume: the total row count (all the checkpoint recorded) was the same, so the
    run went on with another split: it validated on rows it had trained on (a val_loss too good, and best-checkpoint
    ranking across two validation sets), and the data position counted over another number of training rows."""
    tmp, wd = val_run
    with pytest.raises(train.ConfigError, match=r"the rows held out for validation \(data.val_fraction.*\): 2 there"):
        train.run(text_sft_recipe(tmp, {**VAL, "max_steps": 3, **over}), wd)
    assert _steps(wd) == [1, 2]


def test_a_row_count_changed_by_a_data_setting_names_it(val_run):
    """data.packing turned on gives another row count: the refusal said that another version of jaxrl_llm must have
    written the checkpoint (for the same settings) and to start a fresh workdir; it names the data setting changed
    since the last start instead."""
    tmp, wd = val_run
    with pytest.raises(train.ConfigError, match=r"number of data rows .* \(changed since the last start: "
                                                r"data.packing: false -> true\)$"):
        train.run(text_sft_recipe(tmp, {**VAL, "max_steps": 3, "data.packing": True}), wd)
    assert _steps(wd) == [1, 2]


def _save(ck: Checkpointer, step: int, val_loss: float | None) -> None:
    items = {"params": {"w": jnp.full((2,), float(step))}}
    metrics = None if val_loss is None else {"val_loss": val_loss}
    ck.maybe_save(step, items, {"step": step}, force=True, metrics=metrics)
    ck.wait()


def test_the_best_checkpoint_outlives_best_metric_turned_off(tmp_path):
    """A resume without checkpoint.best_metric (validation turned off to extend a run: best_metric needs val_every)
    kept only the last checkpoint.keep, so its first save deleted the run's best checkpoint. The earlier start's
    best (by run_config.json's best_metric and best_mode) is kept, and recorded in each meta so that later starts,
    whose run_config.json has no best_metric, keep it too."""
    wd = str(tmp_path)
    folder = os.path.join(wd, "checkpoints")
    ck = Checkpointer(folder, every_steps=1, keep=1, best_metric="val_loss", async_save=False)
    for step, loss in ((1, 1.0), (2, 3.0), (3, 2.0)):
        _save(ck, step, loss)
    ck.close()
    assert complete_steps(folder) == [1, 3]

    def config(best: str) -> None:
        with open(os.path.join(wd, "run_config.json"), "w") as f:
            json.dump({"checkpoint": {"best_metric": best, "best_mode": "min"}}, f)

    config("val_loss")
    assert earlier_best(wd, "max") == (1,)
    ck = Checkpointer(folder, every_steps=1, keep=1, async_save=False, kept_steps=(1,))
    _save(ck, 4, None)
    ck.close()
    assert complete_steps(folder) == [1, 4]
    config("")  # the next start: the file is the off start's now
    assert earlier_best(wd, "min") == (1,)
    ck = Checkpointer(folder, every_steps=1, keep=1, async_save=False, kept_steps=earlier_best(wd, "min"))
    _save(ck, 5, None)
    ck.close()
    assert complete_steps(folder) == [1, 5]
    os.remove(os.path.join(wd, "run_config.json"))
    os.makedirs(os.path.join(tmp_path, "fresh", "checkpoints", "7"))
    assert earlier_best(os.path.join(tmp_path, "fresh"), "min") == ()  # no config that named one: nothing kept
