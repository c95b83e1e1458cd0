"""Config keys that were accepted and then had no effect (or failed late with a traceback): each is now refused
before any work naming the key, or applied."""

from __future__ import annotations

import os

import pytest
from recipes import recipe

from jaxrl_llm import train


@pytest.mark.parametrize("name", ["sft_tiny", "dpo_tiny", "rm_tiny"])
def test_a_validation_split_without_validation_is_refused(name, tmp_path):
    """data.val_fraction held its rows out of training while val_every=0 never validated on them: a run trained on
    fewer rows, without a word."""
    train.validate(recipe(name, {"data.val_fraction": 0.25, "val_every": 2}))
    with pytest.raises(train.ConfigError, match=r"data.val_fraction=0.25 holds rows out of training, but "
                                                r"val_every=0 never validates"):
        train.run(recipe(name, {"data.val_fraction": 0.25}, unlock=False), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_grpo_refuses_a_validation_split():
    with pytest.raises(train.ConfigError, match="data.val_fraction=0.1 .*GRPO validates on eval's tasks"):
        train.validate(recipe("grpo_tiny", {"data.val_fraction": 0.1, "val_every": 2}))


@pytest.mark.parametrize("over,message", [
    ({"dpo.sft_weight": -1.0}, r"dpo.sft_weight=-1.0: each must be >= 0"),
    ({"dpo.preference_weight": -1.0}, r"dpo.preference_weight=-1.0, .*each must be >= 0"),
    ({"dpo.preference_weight": 0.0}, r"both 0 leave nothing to learn"),
    ({"dpo.sft_average_log_probs": True}, r"dpo.sft_average_log_probs=True would have no effect: dpo.sft_weight=0"),
])
def test_dpo_weights_that_train_nothing_or_backwards_are_refused(over, message):
    train.validate(recipe("dpo_tiny", {"dpo.sft_weight": 0.5, "dpo.sft_average_log_probs": True}))
    train.validate(recipe("dpo_tiny", {"dpo.preference_weight": 0.0, "dpo.sft_weight": 1.0}))
    with pytest.raises(train.ConfigError, match=message):
        train.validate(recipe("dpo_tiny", over))


@pytest.mark.parametrize("over,message", [
    # both failed after the model loaded, as a plain ValueError (a traceback from the command)
    ({"rollout.max_batch_size": -1}, r"rollout.max_batch_size=-1: must be an integer >= 0"),
    ({"val_every": 2, "eval.temperature": -1.0}, r"eval.temperature=-1.0: must be >= 0"),
    ({"val_every": 2, "eval.temperature": float("inf")}, r"eval.temperature=inf: must be >= 0"),
])
def test_grpo_sampling_keys_are_checked_before_any_work(over, message):
    train.validate(recipe("grpo_tiny", {"rollout.max_batch_size": 8, "val_every": 2, "eval.temperature": 0.0}))
    with pytest.raises(train.ConfigError, match=message):
        train.validate(recipe("grpo_tiny", over))
