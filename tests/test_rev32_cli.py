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


def _keys(node, prefix=""):
    for k in list(node.keys()):
        yield prefix + k
        if hasattr(node[k], "keys") and not isinstance(node[k], dict):
            yield from _keys(node[k], f"{prefix}{k}.")


# The keys without which one step of the recipe stopped with an AttributeError traceback (found by deleting each
# key in turn and running the recipe, 2026-12-07).
CRASHED_WITHOUT = {
    "all": {"seed", "tokenizer", "export_hf", "model.attention_impl", "model.remat", "data.num_examples"},
    "sft_tiny": {"data.max_len", "data.packing", "data.last_assistant_only"},
    "dpo_tiny": {"data.max_len", "dpo.average_log_probs"},
    "rm_tiny": {"data.max_len"},
    "grpo_tiny": {"data.max_prompt_len", "data.system_prompt", "data.instruction", "env",
                  "rollout.max_batch_size", "rollout.stop_token_ids", "grpo.token_level", "grpo.overlong_filtering",
                  "grpo.recompute_old_logprobs"},
}


@pytest.mark.parametrize("name", ["sft_tiny", "dpo_tiny", "rm_tiny", "grpo_tiny"])
def test_a_recipe_missing_any_key_is_named_or_runs_on_its_default(name):
    """A hand-written recipe without a key: validate names it (the run read it later, an AttributeError traceback
    such as "'max_len'" minutes in) or the run takes the key's default. Which keys need naming was found by
    running one step of each recipe without each key."""
    required = {*train.REQUIRED_KEYS, *train.REQUIRED_BY_ALGORITHM[recipe(name).algorithm]}
    assert CRASHED_WITHOUT[name] | CRASHED_WITHOUT["all"] <= required
    _each_key_deleted(name, train.validate, required)


def test_an_eval_recipe_missing_any_key_is_named_or_runs_on_its_default():
    """As for training recipes: the keys without which evaluating eval_tiny stopped with an AttributeError traceback
    are named by validate; deleting any other key validates (and runs on its default)."""
    crashed = {"seed", "tokenizer", "model.path", "model.init", "model.step", "model.compute_dtype",
               "model.attention_impl", "model.remat", "data.source", "data.num", "data.seed", "data.shuffle",
               "data.options", "data.system_prompt", "data.instruction", "eval.n_samples", "eval.k_values",
               "eval.max_batch_size", "eval.max_prompt_len", "eval.truncate_prompts", "eval.correct_threshold",
               "eval.keep_completions", "mesh.data", "mesh.fsdp", "mesh.tensor"}
    assert crashed <= set(evaluate.REQUIRED_KEYS)
    _each_key_deleted("eval_tiny", evaluate.validate, set(evaluate.REQUIRED_KEYS))


def _each_key_deleted(name, validate, required):
    """validate(recipe without the key), for each key of the recipe: a ConfigError naming a required key; no error
    for any other key (not a block holding one)."""
    for key in _keys(recipe(name)):
        c = recipe(name)
        *path, last = key.split(".")
        node = c
        for p in path:
            node = node[p]
        del node[last]
        try:
            validate(c)
        except ConfigError as e:
            if key in required:
                assert f"the config lacks {key}" in str(e), (key, str(e))
        else:
            assert key not in required and not any(r.startswith(key + ".") for r in required), key
