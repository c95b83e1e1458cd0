"""A recipe given to the other command (an eval recipe to train, a training recipe to evaluate) is a one-line error
saying which command takes it; both were AttributeError tracebacks ("'algorithm'", "'step'")."""

from __future__ import annotations

import pytest
from recipes import recipe

from jaxrl_llm import evaluate, train
from jaxrl_llm.cli import ConfigError


def test_train_refuses_an_eval_recipe_naming_the_evaluate_command():
    with pytest.raises(ConfigError, match="no 'algorithm' key: an evaluation recipe: run it with python -m "
                                          "jaxrl_llm.evaluate"):
        train.validate(recipe("eval_tiny"))
    c = recipe("sft_tiny")
    del c["algorithm"]
    with pytest.raises(ConfigError, match=r"no 'algorithm' key: a training recipe names one: \['dpo', 'grpo'"):
        train.validate(c)


@pytest.mark.parametrize("name", ["grpo_tiny", "sft_tiny"])
def test_evaluate_refuses_a_training_recipe(name):
    with pytest.raises(ConfigError, match=r"this is a training recipe \(algorithm="):
        evaluate.validate(recipe(name))


def test_evaluate_names_a_missing_block():
    c = recipe("eval_tiny")
    del c["sampling"]
    with pytest.raises(ConfigError, match="the config has no 'sampling' block"):
        evaluate.validate(c)
