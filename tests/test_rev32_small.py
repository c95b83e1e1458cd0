"""Small one-line errors and output types: a safetensors index whose weight_map is not an object, an evaluation whose
max_new_tokens alone leaves no room for a prompt (the hint said truncate_prompts, which cannot help), whole-number
metrics of an evaluation written as integers."""

from __future__ import annotations

import json

import pytest
from recipes import recipe

from jaxrl_llm import evaluate
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.evaluation import scalar_metrics
from jaxrl_llm.models.hf_io import CheckpointError, HFFolderSource


@pytest.mark.parametrize("weight_map", [["model.embed_tokens.weight"], {"model.norm.weight": 3}, "x"])
def test_an_index_whose_weight_map_is_not_names_to_files_is_named(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid safetensors index"):
        HFFolderSource(str(tmp_path))


def test_max_new_tokens_past_the_context_hints_at_max_new_tokens(tmp_path):
    c = recipe("eval_tiny", {"sampling.max_new_tokens": 100_000, "data.num": 2})
    with pytest.raises(ConfigError, match=r"leaves no room for a prompt .*; lower sampling.max_new_tokens\)$"):
        evaluate.run(c, str(tmp_path / "r.json"))


def test_counts_stay_integers():
    m = scalar_metrics({"num_problems": 4, "pass@1": 0.5, "timeouts": 0, "ok": True})
    assert m == {"num_problems": 4, "pass@1": 0.5, "timeouts": 0}
    assert isinstance(m["num_problems"], int) and isinstance(m["pass@1"], float)


def test_an_eval_recipe_without_a_seed_is_named(tmp_path):
    c = recipe("eval_tiny")
    del c["seed"]
    with pytest.raises(ConfigError, match="the config lacks seed: every evaluation needs it"):
        evaluate.validate(c)


def test_a_grpo_setup_error_after_the_environment_is_made_closes_it(monkeypatch, tmp_path):
    """An error between making GRPO's environment and the training loop (here the context check) closes the
    environment: its worker processes outlived a ConfigError in a notebook."""
    from jaxrl_llm import environments, train

    made = environments.make_environment
    closed = []

    class Watched:
        def __init__(self, env):
            self._env = env

        def __getattr__(self, name):
            return getattr(self._env, name)

        def close(self):
            closed.append(True)
            getattr(self._env, "close", lambda: None)()

    monkeypatch.setattr(environments, "make_environment", lambda spec: Watched(made(spec)))
    c = recipe("grpo_tiny", {"data.max_prompt_len": 2047, "data.num_examples": 4})
    with pytest.raises(ConfigError, match="data.max_prompt_len=2047"):
        train.run(c, str(tmp_path / "w"))
    assert closed == [True]


@pytest.mark.parametrize("key,value", [("rope_theta", float("nan")), ("rope_theta", -1.0), ("rms_norm_eps", 0.0),
                                       ("rms_norm_eps", "1e-6")])
def test_a_config_with_a_rope_theta_or_norm_eps_that_is_no_positive_number_is_named(key, value):
    from jaxrl_llm import models

    d = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
         "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, key: value}
    models.config_from_hf({k: v for k, v in d.items() if k != key})  # (the same config builds without it)
    with pytest.raises(models.UnsupportedModelError, match=f"{key}=.*: must be a finite number > 0"):
        models.config_from_hf(d)
