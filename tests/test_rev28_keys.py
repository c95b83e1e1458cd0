"""Config keys that were accepted and then had no effect (or failed late with a traceback): each is now refused
before any work naming the key, or applied."""

from __future__ import annotations

import json
import os
import re

import pytest
from recipes import recipe
from test_pipeline_review import _tiny_tokenizer

from jaxrl_llm import evaluate, train
from jaxrl_llm.data.chat import DataError


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


def test_evaluate_refuses_seeds_numpy_and_jax_would_not_take():
    evaluate.validate(recipe("eval_tiny"))
    for key, value in (("seed", -1), ("data.seed", -1), ("seed", 2**32)):
        with pytest.raises(train.ConfigError, match=rf"{key}={value}: must be an integer in \[0, 2\*\*32\)"):
            evaluate.validate(recipe("eval_tiny", {key: value}))


def test_evaluate_warns_that_greedy_samples_are_all_alike(caplog):
    evaluate.validate(recipe("eval_tiny", {"sampling.temperature": 0.0, "eval.n_samples": 1, "eval.k_values": (1,)}))
    assert "greedily" not in caplog.text
    evaluate.validate(recipe("eval_tiny", {"sampling.temperature": 0.0}))
    assert "sampling.temperature=0 samples greedily: the eval.n_samples=2 samples" in caplog.text


def test_shuffle_of_procedural_tasks_is_refused(tmp_path):
    """data.shuffle left reasoning-gym and number-guess tasks as they were (the seed picks them)."""
    from jaxrl_llm.data.tasks import load_tasks

    for source in ("rg:chain_sum", "guess", "rg:chain_sum+guess"):
        with pytest.raises(DataError, match=rf"{re.escape(source)}: shuffle=True \(data.shuffle\) applies to fixed"):
            load_tasks(source, 4, 0, shuffle=True)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(20)))
    mixed = load_tasks(f"{rows}+guess", 3, 1, shuffle=True)  # the fixed part is shuffled, the other generated
    plain = load_tasks(f"{rows}+guess", 3, 1)
    assert len(mixed) == 6 and sorted(map(str, mixed)) != sorted(map(str, plain))


class _Stop(Exception):
    pass


def test_evaluate_run_names_its_results_after_the_recipe(tmp_path, monkeypatch):
    """evaluate.run(config) (a notebook) ignored the recipe's `name`: results went to runs/eval_eval/."""
    folders = []

    def check_out(out, default_folder=""):
        folders.append(default_folder)
        raise _Stop

    monkeypatch.setattr(evaluate, "check_out", check_out)
    for name in (None, "mine"):
        with pytest.raises(_Stop):
            evaluate.run(recipe("eval_tiny", unlock=False), name=name)
    assert folders == [os.path.join("runs", "eval_tiny"), os.path.join("runs", "eval_mine")]


def test_evaluating_a_workdir_uses_model_dtype(tmp_path, monkeypatch):
    """model.dtype was left out for a training workdir (its parameters came back as the run kept them)."""
    import jax
    import jax.numpy as jnp

    from jaxrl_llm import models
    from jaxrl_llm.checkpoint import Checkpointer

    cfg = models.ModelConfig(family="llama", vocab_size=5, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8)
    wd = tmp_path / "run"
    _tiny_tokenizer(wd / "tokenizer", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (wd / "model_config.json").write_text(json.dumps({"hf_config": models.config_to_hf(cfg),
                                                      "param_dtype": "float32"}))
    ckpt = Checkpointer(str(wd / "checkpoints"), every_steps=1, keep=1)
    ckpt.maybe_save(1, {"params": models.init_params(cfg, 0)}, {"step": 1})
    ckpt.close()
    seen = []

    def evaluate_tasks(cfg, params, *args, **kwargs):
        seen.append({x.dtype for x in jax.tree.leaves(params)})
        raise _Stop

    monkeypatch.setattr(evaluate, "evaluate_tasks", evaluate_tasks)
    for dtype in ("bfloat16", "float32"):
        config = recipe("eval_tiny", {"model.path": str(wd), "model.dtype": dtype, "tokenizer": "",
                                      "env.num_workers": 0, "env.sandbox": False}, unlock=False)
        with pytest.raises(_Stop):
            evaluate.run(config, out=str(tmp_path / "r.json"))
    assert seen == [{jnp.dtype(jnp.bfloat16)}, {jnp.dtype(jnp.float32)}]
